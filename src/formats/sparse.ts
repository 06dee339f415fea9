/**
 * Hosted sparse extents ("KDMV": monolithicSparse, twoGbMaxExtentSparse pieces, streamOptimized).
 * Layout and rules: VMDK.md §3 and §9. Grain tables are kept in memory only where they hold
 * something, so memory follows allocation, not capacity.
 */
import { createHash } from 'node:crypto'
import { open, unlink, type FileHandle } from 'node:fs/promises'
import { basename, dirname } from 'node:path'
import { inflateSync } from 'node:zlib'
import { RedoError } from '../errors'
import { delayPoint, faultPoint } from '../fault'
import { log } from '../log'
import { SECTOR, ceilDiv, roundUp } from '../units'
import { DataSync, Mutex, PlannedWrites, newGrain, noteOpened, openStoreFile, readExact, readIfExists, settleAll, syncDir, writeExact, writeExactv, writeFileDurable, type Extent, type ReadBelow, type ReadPlan, type Run, type State } from './extent'
import { DirectWriter } from './direct'
import { BAD, SECTOR_ENTRIES, entryOf, lookupGrains, overwriteGrains, planGrains, planOverwrite, readGrains, runsOfGrains, type GrainTables } from './grains'

export const KDMV_MAGIC = 0x564d444b
const GD_AT_END = 0xffffffffffffffffn
const FLAG_NEWLINE = 0x1
const FLAG_REDUNDANT = 0x2
const FLAG_ZERO_GTE = 0x4
const FLAG_COMPRESSED = 0x10000
const FLAG_MARKERS = 0x20000
const KNOWN_INCOMPAT = FLAG_COMPRESSED | FLAG_MARKERS
/** Largest chunk read at once while loading grain tables. */
const GT_READ_CHUNK = 8 << 20

export interface SparseHeader {
  version: number
  flags: number
  capacity: number // sectors
  grainSize: number // sectors
  descriptorOffset: number
  descriptorSize: number
  numGTEsPerGT: number
  rgdOffset: number
  gdOffset: number
  overHead: number
  uncleanShutdown: number
  compressAlgorithm: number
}

export function u64 (buf: Buffer, off: number, what: string, path: string): number {
  const v = buf.readBigUInt64LE(off)
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new RedoError('EINVAL', `${path}: header field ${what} is out of range (${v})`, path)
  return Number(v)
}

export function parseSparseHeader (buf: Buffer, path: string): SparseHeader & { gdAtEnd: boolean } {
  if (buf.length < 512) throw new RedoError('EINVAL', `${path}: truncated sparse header (${buf.length} bytes, need 512)`, path)
  if (buf.readUInt32LE(0) !== KDMV_MAGIC) throw new RedoError('EINVAL', `${path}: bad magic, not a hosted sparse extent`, path)
  const gdRaw = buf.readBigUInt64LE(56)
  return {
    version: buf.readUInt32LE(4),
    flags: buf.readUInt32LE(8),
    capacity: u64(buf, 12, 'capacity', path),
    grainSize: u64(buf, 20, 'grainSize', path),
    descriptorOffset: u64(buf, 28, 'descriptorOffset', path),
    descriptorSize: u64(buf, 36, 'descriptorSize', path),
    numGTEsPerGT: buf.readUInt32LE(44),
    rgdOffset: u64(buf, 48, 'rgdOffset', path),
    gdOffset: gdRaw === GD_AT_END ? 0 : u64(buf, 56, 'gdOffset', path),
    gdAtEnd: gdRaw === GD_AT_END,
    overHead: u64(buf, 64, 'overHead', path),
    uncleanShutdown: buf[72],
    compressAlgorithm: buf.readUInt16LE(77)
  }
}

export function encodeSparseHeader (h: SparseHeader): Buffer {
  const b = Buffer.alloc(512)
  b.writeUInt32LE(KDMV_MAGIC, 0)
  b.writeUInt32LE(h.version, 4)
  b.writeUInt32LE(h.flags, 8)
  b.writeBigUInt64LE(BigInt(h.capacity), 12)
  b.writeBigUInt64LE(BigInt(h.grainSize), 20)
  b.writeBigUInt64LE(BigInt(h.descriptorOffset), 28)
  b.writeBigUInt64LE(BigInt(h.descriptorSize), 36)
  b.writeUInt32LE(h.numGTEsPerGT, 44)
  b.writeBigUInt64LE(BigInt(h.rgdOffset), 48)
  b.writeBigUInt64LE(BigInt(h.gdOffset), 56)
  b.writeBigUInt64LE(BigInt(h.overHead), 64)
  b[72] = h.uncleanShutdown
  b[73] = 0x0a; b[74] = 0x20; b[75] = 0x0d; b[76] = 0x0a
  b.writeUInt16LE(h.compressAlgorithm, 77)
  return b
}

function validateHeader (h: SparseHeader, path: string): void {
  const bad = (what: string): never => { throw new RedoError('EINVAL', `${path}: corrupt sparse header: ${what}`, path) }
  if (h.version < 1 || h.version > 3) bad(`unsupported version ${h.version}`)
  if ((h.flags & 0xffff0000 & ~KNOWN_INCOMPAT) !== 0) bad(`unknown incompatible flags 0x${(h.flags >>> 0).toString(16)}`)
  if (h.grainSize < 1 || h.grainSize > 0x200000 || (h.grainSize & (h.grainSize - 1)) !== 0) bad(`grain size ${h.grainSize} sectors is not a power of two up to 2^21`)
  if (h.numGTEsPerGT < 1 || h.numGTEsPerGT > 4096 || (h.numGTEsPerGT & (h.numGTEsPerGT - 1)) !== 0) bad(`${h.numGTEsPerGT} entries per grain table`)
  if (h.capacity <= 0) bad(`capacity ${h.capacity}`)
  if (h.capacity > 2 ** 40) bad(`capacity ${h.capacity} sectors is beyond what 32-bit grain tables address`)
  if ((h.flags & FLAG_COMPRESSED) !== 0 && h.compressAlgorithm !== 1) bad(`compression algorithm ${h.compressAlgorithm}`)
}

export interface SparseLayout {
  header: SparseHeader
  numGTs: number
  gdSectors: number
  gtSectors: number
}

/** Layout of a new extent, as qemu and VMware lay it out (VMDK.md §3.4). */
export function sparseLayout (sectors: number, descriptorSectors: number): SparseLayout {
  const grainSize = 128
  const numGTEsPerGT = 512
  const grains = ceilDiv(sectors, grainSize)
  const numGTs = ceilDiv(grains, numGTEsPerGT)
  const gtSectors = ceilDiv(numGTEsPerGT * 4, SECTOR)
  const gdSectors = ceilDiv(numGTs * 4, SECTOR)
  const descriptorOffset = descriptorSectors > 0 ? 1 : 0
  const rgdOffset = descriptorSectors > 0 ? descriptorOffset + descriptorSectors : 1
  const gdOffset = rgdOffset + gdSectors + numGTs * gtSectors
  const overHead = roundUp(gdOffset + gdSectors + numGTs * gtSectors, grainSize)
  return {
    header: {
      version: 1, flags: FLAG_NEWLINE | FLAG_REDUNDANT, capacity: sectors, grainSize,
      descriptorOffset, descriptorSize: descriptorSectors, numGTEsPerGT, rgdOffset, gdOffset, overHead,
      uncleanShutdown: 0, compressAlgorithm: 0
    },
    numGTs, gdSectors, gtSectors
  }
}

