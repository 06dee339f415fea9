/**
 * SEsparse extents (VMDK.md §5): the delta format of ESXi snapshots on VMFS6, and of disks of
 * 2 TB and more on VMFS5 (`<disk>-NNNNNN-sesparse.vmdk` under a `seSparse` descriptor). Read
 * only, with qemu's checks: a constant header (u64 fields, sizes and offsets in sectors), a
 * volatile header whose journal must not need replaying, a grain directory of u64 entries
 * naming grain tables by index, and tables of 4096 u64 entries for 4 KiB grains. Entries become
 * the u32 form the other grain-table extents share (src/formats/grains.ts): 2 + an allocated
 * grain's number in the grain area (up to 16 TiB into the file), 1 for zeroed (and
 * SCSI-unmapped) grains, BAD for damage.
 */
import type { FileHandle } from 'node:fs/promises'
import { RedoError } from '../errors'
import { SECTOR, ceilDiv } from '../units'
import { noteOpened, openStoreFile, readExact, type Extent, type ReadPlan, type Run, type State } from './extent'
import { BAD, lookupGrains, planGrains, readGrains, runsOfGrains, type GrainTables } from './grains'
import { u64 } from './sparse'

export const SESPARSE_MAGIC = 0xcafebabe
const VOLATILE_MAGIC = 0xcafecafe
const VERSION_2_1 = 0x0000000200000001n
const GRAIN_SECTORS = 8
const GT_SECTORS = 64
const PER_TABLE = GT_SECTORS * SECTOR / 8
/** Table entries hold 2 + the grain's number in the grain area (0 and 1 mean none and zero). */
const BIAS = 2
/** Grain directory entries name an allocated table with these top 32 bits. */
const GD_ALLOCATED = 0x10000000

interface ConstHeader {
  capacity: number
  volatileOffset: number
  gdOffset: number
  gdSize: number
  gtOffset: number
  gtSize: number
  grainsOffset: number
  grainsSize: number
}

function parseConstHeader (b: Buffer, path: string): ConstHeader {
  if (b.length < SECTOR || b.readBigUInt64LE(0) !== BigInt(SESPARSE_MAGIC)) throw new RedoError('EINVAL', `${path}: not an SEsparse extent (bad magic)`, path)
  const version = b.readBigUInt64LE(8)
  if (version !== VERSION_2_1) throw new RedoError('ENOTSUP', `${path}: SEsparse version 0x${version.toString(16)} is not supported (2.1 is)`, path)
  const grainSize = u64(b, 24, 'grainSize', path)
  if (grainSize !== GRAIN_SECTORS) throw new RedoError('ENOTSUP', `${path}: SEsparse grains of ${grainSize} sectors are not supported (8 are)`, path)
  const gtSectors = u64(b, 32, 'grain table size', path)
  if (gtSectors !== GT_SECTORS) throw new RedoError('ENOTSUP', `${path}: SEsparse grain tables of ${gtSectors} sectors are not supported (64 are)`, path)
  if (b.readBigUInt64LE(40) !== 0n) throw new RedoError('ENOTSUP', `${path}: SEsparse flags 0x${b.readBigUInt64LE(40).toString(16)} are not supported`, path)
  for (let at = 48; at < 80; at += 8) {
    if (b.readBigUInt64LE(at) !== 0n) throw new RedoError('ENOTSUP', `${path}: SEsparse reserved field at byte ${at} is not zero`, path)
  }
  if (!b.subarray(208, SECTOR).every(x => x === 0)) throw new RedoError('ENOTSUP', `${path}: SEsparse header padding is not zero`, path)
  return {
    capacity: u64(b, 16, 'capacity', path),
    volatileOffset: u64(b, 80, 'volatile header offset', path),
    gdOffset: u64(b, 128, 'grain directory offset', path),
    gdSize: u64(b, 136, 'grain directory size', path),
    gtOffset: u64(b, 144, 'grain tables offset', path),
    gtSize: u64(b, 152, 'grain tables size', path),
    grainsOffset: u64(b, 192, 'grains offset', path),
    grainsSize: u64(b, 200, 'grains size', path)
  }
}

export class SeSparseExtent implements Extent {
  readonly kind = 'sesparse'
  readonly writable = false
  readonly grainBytes = GRAIN_SECTORS * SECTOR
  readonly problems: string[] = []
  private readonly tables: GrainTables
  private allocated = 0

  private constructor (readonly path: string, private readonly fh: FileHandle, readonly size: number, grainsOffset: number, tables: Array<Uint32Array | undefined>) {
    this.tables = { path, size, grainBytes: this.grainBytes, perTable: PER_TABLE, tables, base: grainsOffset * SECTOR, bias: BIAS, unit: GRAIN_SECTORS * SECTOR }
  }

