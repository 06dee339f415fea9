/**
 * ESX sparse extents ("COWD": vmfsSparse deltas and ESX 2.x REDO logs), VMDK.md §4.
 * Grain tables hold 4096 entries; grains are usually one sector.
 */
import { open, type FileHandle } from 'node:fs/promises'
import { RedoError } from '../errors'
import { SECTOR, ceilDiv } from '../units'
import { readExact, settleAll, type Extent, type Run, type State } from './extent'

export const COWD_MAGIC = 0x44574f43
export const COWD_HEADER_BYTES = 2048
export const COWD_GT_ENTRIES = 4096
const BAD = 0xffffffff

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

export class CowdExtent implements Extent {
  readonly kind = 'cowd' as const
  readonly problems: string[] = []
  readonly grainBytes: number
  readonly size: number
  readonly writable = false
  private readonly gts: Array<Uint32Array | undefined>
  private allocated = 0

  private constructor (readonly path: string, private readonly fh: FileHandle, readonly header: CowdHeader, private readonly fileSize: number) {
    this.grainBytes = header.grainSize * SECTOR
    this.size = header.numSectors * SECTOR
    this.gts = new Array(header.numGDEntries)
  }

  static async open (path: string): Promise<CowdExtent> {
    const fh = await open(path, 'r')
    try {
      const st = await fh.stat()
      const hb = Buffer.alloc(COWD_HEADER_BYTES)
      const { bytesRead } = await fh.read(hb, 0, hb.length, 0)
      const h = parseCowdHeader(hb.subarray(0, bytesRead), path)
      const ext = new CowdExtent(path, fh, h, st.size)
      await ext.load()
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
    for (let i = 0; i < h.numGDEntries; i++) {
      const s = gdb.readUInt32LE(i * 4)
      if (s === 0) continue
      if (s * SECTOR + gtBytes > this.fileSize) {
        this.problems.push(`${this.path}: grain directory entry ${i} points to sector ${s}, past the end of the file`)
        this.gts[i] = new Uint32Array(COWD_GT_ENTRIES).fill(BAD)
        continue
      }
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
        if (e !== 1) this.allocated += Math.min(this.grainBytes, this.size - start)
      }
      this.gts[i] = gt
    }
  }

  private entry (grain: number): number {
    const gt = this.gts[Math.floor(grain / COWD_GT_ENTRIES)]
    return gt === undefined ? 0 : gt[grain % COWD_GT_ENTRIES]
  }

  lookup (pos: number, len: number): { state: State, length: number } {
    const gb = this.grainBytes
    let grain = Math.floor(pos / gb)
    const st = stateOf(this.entry(grain))
    let length = Math.min(len, (grain + 1) * gb - pos)
    while (length < len) {
      grain++
      if (stateOf(this.entry(grain)) !== st) break
      length = Math.min(len, (grain + 1) * gb - pos)
    }
    return { state: st, length }
  }

  runs (): Run[] {
    const out: Run[] = []
    const gb = this.grainBytes
    for (let i = 0; i < this.gts.length; i++) {
      const gt = this.gts[i]
      if (gt === undefined) continue
      for (let t = 0; t < COWD_GT_ENTRIES; t++) {
        const e = gt[t]
        if (e === 0) continue
        const start = (i * COWD_GT_ENTRIES + t) * gb
        if (start >= this.size) break
        const state = e === 1 ? 'zero' : e === BAD ? 'bad' : 'data'
        const length = Math.min(gb, this.size - start)
        const last = out[out.length - 1]
        if (last !== undefined && last.state === state && last.start + last.length === start) last.length += length
        else out.push({ start, length, state })
      }
    }
    return out
  }

  async read (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    const gb = this.grainBytes
    const end = pos + len
    const reads: Array<Promise<void>> = []
    let runFile = -1
    let runBuf = 0
    let runLen = 0
    const flush = (): void => {
      if (runLen > 0) reads.push(readExact(this.fh, this.path, buf, runBuf, runLen, runFile))
      runLen = 0
    }
    for (let p = pos; p < end;) {
      const grain = Math.floor(p / gb)
      const inGrain = p - grain * gb
      const n = Math.min(end - p, gb - inGrain)
      const e = this.entry(grain)
      const bo = off + (p - pos)
      if (e === 0 || e === 1) { flush(); buf.fill(0, bo, bo + n) } else if (e === BAD) {
        flush()
        await settleAll(reads)
        throw new RedoError('EIO', `${this.path}: grain ${grain} is damaged (its table entry points past the end of the file)`, this.path)
      } else {
        const fo = e * SECTOR + inGrain
        if (runLen > 0 && runFile + runLen === fo) runLen += n
        else { flush(); runFile = fo; runBuf = bo; runLen = n }
      }
      p += n
    }
    flush()
    await settleAll(reads)
  }

  async write (): Promise<void> {
    throw new RedoError('EROFS', `${this.path}: writing COWD redo logs is not supported yet`, this.path)
  }

  async beginWrite (): Promise<void> { throw new RedoError('EROFS', `${this.path}: writing COWD redo logs is not supported yet`, this.path) }
  async flush (): Promise<void> {}
  async endWrite (): Promise<void> {}
  async close (): Promise<void> { await this.fh.close() }
  allocatedBytes (): number { return this.allocated }

  async check (): Promise<string[]> {
    const out = [...this.problems]
    if (this.header.uncleanShutdown !== 0) out.push(`${this.path}: uncleanShutdown is set (the file was not closed cleanly)`)
    return out
  }
}

function stateOf (e: number): State {
  return e === 0 ? 'none' : e === 1 ? 'zero' : e === BAD ? 'bad' : 'data'
}
