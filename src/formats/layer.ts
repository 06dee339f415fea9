/**
 * A layer: one descriptor (stand-alone or embedded in a KDMV file) and its extents, seen as one
 * byte range. This is what chain/ stacks; it knows nothing about parents beyond their names.
 */
import { constants, type Stats } from 'node:fs'
import { open, readdir, rename, realpath, stat, unlink, type FileHandle } from 'node:fs/promises'
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from 'node:path'
import { RedoError, toRedoError } from '../errors'
import { delayPoint, failPoint, faultPoint } from '../fault'
import { log } from '../log'
import { SECTOR } from '../units'
import { COWD_HEADER_BYTES, COWD_MAGIC, CowdExtent, parseCowdHeader } from './cowd'
import { SeSparseExtent } from './sesparse'
import { Descriptor, NO_PARENT_CID, newCid } from './descriptor'
import { ZeroExtent, noteOpened, openStoreFile, plannedIoDone, settleAll, syncDir, writeFileDurable, type Extent, type ReadBelow, type ReadPlan, type Run, type State } from './extent'
import { FlatExtent } from './flat'
import { KDMV_MAGIC, SparseExtent, descriptorIntentPath } from './sparse'

export interface LayerOptions {
  writable?: boolean
  /** Store root: extent files and parents must resolve inside it. */
  root?: string
}

type DescriptorHome = { kind: 'file' } | { kind: 'embedded', extent: SparseExtent } | { kind: 'none' }

const MAX_DESCRIPTOR_FILE = 1 << 20

/** Resolve `name` (from a descriptor in `dir`) and refuse paths that leave the store root. */
export async function resolveContained (dir: string, name: string, root: string | undefined, what: string, from: string, shown = name): Promise<string> {
  const p = resolve(dir, name)
  if (root === undefined) return p
  const r = resolve(root)
  // where the file really is decides, whichever way the path and the root are spelled (qemu-img
  // writes absolute hints, a store is often mounted through a symlink); a missing file is
  // placed by its directory (the caller reports it missing)
  const realRoot = await realpath(r).catch(() => r)
  const real = await realpath(p).catch(async () => join(await realpath(dirname(p)).catch(() => dirname(p)), basename(p)))
  if (real !== realRoot && !real.startsWith(realRoot + sep)) {
    throw new RedoError('EACCES', `${from}: ${what} "${shown}" resolves to ${real}, outside the store ${realRoot}`, from)
  }
  return p
}

export class Layer {
  /** Extent start offsets in bytes, plus the total at the end. */
  private readonly starts: number[]
  private sessionStarted: Promise<void> | null = null
  /** beginSession's work is done: writes planned for the FUSE workers may go ahead */
  private sessionReady = false
  private closed = false

  private constructor (
    readonly path: string,
    public descriptor: Descriptor,
    private readonly home: DescriptorHome,
    readonly extents: Extent[],
    readonly writable: boolean,
    /** ESX 2.x REDO: parent named by the COWD header instead of a descriptor. */
    readonly legacyParent?: string
  ) {
    this.starts = [0]
    for (const e of extents) this.starts.push(this.starts[this.starts.length - 1] + e.size)
  }