/**
 * Write a complete empty sparse extent at `path` (which must not be in use): header, optional
 * embedded descriptor, redundant and primary directories with preallocated zeroed tables.
 */
export async function createSparseFile (path: string, sectors: number, descriptor?: string): Promise<void> {
  if (sectors > 2 ** 32) throw new RedoError('EINVAL', `${path}: a hosted sparse extent cannot exceed 2 TiB (use a split disk)`, path)
  const descSectors = descriptor !== undefined ? Math.max(20, ceilDiv(Buffer.byteLength(descriptor) + 1, SECTOR)) : 0
  const { header, numGTs, gdSectors, gtSectors } = sparseLayout(sectors, descSectors)
  const fh = await open(path, 'wx')
  try {
    await writeExact(fh, encodeSparseHeader(header), 0, 512, 0)
    if (descriptor !== undefined) {
      const area = Buffer.alloc(descSectors * SECTOR)
      area.write(descriptor, 0, 'utf8')
      await writeExact(fh, area, 0, area.length, header.descriptorOffset * SECTOR)
    }
    for (const dirOff of [header.rgdOffset, header.gdOffset]) {
      const gd = Buffer.alloc(gdSectors * SECTOR)
      for (let i = 0; i < numGTs; i++) gd.writeUInt32LE(dirOff + gdSectors + i * gtSectors, i * 4)
      await writeExact(fh, gd, 0, gd.length, dirOff * SECTOR)
    }
    // the grain tables stay zero: a hole up to overHead
    await fh.truncate(header.overHead * SECTOR)
    await fh.sync()
  } finally {
    await fh.close()
  }
}

/**
 * The embedded descriptor is rewritten in place (there is no second area to switch to), and a
 * power loss in the middle of that write could leave half of a new descriptor over half of the
 * old one. So the new area is first written whole to `<extent>.redofs-desc` (write-new-then-
 * rename, durable) together with the area it replaces, its position and a checksum; the
 * in-place write follows and the file is deleted once that is durable. Once the intent file is
 * durable the change is made: an open that finds it compares the area with the two copies.
 * Every sector old or new (untouched, or torn by a crash): the new one is the descriptor; a
 * writable open writes it in place again (idempotent) and deletes the file, a read-only one
 * reads the descriptor from it. Anything else means the file was replaced or rewritten by
 * another tool since: the intent is stale and ignored (a writable open deletes it). An intent
 * file that fails its checksum was cut short before the area was touched.
 */
export const descriptorIntentPath = (path: string): string => `${path}.redofs-desc`
const INTENT_MAGIC = 'redofs-desc 2'

function encodeIntent (sector: number, before: Buffer, after: Buffer): Buffer {
  const body = Buffer.concat([after, before])
  const sum = createHash('sha256').update(body).digest('hex')
  return Buffer.concat([Buffer.from(`${INTENT_MAGIC} ${sector} ${after.length} ${sum}\n`), body])
}

export type Intent =
  | { kind: 'apply', area: Buffer } // the area is old, new or torn between them: the new one holds
  | { kind: 'done' } // the area already is the new one
  | { kind: 'stale', why: string } // not for this area (any more)

/**
 * What an interrupted rewrite left for the descriptor `area` read from the file at `sector`:
 * undefined when there is no intent file.
 */
export async function descriptorIntent (path: string, sector: number, area: Buffer): Promise<Intent | undefined> {
  const raw = await readIfExists(descriptorIntentPath(path))
  if (raw === undefined) return undefined
  const nl = raw.indexOf(0x0a)
  const head = nl < 0 ? [] : raw.subarray(0, nl).toString('latin1').split(' ')
  const body = raw.subarray(nl + 1)
  const bytes = area.length
  if (head.length !== 5 || `${head[0]} ${head[1]}` !== INTENT_MAGIC || body.length !== 2 * bytes ||
      createHash('sha256').update(body).digest('hex') !== head[4]) return { kind: 'stale', why: 'cut short before the area was written' }
  if (Number(head[2]) !== sector || Number(head[3]) !== bytes) return { kind: 'stale', why: 'written for another descriptor area' }
  const after = body.subarray(0, bytes)
  const before = body.subarray(bytes)
  if (area.equals(after)) return { kind: 'done' }
  for (let o = 0; o < bytes; o += SECTOR) {
    const cur = area.subarray(o, o + SECTOR)
    if (!cur.equals(after.subarray(o, o + SECTOR)) && !cur.equals(before.subarray(o, o + SECTOR))) {
      return { kind: 'stale', why: 'the descriptor changed since (another tool, or a new file of the same name)' }
    }
  }
  return { kind: 'apply', area: Buffer.from(after) }
}

export class SparseExtent implements Extent {
  readonly kind: 'sparse' | 'stream'
  readonly problems: string[] = []
  /** fdatasync that stays failed once write-back failed (extent.ts). */
  private readonly durable: DataSync
  readonly grainBytes: number
  readonly size: number
  readonly header: SparseHeader
  private readonly gd: Uint32Array
  private readonly rgd: Uint32Array | null
  /** Grain tables that hold at least one entry; undefined elsewhere. */
  private readonly gts: Array<Uint32Array | undefined>
  /** The grain tables as grains.ts walks them (shared lookup, runs and reads). */
  private readonly tables: GrainTables
  private readonly numGTs: number
  private readonly gtBytes: number
  private fileSize: number
  private nextAlloc: number
  private readonly dirtyGTs = new Set<number>()
  private dataDirty = false
  private readonly planned = new PlannedWrites()
  private allocated = 0
  /** Entries of 1 (zeroed grain) in a file without the zeroed-grain flag: read as zeros, listed by check. */
  private strayZeroEntries = 0
  private readonly mutex = new Mutex()
  private readonly flushMutex = new Mutex()
  /** Direct-I/O writer for new grains: undefined until the first allocation, null if refused. */
  private direct: DirectWriter | null | undefined = undefined
  private streamCache = new Map<number, Buffer>()
  /** On-disk values of entries held as BAD in memory: flushes write these back, never BAD. */
  private readonly badOriginal = new Map<number, number>()
  /** Tables whose directory entry points outside the file: never written. */
  private readonly badTables = new Set<number>()
  /** Redundant directory entries that point outside the metadata area: never written, never trusted. */
  private readonly badRedundant = new Set<number>()
  /**
   * Grains held BAD because their entry points into the metadata area or shares sectors with
   * another grain: damage, not the trace of a crash, so recovery leaves them alone.
   */
  private readonly heldDamage = new Set<number>()
  /** Problems that recovery of an unclean shutdown does not repair (damage, not a crash trace). */
  private readonly lasting: string[] = []
  /** Descriptor area from an interrupted rewrite that a read-only open could not apply. */
  private pendingDescriptor: Buffer | undefined

