/**
 * ESX sparse extents ("COWD": vmfsSparse deltas and ESX 2.x REDO logs), VMDK.md §4.
 * Grain tables hold 4096 entries; grains are usually one sector.
 */
import { open, type FileHandle } from 'node:fs/promises'
import { RedoError } from '../errors'
import { SECTOR, ceilDiv } from '../units'
import { faultPoint } from '../fault'
import { DataSync, Mutex, PlannedWrites, newGrain, noteOpened, openStoreFile, readExact, settleAll, writeExact, writeExactv, type Extent, type ReadBelow, type ReadPlan, type Run, type State } from './extent'
import { BAD, SECTOR_ENTRIES, entryOf, lookupGrains, planGrains, planOverwrite, readGrains, runsOfGrains, type GrainTables } from './grains'

export const COWD_MAGIC = 0x44574f43
export const COWD_HEADER_BYTES = 2048
export const COWD_GT_ENTRIES = 4096

export interface CowdHeader {
  version: number
  flags: number
  numSectors: number
  grainSize: number
  gdOffset: number
  numGDEntries: number
  freeSector: number
  parentFileName: string
  uncleanShutdown: number
}

export function parseCowdHeader (buf: Buffer, path: string): CowdHeader {
  if (buf.length < COWD_HEADER_BYTES) throw new RedoError('EINVAL', `${path}: truncated COWD header (${buf.length} bytes, need ${COWD_HEADER_BYTES})`, path)
  if (buf.readUInt32LE(0) !== COWD_MAGIC) throw new RedoError('EINVAL', `${path}: bad magic, not a COWD extent`, path)
  const nameArea = buf.subarray(32, 32 + 1024)
  const nul = nameArea.indexOf(0)
  const h: CowdHeader = {
    version: buf.readUInt32LE(4),
    flags: buf.readUInt32LE(8),
    numSectors: buf.readUInt32LE(12),
    grainSize: buf.readUInt32LE(16),
    gdOffset: buf.readUInt32LE(20),
    numGDEntries: buf.readUInt32LE(24),
    freeSector: buf.readUInt32LE(28),
    parentFileName: nameArea.subarray(0, nul < 0 ? 1024 : nul).toString('latin1'),
    uncleanShutdown: buf.readUInt32LE(1648)
  }
  const bad = (what: string): never => { throw new RedoError('EINVAL', `${path}: corrupt COWD header: ${what}`, path) }
  if (h.version !== 1) bad(`unsupported version ${h.version} (only ESX COWD version 1 is known)`)
  if (h.grainSize < 1 || h.grainSize > 1024 || (h.grainSize & (h.grainSize - 1)) !== 0) bad(`grain size ${h.grainSize}`)
  if (h.numSectors === 0) bad('capacity 0')
  if (h.numGDEntries !== ceilDiv(h.numSectors, COWD_GT_ENTRIES * h.grainSize)) bad(`${h.numGDEntries} directory entries for ${h.numSectors} sectors`)
  if (h.gdOffset < 4) bad(`grain directory at sector ${h.gdOffset} overlaps the header`)
  return h
}

/** Write an empty COWD extent: header, zeroed directory, nothing else (VMDK.md §4.4). */
export async function createCowdFile (path: string, sectors: number, parentFileName = ''): Promise<void> {
  if (sectors > 0xffffffff) throw new RedoError('EINVAL', `${path}: a COWD extent cannot exceed 2 TiB`, path)
  const grainSize = 1
  const numGD = ceilDiv(sectors, COWD_GT_ENTRIES * grainSize)
  const gdOffset = 4
  const gdSectors = ceilDiv(numGD * 4, SECTOR)
  const h = Buffer.alloc(COWD_HEADER_BYTES)
  h.writeUInt32LE(COWD_MAGIC, 0)
  h.writeUInt32LE(1, 4)
  h.writeUInt32LE(3, 8)
  h.writeUInt32LE(sectors, 12)
  h.writeUInt32LE(grainSize, 16)
  h.writeUInt32LE(gdOffset, 20)
  h.writeUInt32LE(numGD, 24)
  h.writeUInt32LE(gdOffset + gdSectors, 28)
  h.write(parentFileName.slice(0, 1023), 32, 'latin1')
  const fh = await open(path, 'wx')
  try {
    await writeExact(fh, h, 0, h.length, 0)
    await fh.truncate((gdOffset + gdSectors) * SECTOR)
    await fh.sync()
  } finally {
    await fh.close()
  }
}