  static async open (path: string, opts: LayerOptions = {}): Promise<Layer> {
    const writable = opts.writable === true
    let fh: FileHandle
    try {
      fh = await openStoreFile(path, writable)
    } catch (e) {
      const err = toRedoError(e, path)
      if (err.code === 'ENOENT') throw new RedoError('ENOENT', `${path}: no such file`, path)
      throw err
    }
    let keep = false
    try {
      const st = await fh.stat()
      noteOpened(path, st)
      if (!st.isFile()) throw new RedoError('EINVAL', `${path}: not a regular file`, path)
      const head = Buffer.alloc(Math.min(st.size, 2048))
      await fh.read(head, 0, head.length, 0)
      if (head.length >= 4 && head.readUInt32LE(0) === KDMV_MAGIC) {
        const ext = await SparseExtent.open(path, writable, fh)
        keep = true
        try {
          const text = await ext.readDescriptor()
          if (text === undefined) throw new RedoError('EINVAL', `${path}: sparse extent without an embedded descriptor (open its descriptor file instead)`, path)
          const desc = Descriptor.parse(text, path)
          // A monolithic file is its own extent, whatever name its (possibly renamed) descriptor says.
          const lines = desc.extents
          if (lines.length !== 1 || lines[0].type !== 'SPARSE') throw new RedoError('EINVAL', `${path}: embedded descriptor must list exactly one SPARSE extent`, path)
          if (lines[0].sectors * SECTOR !== ext.size) {
            throw new RedoError('EINVAL', `${path}: descriptor says ${lines[0].sectors} sectors, sparse header says ${ext.size / SECTOR}`, path)
          }
          return new Layer(path, desc, { kind: 'embedded', extent: ext }, [ext], ext.writable)
        } catch (e) {
          await ext.close()
          throw e
        }
      }
      if (head.length >= 4 && head.readUInt32LE(0) === COWD_MAGIC) {
        await fh.close()
        keep = true
        return await Layer.openLegacyRedo(path, opts)
      }
      if (!looksLikeDescriptor(head)) {
        if (head.length < 4) throw new RedoError('EINVAL', `${path}: file too short to be a VMDK (${st.size} bytes)`, path)
        throw new RedoError('EINVAL', `${path}: not a VMDK file (unknown magic ${head.subarray(0, 4).toString('hex')})`, path)
      }
      if (st.size > MAX_DESCRIPTOR_FILE) throw new RedoError('EINVAL', `${path}: descriptor file is ${st.size} bytes, too large`, path)
      const text = Buffer.alloc(st.size)
      await fh.read(text, 0, st.size, 0)
      const desc = Descriptor.parse(text.toString('utf8'), path)
      await fh.close()
      keep = true
      const extents = await openExtents(path, desc, writable, opts.root, st)
      return new Layer(path, desc, { kind: 'file' }, extents, writable && extents.every(e => e.writable || e.kind === 'zero'))
    } finally {
      if (!keep) await fh.close().catch(() => {})
    }
  }

  /** A bare COWD file (ESX 2.x `disk.vmdk.REDO`): its parent is named in the COWD header. */
  private static async openLegacyRedo (path: string, _opts: LayerOptions): Promise<Layer> {
    const fh = await openStoreFile(path)
    let h
    try {
      const b = Buffer.alloc(COWD_HEADER_BYTES)
      const { bytesRead } = await fh.read(b, 0, b.length, 0)
      h = parseCowdHeader(b.subarray(0, bytesRead), path)
    } finally {
      await fh.close()
    }
    if (h.parentFileName === '') throw new RedoError('EINVAL', `${path}: bare COWD file names no parent; it needs a descriptor`, path)
    const ext = await CowdExtent.open(path)
    const desc = Descriptor.create({
      createType: 'vmfsSparse', cid: NO_PARENT_CID, parentCID: NO_PARENT_CID,
      extents: [{ access: 'RW', sectors: h.numSectors, type: 'VMFSSPARSE', file: basename(path) }]
    })
    // ESX 2.x names the parent "vmhba:disk.vmdk" or a path; the file name is what we can use
    const parent = h.parentFileName.replace(/^.*:/, '')
    return new Layer(path, desc, { kind: 'none' }, [ext], false, parent)
  }

  /** A raw file with no descriptor, as the flat base of an ESX 2.x REDO log. */
  static async openRaw (path: string, opts: LayerOptions = {}): Promise<Layer> {
    const st = await stat(path)
    const sectors = Math.floor(st.size / SECTOR)
    const ext = await FlatExtent.open(path, sectors, 0, opts.writable === true)
    const desc = Descriptor.create({ createType: 'monolithicFlat', cid: NO_PARENT_CID, extents: [{ access: 'RW', sectors, type: 'FLAT', file: basename(path), offset: 0 }] })
    return new Layer(path, desc, { kind: 'none' }, [ext], opts.writable === true)
  }

  get size (): number { return this.starts[this.starts.length - 1] }
  get cid (): number { return this.descriptor.cid }
  get parentCID (): number { return this.descriptor.parentCID }
  get createType (): string { return this.descriptor.createType ?? 'unknown' }
  get hasParent (): boolean { return this.legacyParent !== undefined || this.descriptor.hasParent }
  get parentHint (): string | undefined { return this.legacyParent ?? this.descriptor.parentFileNameHint }
  get hasCids (): boolean { return this.home.kind !== 'none' }
  /** A raw disk without descriptor (the flat base of an ESX 2.x REDO log, see openRaw). */
  get isRaw (): boolean { return this.home.kind === 'none' && !this.hasParent }
  get problems (): string[] { return this.extents.flatMap(e => e.problems) }

  /** Every file that belongs to this layer: the descriptor first, then extents. */
  get files (): string[] {
    const out = [this.path]
    for (const e of this.extents) if (e.path !== undefined && !out.includes(e.path)) out.push(e.path)
    return out
  }