  private constructor (
    readonly path: string,
    private readonly fh: FileHandle,
    header: SparseHeader,
    fileSize: number,
    gd: Uint32Array,
    rgd: Uint32Array | null,
    readonly writable: boolean
  ) {
    this.durable = new DataSync(fh, path, this.problems)
    this.header = header
    this.kind = (header.flags & FLAG_COMPRESSED) !== 0 ? 'stream' : 'sparse'
    this.grainBytes = header.grainSize * SECTOR
    this.size = header.capacity * SECTOR
    this.gd = gd
    this.rgd = rgd
    this.numGTs = gd.length
    this.gts = new Array(gd.length)
    this.gtBytes = header.numGTEsPerGT * 4
    this.fileSize = fileSize
    this.nextAlloc = roundUp(Math.max(fileSize, header.overHead * SECTOR), this.grainBytes)
    this.tables = { path, size: this.size, grainBytes: this.grainBytes, perTable: header.numGTEsPerGT, tables: this.gts, ...SECTOR_ENTRIES }
  }

  /** Open the extent file `path`, or reuse `fh` when the descriptor already opened it. */
  static async open (path: string, writable: boolean, fh?: FileHandle): Promise<SparseExtent> {
    const own = fh === undefined
    const handle = fh ?? await openStoreFile(path, writable)
    try {
      const st = await handle.stat()
      noteOpened(path, st)
      await delayPoint('extent.open', path)
      const hbuf = Buffer.alloc(512)
      const { bytesRead } = await handle.read(hbuf, 0, 512, 0)
      let h = parseSparseHeader(hbuf.subarray(0, bytesRead), path)
      if (h.gdAtEnd) {
        // true stream layout: the footer (a header copy with the real gdOffset) sits at EOF-1024
        if (st.size < 1536) throw new RedoError('EINVAL', `${path}: stream file too short for its footer`, path)
        const fbuf = Buffer.alloc(512)
        await readExact(handle, path, fbuf, 0, 512, st.size - 1024)
        const footer = parseSparseHeader(fbuf, path)
        if (footer.gdAtEnd) throw new RedoError('EINVAL', `${path}: stream footer has no grain directory offset`, path)
        h = { ...h, gdOffset: footer.gdOffset, rgdOffset: footer.rgdOffset }
      }
      validateHeader(h, path)
      const compressed = (h.flags & FLAG_COMPRESSED) !== 0
      if (compressed && writable) writable = false
      if (h.version === 3 && !compressed) writable = false // VMware ties v3 to CBT; qemu opens it read-only too
      const grains = ceilDiv(h.capacity, h.grainSize)
      const numGTs = ceilDiv(grains, h.numGTEsPerGT)
      if (numGTs > 1 << 25) throw new RedoError('EINVAL', `${path}: grain directory of ${numGTs} entries is too large`, path)
      const gdBytes = numGTs * 4
      if (h.gdOffset === 0 || h.gdOffset * SECTOR + gdBytes > st.size) {
        throw new RedoError('EINVAL', `${path}: grain directory at sector ${h.gdOffset} lies outside the file (${st.size} bytes)`, path)
      }
      const gdBuf = Buffer.alloc(gdBytes)
      await readExact(handle, path, gdBuf, 0, gdBytes, h.gdOffset * SECTOR)
      const gd = new Uint32Array(numGTs)
      for (let i = 0; i < numGTs; i++) gd[i] = gdBuf.readUInt32LE(i * 4)
      let rgd: Uint32Array | null = null
      if ((h.flags & FLAG_REDUNDANT) !== 0 && h.rgdOffset !== 0 && h.rgdOffset * SECTOR + gdBytes <= st.size) {
        const rBuf = Buffer.alloc(gdBytes)
        await readExact(handle, path, rBuf, 0, gdBytes, h.rgdOffset * SECTOR)
        rgd = new Uint32Array(numGTs)
        for (let i = 0; i < numGTs; i++) rgd[i] = rBuf.readUInt32LE(i * 4)
      }
      const ext = new SparseExtent(path, handle, h, st.size, gd, rgd, writable)
      await ext.finishDescriptorRewrite()
      await ext.loadTables(handle)
      if (ext.writable && h.uncleanShutdown !== 0) await ext.recover()
      ext.readOnlyIfPastEnd()
      return ext
    } catch (e) {
      if (own) await handle.close()
      throw e
    }
  }

  /** Read every grain table (in large chunks) and keep the non-empty ones. */
  private async loadTables (fh: FileHandle): Promise<void> {
    const gtBytes = this.gtBytes
    const h = this.header
    // In a hosted sparse extent every table lies in the metadata area, below overHead, and every
    // grain above it (VMDK.md §3.4). Anything else would make a write or a flush overwrite
    // metadata or another grain's data. Only enforced where overHead covers the grain directory.
    const metaEnd = this.kind === 'sparse' && h.overHead > h.gdOffset ? h.overHead : Infinity
    const gtSectors = ceilDiv(gtBytes, SECTOR)
    const listed: number[] = []
    for (let i = 0; i < this.numGTs; i++) {
      const s = this.gd[i]
      if (s === 0) continue
      const where = s * SECTOR + gtBytes > this.fileSize ? 'past the end of the file' : s + gtSectors > metaEnd ? `outside the metadata area (which ends at sector ${metaEnd})` : undefined
      if (where !== undefined) {
        this.damage(`${this.path}: grain directory entry ${i} points to sector ${s}, ${where}`)
        const t = new Uint32Array(this.header.numGTEsPerGT).fill(BAD)
        this.gts[i] = t
        this.badTables.add(i)
        continue
      }
      listed.push(i)
    }
    if (this.rgd !== null) {
      // readers use the primary only (as qemu and VMware do): a bad redundant entry is listed by
      // check, and simply never written or used by recovery
      for (let i = 0; i < this.numGTs; i++) {
        const r = this.rgd[i]
        if (r !== 0 && (r * SECTOR + gtBytes > this.fileSize || r + gtSectors > metaEnd)) this.badRedundant.add(i)
      }
    }
    if (this.kind === 'sparse') this.holdMetadataOverlaps()
    const order = listed.filter(i => !this.badTables.has(i)).sort((a, b) => this.gd[a] - this.gd[b])
    const limitGte = Math.ceil(this.fileSize / SECTOR)
    const zeroGteAllowed = (this.header.flags & FLAG_ZERO_GTE) !== 0
    const gb = this.grainBytes
    let chunk = Buffer.alloc(0)
    let k = 0
    while (k < order.length) {
      // group tables lying back to back on disk into one read
      let j = k + 1
      const first = this.gd[order[k]] * SECTOR
      while (j < order.length && this.gd[order[j]] * SECTOR === first + (j - k) * gtBytes && (j - k + 1) * gtBytes <= GT_READ_CHUNK) j++
      const len = (j - k) * gtBytes
      if (chunk.length < len) chunk = Buffer.allocUnsafe(Math.max(len, Math.min(GT_READ_CHUNK, order.length * gtBytes)))
      const buf = chunk.subarray(0, len)
      await readExact(fh, this.path, buf, 0, len, first)
      for (let m = k; m < j; m++) {
        const gdi = order[m]
        const view = new Uint32Array(buf.buffer, buf.byteOffset + (m - k) * gtBytes, this.header.numGTEsPerGT)
        let any = false
        for (let t = 0; t < view.length; t++) if (view[t] !== 0) { any = true; break }
        if (!any) continue
        const gt = Uint32Array.from(view)
        for (let t = 0; t < gt.length; t++) {
          const e = gt[t]
          if (e === 0) continue
          const grain = gdi * this.header.numGTEsPerGT + t
          if (grain * gb >= this.size) { gt[t] = 0; continue } // entries past the capacity mean nothing
          if (e === 1) { if (!zeroGteAllowed) this.strayZeroEntries++; continue }
          const need = this.kind === 'stream' ? 1 : ceilDiv(Math.min(gb, this.size - grain * gb), SECTOR)
          const pastEnd = e === BAD || e + need > limitGte
          if (pastEnd || (metaEnd !== Infinity && e < h.overHead)) {
            const msg = `${this.path}: grain table ${gdi} entry ${t} points to sector ${e}, `
            // past the end: what a crash leaves (recovery drops it); inside the metadata: damage
            if (pastEnd) this.problems.push(msg + `past the end of the file (${this.fileSize} bytes)`)
            else { this.damage(msg + `inside the metadata area (below sector ${h.overHead})`); this.heldDamage.add(grain) }
            this.badOriginal.set(grain, e)
            gt[t] = BAD
            continue
          }
          this.allocated += Math.min(gb, this.size - grain * gb)
        }
        this.gts[gdi] = gt
      }
      k = j
    }
    if (this.kind === 'sparse') this.holdOverlaps()
  }