export class CowdExtent implements Extent {
  readonly kind = 'cowd' as const
  readonly problems: string[] = []
  /** fdatasync that stays failed once write-back failed (extent.ts). */
  private readonly durable: DataSync
  readonly grainBytes: number
  readonly size: number
  private readonly gd: Uint32Array
  private readonly gts: Array<Uint32Array | undefined>
  /** The grain tables as grains.ts walks them (shared lookup, runs and reads). */
  private readonly tables: GrainTables
  private allocated = 0
  /** Next free sector: never below anything a table references (VMDK.md §4.4). */
  private cursor = 0
  private readonly dirtyGTs = new Set<number>()
  private readonly newGD = new Set<number>()
  private dataDirty = false
  private readonly planned = new PlannedWrites()
  private readonly mutex = new Mutex()
  private readonly flushMutex = new Mutex()
  private unclean: number

  /**
   * The header's 2048 bytes as this extent last wrote (or read) them: while it is open writable
   * (under the store lock) nothing else writes them, so a header update need not read them first.
   */
  private readonly rawHeader: Buffer

  private constructor (readonly path: string, private readonly fh: FileHandle, readonly header: CowdHeader, rawHeader: Buffer, private fileSize: number, readonly writable: boolean) {
    this.rawHeader = Buffer.from(rawHeader)
    this.durable = new DataSync(fh, path, this.problems)
    this.grainBytes = header.grainSize * SECTOR
    this.size = header.numSectors * SECTOR
    this.gts = new Array(header.numGDEntries)
    this.gd = new Uint32Array(header.numGDEntries)
    this.unclean = header.uncleanShutdown
    this.tables = { path, size: this.size, grainBytes: this.grainBytes, perTable: COWD_GT_ENTRIES, tables: this.gts, ...SECTOR_ENTRIES }
  }

  static async open (path: string, writable = false): Promise<CowdExtent> {
    const fh = await openStoreFile(path, writable)
    try {
      const st = await fh.stat()
      noteOpened(path, st)
      const hb = Buffer.alloc(COWD_HEADER_BYTES)
      const { bytesRead } = await fh.read(hb, 0, hb.length, 0)
      const h = parseCowdHeader(hb.subarray(0, bytesRead), path)
      const ext = new CowdExtent(path, fh, h, hb, st.size, writable)
      await ext.load()
      if (ext.writable && ext.unclean !== 0) {
        // after a crash: the cursor was rebuilt from the tables; record it and mark clean
        ext.unclean = 0
        await ext.writeHeaderFields()
        await ext.durable.sync()
      }
      return ext
    } catch (e) {
      await fh.close()
      throw e
    }
  }

  private async load (): Promise<void> {
    const h = this.header
    const gdBytes = h.numGDEntries * 4
    if (h.gdOffset * SECTOR + gdBytes > this.fileSize) {
      throw new RedoError('EINVAL', `${this.path}: grain directory at sector ${h.gdOffset} lies outside the file (${this.fileSize} bytes)`, this.path)
    }
    const gdb = Buffer.alloc(gdBytes)
    await readExact(this.fh, this.path, gdb, 0, gdBytes, h.gdOffset * SECTOR)
    const limit = Math.ceil(this.fileSize / SECTOR)
    const gtBytes = COWD_GT_ENTRIES * 4
    let high = h.gdOffset + ceilDiv(gdBytes, SECTOR)
    for (let i = 0; i < h.numGDEntries; i++) {
      const s = gdb.readUInt32LE(i * 4)
      this.gd[i] = s
      if (s === 0) continue
      if (s * SECTOR + gtBytes > this.fileSize) {
        this.problems.push(`${this.path}: grain directory entry ${i} points to sector ${s}, past the end of the file`)
        this.gts[i] = new Uint32Array(COWD_GT_ENTRIES).fill(BAD)
        continue
      }
      high = Math.max(high, s + gtBytes / SECTOR)
      const b = Buffer.alloc(gtBytes)
      await readExact(this.fh, this.path, b, 0, gtBytes, s * SECTOR)
      const gt = new Uint32Array(COWD_GT_ENTRIES)
      for (let t = 0; t < COWD_GT_ENTRIES; t++) {
        const e = b.readUInt32LE(t * 4)
        const start = (i * COWD_GT_ENTRIES + t) * this.grainBytes
        if (e === 0 || start >= this.size) continue
        if (e !== 1 && e + h.grainSize > limit) {
          this.problems.push(`${this.path}: grain table ${i} entry ${t} points to sector ${e}, past the end of the file (${this.fileSize} bytes)`)
          gt[t] = BAD
          continue
        }
        gt[t] = e
        if (e !== 1) {
          this.allocated += Math.min(this.grainBytes, this.size - start)
          high = Math.max(high, e + h.grainSize)
        }
      }
      this.gts[i] = gt
    }
    this.cursor = Math.max(h.freeSector, high)
    this.findOverlaps(ceilDiv(gdBytes, SECTOR))
    if (this.writable && this.problems.length > 0) {
      // never extend a damaged file: its tables may point anywhere
      (this as { writable: boolean }).writable = false
    }
  }

