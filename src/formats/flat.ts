/** Flat extents (FLAT, VMFS, raw images): the extent is a byte range of a file. */
import type { FileHandle } from 'node:fs/promises'
import { RedoError } from '../errors'
import { SECTOR } from '../units'
import { DataSync, Mutex, PlannedWrites, noteOpened, openStoreFile, readExact, writeExact, type Extent, type ReadPlan, type Run, type State } from './extent'

export class FlatExtent implements Extent {
  readonly kind = 'flat' as const
  readonly problems: string[] = []
  /** fdatasync that stays failed once write-back failed (extent.ts). */
  private readonly durable: DataSync
  readonly grainBytes: number
  private dirty = false
  /** Written since `blocks` was read: the next allocatedBytes() reads it again, in the background. */
  private blocksStale = false
  private readonly planned = new PlannedWrites()
  private readonly flushMutex = new Mutex()

  private constructor (
    readonly path: string,
    private readonly fh: FileHandle,
    readonly size: number,
    private readonly base: number,
    readonly writable: boolean,
    private fileSize: number,
    private blocks: number,
    device: boolean
  ) {
    this.durable = new DataSync(fh, path, this.problems)
    this.grainBytes = size
    if (fileSize < base + size && !device) {
      this.problems.push(`${path}: flat extent is ${fileSize} bytes, shorter than the ${base + size} its descriptor line says (truncated?); served read-only`)
    }
  }

  static async open (path: string, sectors: number, offsetSectors: number, writable: boolean): Promise<FlatExtent> {
    const fh = await openStoreFile(path, writable)
    try {
      const st = await fh.stat()
      noteOpened(path, st)
      // a short file is damaged: writes past its end would grow it and hide what is missing
      const device = st.isBlockDevice() // (its size is not in st_size)
      const whole = st.size >= (offsetSectors + sectors) * SECTOR || device
      return new FlatExtent(path, fh, sectors * SECTOR, offsetSectors * SECTOR, writable && whole, st.size, st.blocks * 512, device)
    } catch (e) {
      await fh.close()
      throw e
    }
  }

  lookup (pos: number, len: number): { state: State, length: number } {
    const end = this.fileSize - this.base
    if (pos >= end) return { state: 'bad', length: len }
    return { state: 'data', length: Math.min(len, end - pos) }
  }

  runs (): Run[] {
    const good = Math.max(0, Math.min(this.size, this.fileSize - this.base))
    const out: Run[] = []
    if (good > 0) out.push({ start: 0, length: good, state: 'data' })
    if (good < this.size) out.push({ start: good, length: this.size - good, state: 'bad' })
    return out
  }

  async read (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    if (this.base + pos + len > this.fileSize) {
      throw new RedoError('EIO', `${this.path}: read at byte ${pos} past the end of the flat extent file (${this.fileSize} bytes)`, this.path)
    }
    await readExact(this.fh, this.path, buf, off, len, this.base + pos)
  }

  plan (p: ReadPlan, pos: number, len: number): boolean {
    return this.base + pos + len <= this.fileSize && p.data(this.fh.fd, this.base + pos, len)
  }

  /** An overwrite in place as a plan (Extent.planWrite): inside the file as it is now. */
  planWrite (p: ReadPlan, pos: number, len: number): boolean {
    if (!this.writable || this.base + pos + len > this.fileSize || !p.data(this.fh.fd, this.base + pos, len)) return false
    this.dirty = true
    this.blocksStale = true
    this.planned.mark()
    return true
  }

  async write (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    if (!this.writable) throw new RedoError('EROFS', `${this.path}: opened read-only`, this.path)
    await writeExact(this.fh, buf, off, len, this.base + pos)
    this.dirty = true
    this.blocksStale = true
    if (this.base + pos + len > this.fileSize) this.fileSize = this.base + pos + len
  }

  async beginWrite (): Promise<void> {}
  async flush (): Promise<void> {
    // one at a time: a flush that found the file clean because another had just taken the
    // flag must not return before that one's sync has
    await this.flushMutex.run(async () => {
      await this.planned.settle()
      if (!this.dirty) return
      this.dirty = this.planned.pending
      try {
        await this.durable.sync()
      } catch (e) {
        this.dirty = true // and DataSync keeps failing: no later flush reports success
        throw e
      }
    })
  }

  async endWrite (): Promise<void> { await this.flush() }
  async close (): Promise<void> { await this.fh.close() }

  /**
   * What the file system allocated (st_blocks, for du and cp --sparse): writes into holes grow
   * it, so after writes the next call starts an fstat and a later one sees its answer.
   */
  allocatedBytes (): number {
    if (this.blocksStale) {
      this.blocksStale = false
      this.fh.stat().then(st => { this.blocks = st.blocks * 512 }, () => { this.blocksStale = true })
    }
    return Math.min(this.blocks, this.size)
  }

  async check (): Promise<string[]> {
    const st = await this.fh.stat()
    this.fileSize = st.size
    this.blocks = st.blocks * 512
    return st.size < this.base + this.size
      ? [`${this.path}: flat extent is ${st.size} bytes, shorter than the ${this.base + this.size} its descriptor line says`]
      : []
  }
}