  /**
   * Every sector range in use: header, descriptor, both directories and all their tables, and
   * every grain the primary tables name (held damaged ones too). Sorted by start, with the
   * running maximum of their ends, so a range is free when the last one starting below its end
   * has a running end at or below its start.
   */
  private usedSectors (): { starts: Float64Array, maxEnds: Float64Array } {
    const per = this.header.numGTEsPerGT
    const gb = this.grainBytes
    // each range as start * 2^21 + (length - 1) (starts below 2^32, lengths up to 2^21 sectors:
    // exact below 2^53): one native numeric sort, 8 bytes a range
    const SHIFT = 2 ** 21
    let n = 4 + 2 * this.numGTs
    for (const gt of this.gts) if (gt !== undefined) n += gt.length
    const v = new Float64Array(n)
    let k = 0
    const add = (start: number, len: number): void => { if (len > 0) v[k++] = start * SHIFT + Math.min(len, SHIFT) - 1 }
    this.metadataAreas(false, add)
    this.gts.forEach((gt, gdi) => {
      if (gt === undefined || this.badTables.has(gdi)) return
      for (let t = 0; t < per; t++) {
        const grain = gdi * per + t
        const e = gt[t] === BAD ? (this.heldDamage.has(grain) ? this.badOriginal.get(grain) ?? 0 : 0) : gt[t]
        if (e > 1) add(e, ceilDiv(Math.min(gb, this.size - grain * gb), SECTOR))
      }
    })
    const sorted = v.subarray(0, k).sort()
    const starts = new Float64Array(k)
    const maxEnds = new Float64Array(k)
    let m = 0
    for (let x = 0; x < k; x++) {
      const start = Math.floor(sorted[x] / SHIFT)
      starts[x] = start
      m = Math.max(m, sorted[x] - start * SHIFT + 1 + start)
      maxEnds[x] = m
    }
    return { starts, maxEnds }
  }

  /**
   * A writable open that finds entries pointing past the end of the file, which recovery did
   * not drop because the file was closed cleanly (a truncated copy, or a tool that crashed
   * without the flag): new grains are appended there, so such an entry would come to name a
   * new grain, or a hole that reads as zeros, instead of failing. Served read-only instead,
   * with the problems listed (as a damaged COWD file is).
   */
  private readOnlyIfPastEnd (): void {
    if (!this.writable) return
    const gtBytes = ceilDiv(this.gtBytes, SECTOR) * SECTOR
    const past = (sector: number, bytes: number): boolean => sector * SECTOR + bytes > this.fileSize
    const held = [...this.badOriginal].some(([grain, e]) => !this.heldDamage.has(grain) && past(e, this.grainBytes)) ||
      [...this.badTables].some(i => past(this.gd[i], gtBytes)) ||
      (this.rgd !== null && [...this.badRedundant].some(i => past((this.rgd as Uint32Array)[i], gtBytes)))
    if (!held) return
    (this as { writable: boolean }).writable = false
    this.damage(`${this.path}: opened read-only: entries point past the end of the file (truncated?), and new grains would be written where they point`)
  }

  /**
   * Every metadata area as (start sector, sectors, kind, table index): the header and the
   * descriptor (kind 0, index -1), the redundant directory (2, -1) and its tables (2, i), the
   * primary directory (0, -1) and its tables (1, i), in the order qemu and VMware lay them out.
   * `usable`: without the tables already set aside (badTables, badRedundant).
   */
  private metadataAreas (usable: boolean, add: (start: number, sectors: number, kind: 0 | 1 | 2, i: number) => void): void {
    const h = this.header
    const gtSectors = ceilDiv(this.gtBytes, SECTOR)
    const gdSectors = ceilDiv(this.numGTs * 4, SECTOR)
    add(0, 1, 0, -1)
    if (h.descriptorSize > 0) add(h.descriptorOffset, h.descriptorSize, 0, -1)
    const rgd = this.rgd
    if (rgd !== null) {
      add(h.rgdOffset, gdSectors, 2, -1)
      for (let i = 0; i < this.numGTs; i++) if (rgd[i] !== 0 && !(usable && this.badRedundant.has(i))) add(rgd[i], gtSectors, 2, i)
    }
    add(h.gdOffset, gdSectors, 0, -1)
    for (let i = 0; i < this.numGTs; i++) if (this.gd[i] !== 0 && !(usable && this.badTables.has(i))) add(this.gd[i], gtSectors, 1, i)
  }