  /**
   * Tables or grains over the header, the directory or each other: a write to one would
   * overwrite the other. Listed as problems, which leave the file read-only (see load).
   */
  private findOverlaps (gdSectors: number): void {
    const h = this.header
    const gtSectors = COWD_GT_ENTRIES * 4 / SECTOR
    const tables: number[] = []
    for (let i = 0; i < this.gd.length; i++) {
      const s = this.gd[i]
      if (s !== 0 && this.gts[i] !== undefined && s * SECTOR + gtSectors * SECTOR <= this.fileSize) tables.push(s)
    }
    // One bit per unit of the file, the unit being the largest power of two (up to 64 KiB) that
    // divides every start and length: one bit per grain for ESX's 512-byte grains, a few KiB of
    // bits per GiB of file otherwise. Every area was checked to lie inside the file.
    let unit = 128
    const fit = (x: number): void => { while (x % unit !== 0) unit /= 2 }
    fit(h.gdOffset + gdSectors)
    fit(gtSectors)
    fit(h.grainSize)
    for (const s of tables) fit(s)
    for (const gt of this.gts) if (gt !== undefined) for (const e of gt) if (e > 1 && e !== BAD) fit(e)
    const used = new Uint8Array(Math.ceil(this.fileSize / SECTOR / unit / 8) + 1)
    let found = 0
    const claim = (start: number, len: number, what: string): void => {
      for (let u = start / unit; u < (start + len) / unit; u++) {
        const byte = Math.floor(u / 8)
        const bit = 1 << (u % 8)
        if ((used[byte] & bit) !== 0) {
          if (found++ < 16) this.problems.push(`${this.path}: ${what} at sector ${start} overlaps the header, the grain directory, a grain table or another grain`)
          return
        }
        used[byte] |= bit
      }
    }
    claim(0, h.gdOffset + gdSectors, 'the header and grain directory')
    for (const s of tables) claim(s, gtSectors, 'a grain table')
    for (const gt of this.gts) if (gt !== undefined) for (const e of gt) if (e > 1 && e !== BAD) claim(e, h.grainSize, 'a grain')
    if (found > 16) this.problems.push(`${this.path}: ${found - 16} more overlaps`)
  }

  private entry (grain: number): number {
    return entryOf(this.tables, grain)
  }

  lookup (pos: number, len: number): { state: State, length: number } {
    return lookupGrains(this.tables, pos, len)
  }

  runs (): Run[] {
    return runsOfGrains(this.tables)
  }

  async read (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    await readGrains(this.tables, this.fh, buf, off, pos, len)
  }

  plan (p: ReadPlan, pos: number, len: number): boolean { return planGrains(this.tables, this.fh.fd, p, pos, len) }

  /**
   * An overwrite in place as a plan (Extent.planWrite): every grain it touches published (its
   * data written). Outside the allocation lock (write() takes it for overwrites too, which an
   * overwrite of a published grain does not need): a grain being allocated reads as unallocated
   * until its data is on the file, and new grains and tables go past every published one.
   */
  planWrite (p: ReadPlan, pos: number, len: number): boolean {
    if (!this.writable || !planOverwrite(this.tables, this.fh.fd, p, pos, len)) return false
    this.dataDirty = true
    this.planned.mark()
    return true
  }