  allocatedBytes (): number {
    return this.extents.reduce((s, e) => s + e.allocatedBytes(), 0)
  }

  /** Index of the extent holding byte `pos`. */
  private extentAt (pos: number): number {
    let lo = 0
    let hi = this.extents.length - 1
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1
      if (this.starts[mid] <= pos) lo = mid
      else hi = mid - 1
    }
    return lo
  }

  lookup (pos: number, len: number): { state: State, length: number } {
    const i = this.extentAt(pos)
    const rel = pos - this.starts[i]
    const r = this.extents[i].lookup(rel, Math.min(len, this.extents[i].size - rel))
    let length = r.length
    // keep going into the next extents while the state stays the same
    let j = i + 1
    while (length === this.starts[j] - pos && pos + length < this.size && length < len && j < this.extents.length) {
      const n = this.extents[j].lookup(0, Math.min(len - length, this.extents[j].size))
      if (n.state !== r.state) break
      length += n.length
      j++
    }
    return { state: r.state, length }
  }

  runs (): Run[] {
    const out: Run[] = []
    this.extents.forEach((e, i) => {
      for (const r of e.runs()) {
        const start = r.start + this.starts[i]
        const last = out[out.length - 1]
        if (last !== undefined && last.state === r.state && last.start + last.length === start) last.length += r.length
        else out.push({ start, length: r.length, state: r.state })
      }
    })
    return out
  }

  /** Split [pos, pos+len) at extent boundaries and run fn on each piece. */
  private async perExtent (pos: number, len: number, fn: (e: Extent, rel: number, bufOff: number, n: number, abs: number) => Promise<void>): Promise<void> {
    const jobs: Array<Promise<void>> = []
    let p = pos
    const end = pos + len
    while (p < end) {
      const i = this.extentAt(p)
      const rel = p - this.starts[i]
      const n = Math.min(end - p, this.extents[i].size - rel)
      jobs.push(fn(this.extents[i], rel, p - pos, n, p))
      p += n
    }
    await settleAll(jobs)
  }

  async read (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    if (pos + len > this.size) throw new RedoError('EINVAL', `${this.path}: read past the end of the layer`, this.path)
    await this.perExtent(pos, len, async (e, rel, bo, n) => await e.read(buf, off + bo, rel, n))
  }

  /** A descriptor rewrite was interrupted; the next writable open finishes it (SparseExtent). */
  get descriptorPending (): boolean {
    return this.extents.some(e => e instanceof SparseExtent && e.descriptorPending)
  }

  /** read() as a plan (Extent.plan); false when closed or when an extent cannot plan. */
  plan (p: ReadPlan, pos: number, len: number): boolean {
    return this.planEach(pos, len, (e, rel, n) => e.plan(p, rel, n))
  }

  /**
   * An overwrite as a plan (Extent.planWrite): only once this write session's first change has
   * reached the disk (beginSession), and only where every byte already has its place.
   */
  planWrite (p: ReadPlan, pos: number, len: number): boolean {
    return this.writable && this.sessionReady && this.planEach(pos, len, (e, rel, n) => e.planWrite?.(p, rel, n) === true)
  }

  private planEach (pos: number, len: number, f: (e: Extent, rel: number, n: number) => boolean): boolean {
    if (this.closed || pos + len > this.size) return false
    const end = pos + len
    for (let q = pos; q < end;) {
      const i = this.extentAt(q)
      const rel = q - this.starts[i]
      const n = Math.min(end - q, this.extents[i].size - rel)
      if (!f(this.extents[i], rel, n)) return false
      q += n
    }
    return true
  }

  async write (buf: Buffer, off: number, pos: number, len: number, below: ReadBelow): Promise<void> {
    if (!this.writable) throw new RedoError('EROFS', `${this.path}: layer is read-only`, this.path)
    if (pos + len > this.size) throw new RedoError('ENOSPC', `${this.path}: write past the capacity`, this.path)
    await this.beginSession()
    await this.perExtent(pos, len, async (e, rel, bo, n, abs) => {
      const base = abs - rel
      await e.write(buf, off + bo, rel, n, async (b, o, p, l) => await below(b, o, base + p, l))
    })
  }

  /**
   * First change of a write session: mark extents unclean and persist a new CID before any data
   * (VMDK.md §2.8 rule 2, §9.1 rules 5 and 6). Runs once per session.
   */
  async beginSession (cid?: number): Promise<void> {
    if (this.sessionStarted === null) {
      this.sessionStarted = (async () => {
        for (const e of this.extents) if (e.kind !== 'zero') await e.beginWrite()
        if (this.hasCids) {
          const d = this.descriptor.clone()
          d.cid = cid ?? newCid(this.descriptor.cid)
          await this.saveDescriptor(d)
        }
        log.formats('%s: write session started, CID %s', this.path, this.descriptor.get('CID'))
        this.sessionReady = true
      })()
      this.sessionStarted.catch(() => { this.sessionStarted = null })
    }
    await this.sessionStarted
  }

  get inSession (): boolean { return this.sessionStarted !== null }

  /** Persist a changed descriptor: in place when embedded, write-new-then-rename when stand-alone. */
  async saveDescriptor (d: Descriptor): Promise<void> {
    const text = d.toString()
    faultPoint('layer.descriptor')
    if (this.home.kind === 'embedded') await this.home.extent.writeDescriptor(text)
    else if (this.home.kind === 'file') await writeFileDurable(this.path, text)
    else throw new RedoError('ENOTSUP', `${this.path}: this layer has no descriptor to update`, this.path)
    this.descriptor = d
  }

  async setParent (hint: string, parentCID: number): Promise<void> {
    const d = this.descriptor.clone()
    d.parentFileNameHint = hint
    d.parentCID = parentCID
    await this.saveDescriptor(d)
  }

  async flush (): Promise<void> {
    await settleAll(this.extents.map(async e => await e.flush()))
  }

  /** Flush and mark clean; the next write starts a new session (and a new CID). */
  async endSession (): Promise<void> {
    if (this.sessionStarted === null) return
    await this.sessionStarted.catch(() => {})
    this.sessionReady = false
    for (const e of this.extents) await e.endWrite()
    this.sessionStarted = null
  }

  async close (): Promise<void> {
    if (this.closed) return
    try {
      await this.endSession()
    } finally {
      this.closed = true
      await plannedIoDone().catch(() => {})
      const seen = new Set<Extent>()
      for (const e of this.extents) if (!seen.has(e)) { seen.add(e); await e.close().catch(() => {}) }
    }
  }

  /** Structural problems of every extent plus the descriptor's own consistency. */
  async check (): Promise<string[]> {
    const out: string[] = []
    for (const e of this.extents) out.push(...await e.check())
    const lines = this.descriptor.extents
    lines.forEach((l, i) => {
      const e = this.extents[i]
      if (e !== undefined && e.size !== l.sectors * SECTOR) out.push(`${this.path}: extent ${i} is ${e.size / SECTOR} sectors, the descriptor says ${l.sectors}`)
    })
    return out
  }

  /**
   * Close the layer and take its files out of the store, descriptor first, then extents (VMDK.md
   * §9.1 rule 7), by renaming them to `<file>.redofs-dropped`: atomic
   * and cheap, where deleting a large file is not (the file system frees every extent, and the
   * kernel evicts its cached pages). Callers that hold I/O off while the chain changes drop
   * inside that pause and reap after it; whatever a crash leaves is reaped at the next writable
   * open. Returns the new names.
   */
  async drop (): Promise<string[]> {
    // renamed while still open, closed after: a rename that fails leaves the layer as it was
    // (open, in use), so a caller's chain never holds a closed layer
    // (a failed directory sync too: the layer stays in use, so its files must keep their names,
    // or what is written to it next would go into files the next open deletes)
    const out: string[] = []
    let f = this.path
    try {
      for (f of [...this.files, `${this.path}.redofs-digest`, descriptorIntentPath(this.path)]) {
        try {
          failPoint('layer.drop')
          await rename(f, f + DROPPED)
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue
          throw e
        }
        out.push(f + DROPPED)
        faultPoint('layer.drop.renamed')
      }
      f = dirname(this.path)
      failPoint('layer.drop.sync')
      await syncDir(f)
    } catch (e) {
      for (const d of out.reverse()) await rename(d, d.slice(0, -DROPPED.length)).catch(() => {})
      throw toRedoError(e, f)
    }
    faultPoint('layer.dropped')
    await this.closeWithoutFlush()
    return out
  }

  private async closeWithoutFlush (): Promise<void> {
    if (this.closed) return
    this.closed = true
    await plannedIoDone().catch(() => {})
    for (const e of new Set(this.extents)) await e.close().catch(() => {})
  }
}