  /**
   * Grain tables (either copy) sharing sectors with the header, the descriptor, a directory or
   * another table: a flush of one would overwrite the other. Readers use the primary copy, so
   * where a redundant table (or the redundant directory) is involved only the redundant side is
   * set aside (never written, never trusted by recovery); a primary table over the header, the
   * descriptor, the primary directory or another primary table is held as damage (its grains
   * fail with EIO, it is never written).
   */
  private holdMetadataOverlaps (): void {
    const h = this.header
    const rgd = this.rgd
    // every area as start, end, kind (0 fixed, 1 primary table, 2 redundant table or directory)
    // and table index (-1: a directory or the header); typed arrays, as a 2 TiB disk has 2^17
    const max = 4 + 2 * this.numGTs
    const S = new Float64Array(max)
    const E = new Float64Array(max)
    const K = new Uint8Array(max)
    const I = new Int32Array(max)
    let n = 0
    this.metadataAreas(true, (s, len, kind, i) => { S[n] = s; E[n] = s + len; K[n] = kind; I[n] = i; n++ })
    let sorted = true
    for (let k = 1; k < n && sorted; k++) sorted = S[k - 1] <= S[k]
    const order = Uint32Array.from({ length: n }, (_, k) => k)
    if (!sorted) order.sort((a, b) => S[a] - S[b])
    const badPrimary = new Set<number>()
    const badRedundant = new Set<number>()
    let badRgd = false
    const mark = (x: number): void => {
      if (K[x] === 2) { if (I[x] < 0) badRgd = true; else badRedundant.add(I[x]) }
    }
    // areas that started earlier and end after the current one starts
    const active: number[] = []
    for (let k = 0; k < n; k++) {
      const a = order[k]
      let w = 0
      for (const b of active) if (E[b] > S[a]) active[w++] = b
      active.length = w
      if (active.length > 64) {
        // A directory this damaged (many tables on the same sectors): to keep the scan linear,
        // only the area of each kind reaching furthest stays active (a later area overlapping
        // one of the others overlaps it too), and the tables dropped from the list are set
        // aside, whatever they overlap, so none of them is ever written.
        const far = [-1, -1, -1]
        for (const b of active) if (far[K[b]] < 0 || E[b] > E[far[K[b]]]) far[K[b]] = b
        for (const b of active) {
          if (far.includes(b)) continue
          mark(b)
          if (K[b] === 1) badPrimary.add(I[b])
        }
        active.length = 0
        for (const b of far) if (b >= 0) active.push(b)
      }
      for (const b of active) {
        // a and b share sectors: the redundant side goes if there is one, else the primary tables
        if (K[a] === 2 || K[b] === 2) { mark(a); mark(b) } else {
          if (K[a] === 1) badPrimary.add(I[a])
          if (K[b] === 1) badPrimary.add(I[b])
        }
      }
      active.push(a)
    }
    if (badRgd && rgd !== null) {
      this.damage(`${this.path}: the redundant grain directory at sector ${h.rgdOffset} overlaps other metadata; the redundant copy is not used`)
      for (let i = 0; i < this.numGTs; i++) if (rgd[i] !== 0) this.badRedundant.add(i)
    }
    for (const i of badRedundant) this.badRedundant.add(i)
    for (const i of badPrimary) {
      this.damage(`${this.path}: grain directory entry ${i} points to sector ${this.gd[i]}, over other metadata (the header, the descriptor, the grain directory or another table)`)
      this.gts[i] = new Uint32Array(h.numGTEsPerGT).fill(BAD)
      this.badTables.add(i)
    }
  }

  private damage (msg: string): void {
    this.problems.push(msg)
    this.lasting.push(msg)
  }

  /**
   * Grains whose sectors overlap: writing one would overwrite the other. Both are held BAD
   * (reads there fail EIO, writes are refused) and reported. One sort of the allocated entries.
   */
  private holdOverlaps (): void {
    const per = this.header.numGTEsPerGT
    const gs = this.header.grainSize
    const live = (e: number): boolean => e > 1 && e !== BAD
    let n = 0
    for (const gt of this.gts) if (gt !== undefined) for (let t = 0; t < per; t++) if (live(gt[t])) n++
    if (n < 2) return
    const starts = new Uint32Array(n)
    n = 0
    for (const gt of this.gts) if (gt !== undefined) for (let t = 0; t < per; t++) if (live(gt[t])) starts[n++] = gt[t]
    starts.sort()
    // the disk's last grain may be partial, and stored as such (rounded to a sector)
    const gb = this.grainBytes
    const lastGrain = Math.floor((this.size - 1) / gb)
    const lastE = this.gts[Math.floor(lastGrain / per)]?.[lastGrain % per] ?? 0
    const lastNeed = ceilDiv(this.size - lastGrain * gb, SECTOR)
    const clash = new Set<number>()
    for (let i = 1; i < n; i++) {
      const len = starts[i - 1] === lastE ? lastNeed : gs
      if (starts[i] < starts[i - 1] + len) { clash.add(starts[i - 1]); clash.add(starts[i]) }
    }
    if (clash.size === 0) return
    this.gts.forEach((gt, gdi) => {
      if (gt === undefined) return
      for (let t = 0; t < per; t++) {
        const e = gt[t]
        if (!live(e) || !clash.has(e)) continue
        const grain = gdi * per + t
        this.damage(`${this.path}: grain table ${gdi} entry ${t} points to sector ${e}, which another grain also uses`)
        this.badOriginal.set(grain, e)
        this.heldDamage.add(grain)
        gt[t] = BAD
        this.allocated -= Math.min(gb, this.size - grain * gb)
      }
    })
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
    if (this.kind === 'stream') return await this.readStream(buf, off, pos, len)
    await readGrains(this.tables, this.fh, buf, off, pos, len)
  }

  plan (p: ReadPlan, pos: number, len: number): boolean {
    return this.kind !== 'stream' && planGrains(this.tables, this.fh.fd, p, pos, len)
  }

  private async readStream (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    const gb = this.grainBytes
    let p = pos
    const end = pos + len
    while (p < end) {
      const grain = Math.floor(p / gb)
      const inGrain = p - grain * gb
      const n = Math.min(end - p, gb - inGrain)
      const e = this.entry(grain)
      const bo = off + (p - pos)
      if (e === 0 || e === 1) buf.fill(0, bo, bo + n)
      else if (e === BAD) throw new RedoError('EIO', `${this.path}: grain ${grain} is damaged (its table entry points past the end of the file)`, this.path)
      else {
        const data = await this.streamGrain(grain, e)
        const avail = Math.max(0, Math.min(n, data.length - inGrain))
        if (avail > 0) data.copy(buf, bo, inGrain, inGrain + avail)
        if (avail < n) buf.fill(0, bo + avail, bo + n)
      }
      p += n
    }
  }

  private async streamGrain (grain: number, sector: number): Promise<Buffer> {
    const hit = this.streamCache.get(grain)
    if (hit !== undefined) return hit
    const at = sector * SECTOR
    const hasMarker = (this.header.flags & FLAG_MARKERS) !== 0
    const head = hasMarker ? 12 : 4
    let chunk = Buffer.alloc(Math.min(this.grainBytes + 1024, this.fileSize - at))
    await readExact(this.fh, this.path, chunk, 0, chunk.length, at)
    const size = hasMarker ? chunk.readUInt32LE(8) : chunk.readUInt32LE(0)
    if (hasMarker) {
      const lba = Number(chunk.readBigUInt64LE(0))
      if (lba !== grain * this.header.grainSize) throw new RedoError('EIO', `${this.path}: compressed grain at sector ${sector} says LBA ${lba}, expected ${grain * this.header.grainSize}`, this.path)
    }
    if (at + head + size > this.fileSize) throw new RedoError('EIO', `${this.path}: compressed grain at sector ${sector} runs past the end of the file`, this.path)
    if (head + size > chunk.length) {
      chunk = Buffer.alloc(head + size)
      await readExact(this.fh, this.path, chunk, 0, chunk.length, at)
    }
    let data: Buffer
    try {
      data = inflateSync(chunk.subarray(head, head + size), { maxOutputLength: this.grainBytes })
    } catch (e) {
      throw new RedoError('EIO', `${this.path}: compressed grain at sector ${sector} does not inflate: ${(e as Error).message}`, this.path)
    }
    if (this.streamCache.size >= 32) this.streamCache.delete(this.streamCache.keys().next().value as number)
    this.streamCache.set(grain, data)
    return data
  }