  /**
   * Allocate grains (and grain tables where missing) at the cursor, write the data, and publish
   * the entries in memory; tables reach the disk at flush, after the data (VMDK.md §4.4, §9.1).
   */
  async write (buf: Buffer, off: number, pos: number, len: number, below: ReadBelow): Promise<void> {
    if (!this.writable) throw new RedoError('EROFS', `${this.path}: extent is read-only`, this.path)
    const gb = this.grainBytes
    const gsec = this.header.grainSize
    await this.mutex.run(async () => {
      const end = pos + len
      let p = pos
      let batch: Buffer[] = []
      let batchGrains: number[] = []
      let batchAt = -1
      const flushBatch = async (): Promise<void> => {
        if (batch.length === 0) return
        const bytes = batch.reduce((n, b) => n + b.length, 0)
        await writeExactv(this.fh, batch, batchAt * SECTOR)
        if (batchAt * SECTOR + bytes > this.fileSize) this.fileSize = batchAt * SECTOR + bytes
        batchGrains.forEach((grain, k) => {
          const gt = this.gts[Math.floor(grain / COWD_GT_ENTRIES)] as Uint32Array
          gt[grain % COWD_GT_ENTRIES] = batchAt + k * gsec
          this.dirtyGTs.add(Math.floor(grain / COWD_GT_ENTRIES))
          this.allocated += Math.min(gb, this.size - grain * gb)
        })
        batch = []
        batchGrains = []
        batchAt = -1
      }
      while (p < end) {
        const grain = Math.floor(p / gb)
        const gStart = grain * gb
        const inGrain = p - gStart
        const n = Math.min(end - p, gb - inGrain)
        const e = this.entry(grain)
        const bo = off + (p - pos)
        if (e === BAD) throw new RedoError('EIO', `${this.path}: grain ${grain} is damaged; not writing over it`, this.path)
        if (e > 1) {
          await flushBatch()
          await writeExact(this.fh, buf, bo, n, e * SECTOR + inGrain)
          this.dataDirty = true
        } else {
          const gdi = Math.floor(grain / COWD_GT_ENTRIES)
          if (this.gts[gdi] === undefined || this.gd[gdi] === 0) {
            // a new grain table: 32 zeroed sectors at the cursor, referenced from the GD at flush
            await flushBatch()
            this.roomFor(COWD_GT_ENTRIES * 4 / SECTOR)
            const at = this.cursor
            this.cursor += COWD_GT_ENTRIES * 4 / SECTOR
            await writeExact(this.fh, Buffer.alloc(COWD_GT_ENTRIES * 4), 0, COWD_GT_ENTRIES * 4, at * SECTOR)
            this.gd[gdi] = at
            this.gts[gdi] ??= new Uint32Array(COWD_GT_ENTRIES)
            this.newGD.add(gdi)
            this.dirtyGTs.add(gdi)
          }
          const g = await newGrain(buf, bo, n, gStart, inGrain, gb, this.size, e === 0, below)
          this.roomFor(gsec)
          if (batchAt >= 0 && batchAt + batch.length * gsec !== this.cursor) await flushBatch()
          if (batchAt < 0) batchAt = this.cursor
          this.cursor += gsec
          batch.push(g)
          batchGrains.push(grain)
          if (batch.length >= 1024) await flushBatch() // IOV_MAX
        }
        p += n
      }
      await flushBatch()
    })
  }

  /** Entries are 32-bit sector numbers: refuse to allocate where one could not name the sectors. */
  private roomFor (sectors: number): void {
    if (this.cursor + sectors > 0xfffffff0) throw new RedoError('ENOSPC', `${this.path}: the COWD file cannot grow past sector ${0xfffffff0} (its freeSector is ${this.cursor})`, this.path)
  }

  /** The header with freeSector raised to `free` (never lowered) and the unclean flag. */
  private async writeHeaderFields (free = this.cursor): Promise<void> {
    const h = this.rawHeader
    h.writeUInt32LE(Math.max(free, h.readUInt32LE(28)), 28)
    h.writeUInt32LE(this.unclean, 1648)
    faultPoint('cowd.header')
    // a copy: another update may change the fields while this write is in flight
    await writeExact(this.fh, Buffer.from(h), 0, h.length, 0)
  }