/**
 * A descriptor is text up to its first NUL, as qemu and VMware read it: qemu rewrites a
 * descriptor file in place when it changes the CID, and when the new CID has fewer hex digits
 * the old text's last bytes stay behind that NUL.
 */
function looksLikeDescriptor (head: Buffer): boolean {
  const nul = head.indexOf(0)
  const text = head.subarray(0, Math.min(nul < 0 ? head.length : nul, 1024)).toString('latin1')
  if (/[\x00-\x08\x0e-\x1f]/.test(text)) return false
  return /^\s*(#|version\s*=)/i.test(text)
}

/**
 * Open the extents a descriptor file (`path`, whose stat is `self`) lists. A sparse extent must
 * be a file of its own (two lines naming one file would allocate in it independently), FLAT
 * lines may share a file (a partitioned device's descriptor) only in ranges that do not
 * overlap, and no line may name the descriptor itself. (A FLAT extent's bytes are the guest's:
 * they may well start like a VMDK file. Files that other descriptors use too are the store's
 * concern: peek.ts FileUsers.)
 */
async function openExtents (path: string, desc: Descriptor, writable: boolean, root: string | undefined, self: Stats): Promise<Extent[]> {
  const dir = dirname(path)
  const out: Extent[] = []
  // file identity → who uses it: the descriptor, or the byte ranges FLAT lines use
  const used = new Map<string, { file: string, flat?: Array<[number, number]> }>([[`${self.dev}:${self.ino}`, { file: path }]])
  try {
    for (const line of desc.extents) {
      const size = line.sectors * SECTOR
      if (line.type === 'ZERO' || line.access === 'NOACCESS') { out.push(new ZeroExtent(size)); continue }
      if (line.file === undefined) throw new RedoError('EINVAL', `${path}: ${line.type} extent line names no file`, path)
      const file = await resolveContained(dir, line.file, root, 'extent', path)
      const w = writable && line.access === 'RW'
      const st = await stat(file).catch(e => {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new RedoError('ENOENT', `${path}: extent file ${file} is missing`, path)
        throw e
      })
      if (!st.isFile() && !st.isBlockDevice()) throw new RedoError('EINVAL', `${path}: extent ${file} is not a regular file`, path)
      const id = `${st.dev}:${st.ino}`
      const flat = line.type === 'FLAT' || line.type === 'VMFS' ? [(line.offset ?? 0) * SECTOR, (line.offset ?? 0) * SECTOR + size] as [number, number] : undefined
      const before = used.get(id)
      if (before !== undefined) {
        if (before.file === path) throw new RedoError('EINVAL', `${path}: names itself as an extent (${file})`, path)
        if (flat === undefined || before.flat === undefined || before.flat.some(([s, e]) => flat[0] < e && s < flat[1])) {
          throw new RedoError('EINVAL', `${path}: extent file ${file} is listed twice${flat !== undefined && before.flat !== undefined ? ' with overlapping ranges' : ''} (also as ${before.file})`, path)
        }
        before.flat.push(flat)
      } else used.set(id, { file, flat: flat !== undefined ? [flat] : undefined })
      switch (line.type) {
        case 'FLAT':
        case 'VMFS':
          out.push(await FlatExtent.open(file, line.sectors, line.offset ?? 0, w))
          break
        case 'SPARSE':
        case 'VMFSSPARSE': {
          const magic = await headMagic(file)
          if (magic === KDMV_MAGIC) out.push(await SparseExtent.open(file, w))
          else if (magic === COWD_MAGIC) out.push(await CowdExtent.open(file, w))
          else throw new RedoError('EINVAL', `${file}: bad magic ${(magic ?? 0).toString(16).padStart(8, '0')} for a ${line.type} extent of ${path}`, file)
          break
        }
        case 'SESPARSE':
          out.push(await SeSparseExtent.open(file))
          break
        default:
          throw new RedoError('ENOTSUP', `${path}: ${line.type} extents are not supported`, path)
      }
      const e = out[out.length - 1]
      if (e.size !== size) throw new RedoError('EINVAL', `${file}: extent holds ${e.size / SECTOR} sectors, but ${path} says ${line.sectors}`, file)
    }
    return out
  } catch (e) {
    for (const x of out) await x.close().catch(() => {})
    throw e
  }
}


/** The first four bytes of `file` as a little-endian number (undefined when it is shorter). */
async function headMagic (file: string): Promise<number | undefined> {
  const fh = await openStoreFile(file)
  const m = Buffer.alloc(4)
  try {
    const { bytesRead } = await fh.read(m, 0, 4, 0)
    return bytesRead === 4 ? m.readUInt32LE(0) : undefined
  } finally {
    await fh.close()
  }
}

/** Suffix of files a chain no longer uses, awaiting deletion (Layer.drop). */
export const DROPPED = '.redofs-dropped'

/**
 * Delete dropped files. Never fails the caller: the chain already changed, and a file left
 * behind (missing ones are fine too) is deleted at the next writable open. The space is free
 * when this returns.
 */
export async function reapDropped (paths: string[]): Promise<void> {
  await reapEach(paths, unlink)
}

/**
 * reapDropped for a process about to exit (the offline commands): the names are gone when this
 * returns, and a large file's blocks are freed by a helper process after it (freeLater). Not
 * for the mount's server, whose descriptors (/dev/fuse among them) a helper could inherit, nor
 * where a space check comes next.
 */
export async function reapDroppedFreeingLater (paths: string[]): Promise<void> {
  await reapEach(paths, freeLater)
}

async function reapEach (paths: string[], remove: (p: string) => Promise<void>): Promise<void> {
  await delayPoint('reap')
  for (const p of paths) {
    if (!p.endsWith(DROPPED)) throw new Error(`${p}: not a dropped file`)
    try {
      await remove(p)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') log.formats('%s: not deleted yet: %s', p, (e as Error).message)
    }
  }
}

/** Files holding at least this much are freed by a helper process (freeLater). */
const FREE_LATER_BYTES = 32 << 20

/**
 * Delete `p`; when it holds many blocks, leave freeing them to a short-lived helper process.
 * Freeing a large file is the slow part of deleting it (every extent goes back to the file
 * system, discarded on `-o discard` mounts: ~0.2 s per 512 MiB on ext4), and it happens when
 * the last reference goes, not at unlink. So: open it, unlink the name (fast while open), give
 * the descriptor to `cat` reading from a pipe of ours, and close ours: the name is gone when
 * this returns, and the blocks go back as the helper exits. A crash meanwhile leaves an orphan
 * inode, which the file system's journal frees at its next mount. Without a helper (no `cat`,
 * no fork), the last close here frees them, as a plain unlink would.
 */
async function freeLater (p: string): Promise<void> {
  // not through a symlink, and never waiting on a FIFO someone named like a dropped file
  const fh = await open(p, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK).catch(() => undefined)
  if (fh === undefined) { await unlink(p); return }
  let release: (() => void) | undefined
  try {
    const st = await fh.stat()
    const big = st.isFile() && st.nlink === 1 && st.blocks * 512 >= FREE_LATER_BYTES
    await unlink(p)
    if (big) release = await handOff(fh, p)
  } finally {
    try { await fh.close() } finally { release?.() }
  }
}

/**
 * Start a helper process that holds `fh`'s file until it exits (see freeLater). Returns what
 * lets it exit, to call once `fh` is closed; undefined when no helper could start.
 */
async function handOff (fh: FileHandle, p: string): Promise<(() => void) | undefined> {
  const { spawn } = await import('node:child_process')
  try {
    // by absolute path and from /: nothing on PATH or under the cwd gets the file
    const helper = spawn('/bin/cat', [], { cwd: '/', stdio: ['pipe', 'ignore', 'ignore', fh.fd] })
    const started = await new Promise<boolean>(resolve => {
      helper.once('spawn', () => resolve(true))
      helper.once('error', e => { log.formats('%s: no helper to free its blocks: %s', p, e.message); resolve(false) })
    })
    if (!started) return undefined
    helper.on('error', () => {})
    helper.stdin?.on('error', () => {})
    helper.unref()
    return () => helper.stdin?.end()
  } catch (e) {
    log.formats('%s: no helper to free its blocks: %s', p, (e as Error).message)
    return undefined
  }
}

/** Reap what a crash left between drop and reap in `dir`. */
export async function reapDroppedIn (dir: string): Promise<void> {
  const names = await readdir(dir).catch(() => [] as string[])
  const left = names.filter(n => n.endsWith(DROPPED)).map(n => join(dir, n))
  if (left.length === 0) return
  log.formats('%s: deleting %d file(s) an interrupted commit or discard dropped', dir, left.length)
  await reapDropped(left)
}

/** The hint a child in `childDir` should store for `parentPath`: relative when possible. */
export function parentHintFor (childDir: string, parentPath: string): string {
  const rel = relative(childDir, parentPath)
  return isAbsolute(rel) ? parentPath : rel
}