  async write (buf: Buffer, off: number, pos: number, len: number, below: ReadBelow): Promise<void> {
    if (!this.writable) throw new RedoError('EROFS', `${this.path}: extent is read-only`, this.path)
    const gb = this.grainBytes
    // fast path: every grain allocated → write in place without the allocation lock
    if (this.allAllocated(pos, len)) return await this.writeInPlace(buf, off, pos, len)
    await this.mutex.run(async () => {
      const end = pos + len
      let p = pos
      // a batch of consecutive new grains written with one pwrite
      let batch: Buffer[] = []
      let batchGrains: number[] = []
      const flushBatch = async (): Promise<void> => {
        if (batch.length === 0) return
        const at = this.nextAlloc
        if (Math.floor(at / SECTOR) + batch.length * this.header.grainSize > 0xfffffff0) {
          throw new RedoError('ENOSPC', `${this.path}: the sparse extent cannot grow past 2 TiB`, this.path)
        }
        const bytes = batch.reduce((n, b) => n + b.length, 0)
        this.nextAlloc += bytes
        faultPoint('sparse.grain')
        // on failure the space is leaked (never referenced) and the next batch starts after it
        if (!await this.writeDirect(batch, at)) await writeExactv(this.fh, batch, at)
        if (at + bytes > this.fileSize) this.fileSize = at + bytes
        const per = this.header.numGTEsPerGT
        batchGrains.forEach((grain, i) => {
          const gdi = Math.floor(grain / per)
          let gt = this.gts[gdi]
          if (gt === undefined) { gt = new Uint32Array(per); this.gts[gdi] = gt }
          gt[grain % per] = (at + i * gb) / SECTOR
          this.dirtyGTs.add(gdi)
          this.allocated += Math.min(gb, this.size - grain * gb)
        })
        batch = []
        batchGrains = []
      }
      while (p < end) {
        const grain = Math.floor(p / gb)
        const gStart = grain * gb
        const inGrain = p - gStart
        const n = Math.min(end - p, gb - inGrain)
        const e = this.entry(grain)
        const bo = off + (p - pos)
        if (e > 1 && e !== BAD) {
          await flushBatch()
          await writeExact(this.fh, buf, bo, n, e * SECTOR + inGrain)
          this.dataDirty = true
        } else {
          if (e === BAD) throw new RedoError('EIO', `${this.path}: grain ${grain} is damaged; not writing over it`, this.path)
          if (this.gd[Math.floor(grain / this.header.numGTEsPerGT)] === 0) {
            throw new RedoError('ENOTSUP', `${this.path}: grain directory entry for grain ${grain} is missing (tables not preallocated)`, this.path)
          }
          if (batchGrains.length > 0 && batchGrains[batchGrains.length - 1] !== grain - 1) await flushBatch()
          const g = await newGrain(buf, bo, n, gStart, inGrain, gb, this.size, e === 0, below)
          batch.push(g)
          batchGrains.push(grain)
          if (batch.length >= 64) await flushBatch()
        }
        p += n
      }
      await flushBatch()
    })
  }

  /** New grains around the page cache when the file system allows it (see direct.ts). */
  private async writeDirect (bufs: Buffer[], at: number): Promise<boolean> {
    if (this.direct === undefined) this.direct = await DirectWriter.open(this.path)
    if (this.direct === null) return false
    try {
      return await this.direct.write(bufs, at)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e
      log.formats('%s: direct write refused (%s); new grains go through the page cache from now on', this.path, (e as Error).message)
      const d = this.direct
      this.direct = null
      await d.close()
      return false
    }
  }

  /** An overwrite in place as a plan (Extent.planWrite): every grain it touches allocated. */
  planWrite (p: ReadPlan, pos: number, len: number): boolean {
    if (!this.writable || !planOverwrite(this.tables, this.fh.fd, p, pos, len)) return false
    // as writeInPlace does after its writes: set now, and flush waits for the plans first
    this.dataDirty = true
    this.planned.mark()
    return true
  }

  private allAllocated (pos: number, len: number): boolean {
    const gb = this.grainBytes
    const last = Math.floor((pos + len - 1) / gb)
    for (let g = Math.floor(pos / gb); g <= last; g++) {
      const e = this.entry(g)
      if (e <= 1 || e === BAD) return false
    }
    return true
  }

  private async writeInPlace (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    try {
      await overwriteGrains(this.tables, this.fh, buf, off, pos, len)
    } finally {
      // only now: a flush that took its snapshot while these writes were in flight may have
      // synced before they reached the page cache, so the next one must sync again
      this.dataDirty = true
    }
  }

  async beginWrite (): Promise<void> {
    if (!this.writable) throw new RedoError('EROFS', `${this.path}: extent is read-only`, this.path)
    if (this.header.uncleanShutdown !== 0) return
    await this.writeHeader(1)
  }

  private async writeHeader (unclean: number): Promise<void> {
    const h = { ...this.header, uncleanShutdown: unclean }
    const raw = Buffer.alloc(512)
    await readExact(this.fh, this.path, raw, 0, 512, 0)
    raw[72] = unclean // change only that byte: keep whatever else the header holds
    faultPoint('sparse.header')
    await writeExact(this.fh, raw, 0, 512, 0)
    await this.durable.sync()
    this.header.uncleanShutdown = h.uncleanShutdown
  }

  /** Redundant grain tables written (or being written) since the last sync (flush). */
  private redundantUnsynced = false

  /**
   * The end of a write session or of a recovery: the redundant tables the last flush wrote reach
   * the disk, then the header says clean, in one critical section with the flushes.
   */
  private async markClean (): Promise<void> {
    await this.flushMutex.run(async () => {
      if (this.redundantUnsynced) {
        await this.durable.sync()
        this.redundantUnsynced = false
      }
      if (this.header.uncleanShutdown !== 0) await this.writeHeader(0)
    })
  }