  async beginWrite (): Promise<void> {
    if (!this.writable) throw new RedoError('EROFS', `${this.path}: extent is read-only`, this.path)
    if (this.unclean !== 0) return
    this.unclean = 1
    await this.writeHeaderFields()
    await this.durable.sync()
  }

  /**
   * After allocations: freeSector raised past the new grains and tables, made durable with the
   * data; then grain tables and directory entries, and one more sync. Data alone: one sync.
   */
  async flush (): Promise<void> {
    if (!this.writable) return
    // Not under the allocation lock: the snapshot below is taken synchronously, and an entry
    // is set in memory only after its data was written, so every entry in the snapshot points
    // at data the first datasync covers. Writes go on while the tables reach the disk.
    await this.flushMutex.run(async () => {
      await this.planned.settle()
      if (this.dirtyGTs.size === 0 && !this.dataDirty) return
      const tables = [...this.dirtyGTs].map(gdi => ({ gdi, at: this.gd[gdi], bytes: Buffer.from((this.gts[gdi] as Uint32Array).slice().buffer) }))
      const dirs = [...this.newGD]
      // the directory as of now: a table allocated while this flush runs is zeroed on the disk
      // only by the next flush's first sync, so no directory sector may name it before that
      const gd = this.gd.slice()
      // every grain and table the snapshot names lies below the cursor
      const free = this.cursor
      this.dirtyGTs.clear()
      this.newGD.clear()
      // a write planned while settle() waited may land after the sync below (PlannedWrites)
      this.dataDirty = this.planned.pending
      try {
        // Only data changed (overwrites in place): every allocation dirties a table, so the
        // tables, the directory and freeSector on disk still describe the file. Otherwise
        // freeSector goes out with the data, before the first sync: a table on the disk must
        // never name sectors at or above it, or a tool that allocates there (VMware does not
        // scan the tables as redofs' open does) would put a new grain over one in use.
        if (tables.length > 0 || dirs.length > 0) await this.writeHeaderFields(free)
        await this.durable.sync()
        if (tables.length === 0 && dirs.length === 0) return
        // Tables and directory sectors, then one sync. Entries only change from "no grain" to
        // a grain (or, in the directory snapshot, a table zeroed before the sync above) that
        // is already durable: in whatever order they reach the disk, each is old or new. Their
        // order does not matter, so they go out together.
        faultPoint('cowd.gt')
        const writes = tables.map(async t => await writeExact(this.fh, t.bytes, 0, t.bytes.length, t.at * SECTOR))
        if (dirs.length > 0) {
          faultPoint('cowd.gd')
          for (const sec of new Set(dirs.map(gdi => Math.floor(gdi * 4 / SECTOR)))) {
            const b = Buffer.alloc(SECTOR)
            for (let k = 0; k < SECTOR / 4; k++) {
              const gdi = sec * (SECTOR / 4) + k
              if (gdi < gd.length) b.writeUInt32LE(gd[gdi], k * 4)
            }
            writes.push(writeExact(this.fh, b, 0, SECTOR, (this.header.gdOffset + sec) * SECTOR))
          }
        }
        await settleAll(writes)
        await this.durable.sync()
      } catch (e) {
        for (const t of tables) this.dirtyGTs.add(t.gdi)
        for (const d of dirs) this.newGD.add(d)
        this.dataDirty = true
        throw e
      }
    })
  }

  async endWrite (): Promise<void> {
    if (!this.writable) return
    await this.flush()
    if (this.unclean !== 0) {
      this.unclean = 0
      await this.writeHeaderFields()
      await this.durable.sync()
    }
  }

  async close (): Promise<void> { await this.fh.close() }
  allocatedBytes (): number { return this.allocated }

  async check (): Promise<string[]> {
    const out = [...this.problems]
    if (this.unclean !== 0 && !this.writable) out.push(`${this.path}: uncleanShutdown is set (the file was not closed cleanly)`)
    // entries into the header or directory and shared sectors were found at open (findOverlaps)
    return out
  }
}