  static async open (path: string): Promise<SeSparseExtent> {
    const fh = await openStoreFile(path)
    try {
      const st = await fh.stat()
      noteOpened(path, st)
      const fileSize = st.size
      const hb = Buffer.alloc(SECTOR)
      await readExact(fh, path, hb, 0, SECTOR, 0)
      const h = parseConstHeader(hb, path)
      const vb = Buffer.alloc(SECTOR)
      await readExact(fh, path, vb, 0, SECTOR, h.volatileOffset * SECTOR)
      if (vb.readBigUInt64LE(0) !== BigInt(VOLATILE_MAGIC)) throw new RedoError('EINVAL', `${path}: SEsparse volatile header has a bad magic`, path)
      if (!vb.subarray(32).every(x => x === 0)) throw new RedoError('ENOTSUP', `${path}: SEsparse volatile header padding is not zero`, path)
      if (vb.readBigUInt64LE(24) !== 0n) throw new RedoError('EINVAL', `${path}: SEsparse journal needs replaying (the snapshot was not closed cleanly): open the disk in ESXi once, which replays it`, path)
      const numGTs = ceilDiv(h.capacity, PER_TABLE * GRAIN_SECTORS)
      if (h.gdSize * SECTOR / 8 < numGTs) throw new RedoError('EINVAL', `${path}: SEsparse grain directory of ${h.gdSize} sectors is too small for ${h.capacity} sectors`, path)
      if ((h.gdOffset + h.gdSize) * SECTOR > fileSize) throw new RedoError('EINVAL', `${path}: SEsparse grain directory lies outside the file (${fileSize} bytes)`, path)
      const gd = Buffer.alloc(numGTs * 8)
      await readExact(fh, path, gd, 0, gd.length, h.gdOffset * SECTOR)
      const ext = new SeSparseExtent(path, fh, h.capacity * SECTOR, h.grainsOffset, new Array<Uint32Array | undefined>(numGTs))
      await ext.load(h, gd, fileSize)
      return ext
    } catch (e) {
      await fh.close()
      throw e
    }
  }

  /** Read every allocated grain table into the shared u32 form; damage becomes BAD entries. */
  private async load (h: ConstHeader, gd: Buffer, fileSize: number): Promise<void> {
    const tables = this.tables.tables as Array<Uint32Array | undefined>
    const raw = Buffer.alloc(GT_SECTORS * SECTOR)
    const problem = (msg: string): void => {
      if (this.problems.length < 16) this.problems.push(`${this.path}: ${msg}`)
      else if (this.problems.length === 16) this.problems.push(`${this.path}: more problems`)
    }
    for (let i = 0; i < tables.length; i++) {
      const hi = gd.readUInt32LE(i * 8 + 4)
      const index = gd.readUInt32LE(i * 8)
      if (hi === 0 && index === 0) continue
      const t = new Uint32Array(PER_TABLE)
      tables[i] = t
      const at = (h.gtOffset + index * GT_SECTORS) * SECTOR
      if (hi !== GD_ALLOCATED || index * GT_SECTORS >= h.gtSize || at + raw.length > fileSize) {
        problem(`grain directory entry ${i} (0x${hi.toString(16)}${index.toString(16).padStart(8, '0')}) names no grain table in the file`)
        t.fill(BAD)
        continue
      }
      await readExact(this.fh, this.path, raw, 0, raw.length, at)
      for (let k = 0; k < PER_TABLE; k++) {
        const lo = raw.readUInt32LE(k * 8)
        const top = raw.readUInt32LE(k * 8 + 4)
        const type = top >>> 28
        if (type === 0) {
          if (lo !== 0 || top !== 0) { problem(`grain ${i * PER_TABLE + k}: unallocated entry with bits set`); t[k] = BAD }
        } else if (type === 1 || type === 2) {
          t[k] = 1 // zeroed; SCSI-unmapped grains read as zeros too, as qemu reads them
        } else if (type === 3) {
          // grain index: bits 48..59 of the entry are its low 12 bits, bits 0..47 the rest
          const index = ((top >>> 16) & 0xfff) + (lo + (top & 0xffff) * 2 ** 32) * 4096
          const sector = h.grainsOffset + index * GRAIN_SECTORS
          if (index * GRAIN_SECTORS >= h.grainsSize || sector < 2 || (sector + GRAIN_SECTORS) * SECTOR > fileSize) {
            problem(`grain ${i * PER_TABLE + k} lies outside the file's grain area`)
            t[k] = BAD
          } else if (index + BIAS >= BAD) {
            problem(`grain ${i * PER_TABLE + k} lies past 16 TiB into the grain area, which redofs does not read`)
            t[k] = BAD
          } else {
            t[k] = index + BIAS
            this.allocated += this.grainBytes
          }
        } else {
          problem(`grain ${i * PER_TABLE + k}: unknown entry type ${type}`)
          t[k] = BAD
        }
      }
    }
  }

  lookup (pos: number, len: number): { state: State, length: number } { return lookupGrains(this.tables, pos, len) }
  runs (): Run[] { return runsOfGrains(this.tables) }
  async read (buf: Buffer, off: number, pos: number, len: number): Promise<void> { await readGrains(this.tables, this.fh, buf, off, pos, len) }
  plan (p: ReadPlan, pos: number, len: number): boolean { return planGrains(this.tables, this.fh.fd, p, pos, len) }

  async write (): Promise<void> { throw new RedoError('EROFS', `${this.path}: SEsparse extents are read-only (add a redo log above to write)`, this.path) }
  async beginWrite (): Promise<void> { await this.write() }
  async flush (): Promise<void> {}
  async endWrite (): Promise<void> {}
  async close (): Promise<void> { await this.fh.close() }
  allocatedBytes (): number { return this.allocated }

  async check (): Promise<string[]> {
    const out = [...this.problems]
    // two entries naming one grain: a write through either would change both
    const seen = new Map<number, number>()
    this.tables.tables.forEach((t, i) => t?.forEach((e, k) => {
      if (e <= 1 || e === BAD) return
      const g = i * PER_TABLE + k
      const other = seen.get(e)
      if (other !== undefined && out.length < 32) out.push(`${this.path}: grains ${other} and ${g} share grain ${e - BIAS} of the grain area`)
      seen.set(e, g)
    }))
    return out
  }
}