  /**
   * Data first and durable, then the primary grain tables and a sync (what an fsync promises),
   * then the redundant copies, made durable by the next flush's first sync (the background
   * flush a write schedules comes within seconds) or before the file is marked clean. VMDK.md
   * §9.1 asks for both copies before a guest flush is acknowledged; this keeps one device flush
   * out of every allocating fsync, and the redundant copy is never ahead of the durable primary,
   * so after a power loss it can only lack entries that recovery takes from the primary.
   */
  async flush (): Promise<void> {
    if (!this.writable) return
    // Not under the allocation lock: the snapshot below is taken synchronously, and an entry
    // is set in memory only after its data was written, so every entry in the snapshot points
    // at data the first datasync covers. Writes go on while the tables reach the disk.
    await this.flushMutex.run(async () => {
      await this.planned.settle()
      if (this.dirtyGTs.size === 0 && !this.dataDirty && !this.redundantUnsynced) return
      const per = this.header.numGTEsPerGT
      const tables = [...this.dirtyGTs].filter(gdi => !this.badTables.has(gdi)).map(gdi => {
        const copy = (this.gts[gdi] as Uint32Array).slice()
        for (let t = 0; t < per; t++) if (copy[t] === BAD) copy[t] = this.badOriginal.get(gdi * per + t) ?? 0
        return { gdi, bytes: Buffer.from(copy.buffer) }
      })
      this.dirtyGTs.clear()
      // a write planned while settle() waited may land after the sync below (PlannedWrites)
      this.dataDirty = this.planned.pending
      try {
        await this.durable.sync()
        this.redundantUnsynced = false
        if (tables.length === 0) return
        // The primary tables, synced: what the fsync promises. Then the redundant copies (see
        // above): never ahead of the durable primary, so after a crash recovery (recover())
        // and tools that read only the primary see the same disk.
        faultPoint('sparse.gt.primary')
        await settleAll(tables.map(async t => await writeExact(this.fh, t.bytes, 0, t.bytes.length, this.gd[t.gdi] * SECTOR)))
        await this.durable.sync()
        if (this.rgd !== null) {
          faultPoint('sparse.gt.redundant')
          const rgd = this.rgd
          this.redundantUnsynced = true // before the writes: one may land even if another fails
          await settleAll(tables.filter(t => rgd[t.gdi] !== 0 && !this.badRedundant.has(t.gdi)).map(async t => await writeExact(this.fh, t.bytes, 0, t.bytes.length, rgd[t.gdi] * SECTOR)))
        }
        faultPoint('sparse.gt.done')
      } catch (e) {
        for (const t of tables) this.dirtyGTs.add(t.gdi)
        this.dataDirty = true
        throw e
      }
    })
  }

  async endWrite (): Promise<void> {
    if (!this.writable) return
    await this.flush()
    await this.markClean()
  }

  async close (): Promise<void> {
    const d = this.direct
    this.direct = null
    if (d !== null && d !== undefined) await d.close()
    await this.fh.close()
  }

  allocatedBytes (): number {
    return this.allocated
  }

  /**
   * After an unclean shutdown: make primary and redundant tables agree (VMDK.md §9.3): prefer
   * the primary where it points at a whole grain inside the file, else the redundant, else 0.
   */
  private async recover (): Promise<void> {
    const rgd = this.rgd ?? new Uint32Array(0)
    const limit = Math.ceil(this.fileSize / SECTOR)
    const per = this.header.numGTEsPerGT
    const gsec = this.header.grainSize
    let repaired = 0
    // A redundant entry is taken only where it names whole sectors above the metadata area that
    // no grain uses: adopting one that points into the tables or onto another grain would make
    // two grains share sectors (and a write to one overwrite the other).
    const h = this.header
    const metaEnd = h.overHead > h.gdOffset ? h.overHead : 0
    // built on first need: most recoveries take nothing from the redundant copy
    let usedCache: { starts: Float64Array, maxEnds: Float64Array } | undefined
    const isFree = (v: number, n: number): boolean => {
      const used = usedCache ??= this.usedSectors()
      // every range starting below v + n must end at or before v
      let lo = 0
      let hi = used.starts.length - 1
      let k = -1
      while (lo <= hi) {
        const mid = (lo + hi) >> 1
        if (used.starts[mid] < v + n) { k = mid; lo = mid + 1 } else hi = mid - 1
      }
      return k < 0 || used.maxEnds[k] <= v
    }
    // entries taken from the redundant copy so far, by grain-sized bucket of their start
    const adopted = new Map<number, number>()
    const clashesAdopted = (v: number): boolean => {
      const b = Math.floor(v / gsec)
      for (const k of [b - 1, b, b + 1]) {
        const a = adopted.get(k)
        if (a !== undefined && v < a + gsec && a < v + gsec) return true
      }
      return false
    }
    for (let gdi = 0; gdi < rgd.length; gdi++) {
      if (this.gd[gdi] === 0 || rgd[gdi] === 0 || this.badTables.has(gdi) || this.badRedundant.has(gdi)) continue
      const rb = Buffer.alloc(this.gtBytes)
      if (rgd[gdi] * SECTOR + this.gtBytes > this.fileSize) continue
      await readExact(this.fh, this.path, rb, 0, rb.length, rgd[gdi] * SECTOR)
      const gt = this.gts[gdi]
      let changed = false
      const fixed = gt ?? new Uint32Array(per)
      for (let t = 0; t < per; t++) {
        if (this.heldDamage.has(gdi * per + t)) continue
        const p = gt === undefined ? 0 : gt[t]
        const r = rb.readUInt32LE(t * 4)
        if (p === r) continue
        // the disk's last grain may be stored partial (rounded to a sector)
        const grain = gdi * per + t
        const need = ceilDiv(Math.min(this.grainBytes, this.size - grain * this.grainBytes), SECTOR)
        const ok = (v: number): boolean => v > 1 && v !== BAD && v + need <= limit
        const okRedundant = (v: number): boolean => ok(v) && v >= metaEnd && isFree(v, need) && !clashesAdopted(v)
        // a primary 1 is a grain written as zeros (newer than the redundant copy): kept
        const v = ok(p) || p === 1 ? p : okRedundant(r) ? r : 0
        if (v === r && v !== 0) adopted.set(Math.floor(v / gsec), v)
        else if (r > 1 && v === 0) log.formats('%s: grain table %d entry %d: redundant copy %d not taken (outside the file, in the metadata area or on another grain)', this.path, gdi, t, r)
        if (p === BAD) this.badOriginal.delete(gdi * per + t)
        fixed[t] = v
        changed = true
      }
      if (changed) {
        this.gts[gdi] = fixed
        this.dirtyGTs.add(gdi)
        repaired++
      }
    }
    // a primary entry past EOF with no good redundant copy: drop it (the data never reached the disk)
    for (let gdi = 0; gdi < this.numGTs; gdi++) {
      const gt = this.gts[gdi]
      if (gt === undefined || this.badTables.has(gdi)) continue
      for (let t = 0; t < per; t++) {
        if (gt[t] === BAD && !this.heldDamage.has(gdi * per + t)) { gt[t] = 0; this.badOriginal.delete(gdi * per + t); this.dirtyGTs.add(gdi); repaired++ }
      }
    }
    // what is left is damage (tables outside the file or the metadata area, held grains)
    this.problems.length = 0
    this.problems.push(...this.lasting)
    if (repaired > 0) {
      log.formats('%s: unclean shutdown, repaired %d grain tables', this.path, repaired)
      this.allocated = this.runs().reduce((s, r) => s + (r.state === 'data' ? r.length : 0), 0)
      await this.flush()
    }
    // consistent again: the flag goes back to clean until the next write session sets it
    if (this.lasting.length === 0) await this.markClean()
  }

  async check (): Promise<string[]> {
    const problems = [...this.problems]
    const h = this.header
    if ((h.flags & FLAG_NEWLINE) !== 0) {
      const raw = Buffer.alloc(512)
      await readExact(this.fh, this.path, raw, 0, 512, 0)
      if (raw[73] !== 0x0a || raw[74] !== 0x20 || raw[75] !== 0x0d || raw[76] !== 0x0a) {
        problems.push(`${this.path}: newline detector bytes are damaged (file went through a text-mode transfer?)`)
      }
    }
    if (h.uncleanShutdown !== 0 && !this.writable) problems.push(`${this.path}: uncleanShutdown is set (the file was not closed cleanly)`)
    if (this.strayZeroEntries > 0) {
      // sector 1 is the header's: VMDK.md says zeros; qemu would read the descriptor's bytes there
      problems.push(`${this.path}: ${this.strayZeroEntries} grain table entr${this.strayZeroEntries === 1 ? 'y is' : 'ies are'} 1 (a zeroed grain) but the zeroed-grain flag is not set; read as zeros`)
    }
    if (this.pendingDescriptor !== undefined) {
      problems.push(`${this.path}: a rewrite of the embedded descriptor was interrupted; ${basename(descriptorIntentPath(this.path))} holds the new one and the next writable open finishes it`)
    }
    if (this.rgd !== null) {
      for (let gdi = 0; gdi < this.numGTs; gdi++) {
        const a = this.gd[gdi]
        const b = this.rgd[gdi]
        if ((a === 0) !== (b === 0)) {
          problems.push(`${this.path}: grain directory entry ${gdi}: primary ${a} and redundant ${b} disagree`)
          continue
        }
        if (a !== 0 && a === b) {
          problems.push(`${this.path}: grain directory entry ${gdi}: primary and redundant copies both point to sector ${a} (they must be distinct)`)
          continue
        }
        if (this.badRedundant.has(gdi)) {
          problems.push(`${this.path}: redundant grain directory entry ${gdi} points to sector ${b}, outside the metadata area, past the end of the file or over other metadata`)
          continue
        }
        if (a === 0 || b * SECTOR + this.gtBytes > this.fileSize) continue
        const rb = Buffer.alloc(this.gtBytes)
        await readExact(this.fh, this.path, rb, 0, rb.length, b * SECTOR)
        const pb = Buffer.alloc(this.gtBytes)
        if (a * SECTOR + this.gtBytes <= this.fileSize) await readExact(this.fh, this.path, pb, 0, pb.length, a * SECTOR)
        if (!rb.equals(pb)) problems.push(`${this.path}: grain table ${gdi} differs from its redundant copy`)
      }
    }
    // entries inside the metadata area or sharing sectors were listed (and held BAD) at open
    return problems
  }

  /** The descriptor area as the file holds it (checked against the file's size). */
  private async readDescriptorArea (): Promise<Buffer> {
    const h = this.header
    const len = Math.min(h.descriptorSize * SECTOR, 1 << 20)
    if (h.descriptorOffset * SECTOR + len > this.fileSize) {
      throw new RedoError('EINVAL', `${this.path}: embedded descriptor lies past the end of the file`, this.path)
    }
    const b = Buffer.alloc(len)
    await readExact(this.fh, this.path, b, 0, len, h.descriptorOffset * SECTOR)
    return b
  }

  /** An interrupted rewrite of the embedded descriptor awaits a writable open (read from its intent). */
  get descriptorPending (): boolean { return this.pendingDescriptor !== undefined }

  /** The embedded descriptor text, or undefined when the extent carries none. */
  async readDescriptor (): Promise<string | undefined> {
    const h = this.header
    if (h.descriptorOffset === 0 || h.descriptorSize === 0) return undefined
    const b = this.pendingDescriptor ?? await this.readDescriptorArea()
    const nul = b.indexOf(0)
    return b.subarray(0, nul < 0 ? b.length : nul).toString('utf8')
  }

  /**
   * Rewrite the embedded descriptor in place (NUL padded) through an intent file (see
   * descriptorIntentPath). Once the intent is durable the change is made: if the in-place write
   * then fails, the descriptor is read from the intent until an open can finish the write.
   */
  async writeDescriptor (text: string): Promise<void> {
    const h = this.header
    const area = Buffer.alloc(h.descriptorSize * SECTOR)
    if (Buffer.byteLength(text) >= area.length) {
      throw new RedoError('ENOSPC', `${this.path}: descriptor (${Buffer.byteLength(text)} bytes) does not fit its ${area.length}-byte area`, this.path)
    }
    area.write(text, 0, 'utf8')
    const before = await this.readDescriptorArea()
    const intentPath = descriptorIntentPath(this.path)
    try {
      await writeFileDurable(intentPath, encodeIntent(h.descriptorOffset, before, area))
    } catch (e) {
      // not durable, maybe not there: the change did not happen (the area is untouched)
      await unlink(intentPath).catch(() => {})
      throw e
    }
    this.pendingDescriptor = area
    try {
      await this.writeDescriptorArea(area)
    } catch (e) {
      const msg = `${this.path}: the new descriptor could not be written in place (${(e as Error).message}); redofs reads it from ${basename(intentPath)}, and the next writable open writes it`
      log.formats('%s', msg)
      this.lasting.push(msg)
    }
  }

  /** The in-place half of a rewrite; the intent file goes once the area is durable. */
  private async writeDescriptorArea (area: Buffer): Promise<void> {
    const at = this.header.descriptorOffset * SECTOR
    // two writes only so that the crash tests can stop between them, as a power loss could
    const first = Math.min(SECTOR, area.length)
    await writeExact(this.fh, area, 0, first, at)
    faultPoint('sparse.descriptor.torn')
    if (area.length > first) await writeExact(this.fh, area, first, area.length - first, at + first)
    await this.durable.sync()
    this.pendingDescriptor = undefined
    await unlink(descriptorIntentPath(this.path)).catch(e => { if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e })
    await syncDir(dirname(this.path))
  }

  /** At open: finish (writable) or read through (read-only) an interrupted descriptor rewrite. */
  private async finishDescriptorRewrite (): Promise<void> {
    const h = this.header
    if (h.descriptorOffset === 0 || h.descriptorSize === 0) return
    const intentPath = descriptorIntentPath(this.path)
    if (this.writable) await unlink(`${intentPath}.redofs-tmp`).catch(() => {}) // a crash inside writeFileDurable
    if (h.descriptorOffset * SECTOR + h.descriptorSize * SECTOR > this.fileSize) return // reported by readDescriptor
    const intent = await descriptorIntent(this.path, h.descriptorOffset, await this.readDescriptorArea())
    if (intent === undefined) return
    if (intent.kind !== 'apply') {
      if (intent.kind === 'stale') log.formats('%s: ignoring %s: %s', this.path, basename(intentPath), intent.why)
      if (this.writable) await unlink(intentPath).catch(() => {})
      return
    }
    this.pendingDescriptor = intent.area
    if (!this.writable) return
    log.formats('%s: finishing an interrupted rewrite of the embedded descriptor', this.path)
    try {
      await this.writeDescriptorArea(intent.area)
    } catch (e) {
      // the disk stays usable: its descriptor is read from the intent, as by a read-only open
      const msg = `${this.path}: finishing an interrupted descriptor rewrite failed (${(e as Error).message}); redofs reads the descriptor from ${basename(intentPath)}`
      log.formats('%s', msg)
      this.lasting.push(msg)
    }
  }

  get handle (): FileHandle { return this.fh }
}
