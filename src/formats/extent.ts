/**
 * The narrow interface every on-disk extent kind implements (flat, hosted sparse, COWD, SEsparse,
 * zero).
 * All positions and lengths are bytes relative to the start of the extent.
 */
import type { Stats } from 'node:fs'
import { constants } from 'node:fs'
import { open, realpath, rename, unlink, type FileHandle } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { RedoError } from '../errors'
import { failPoint } from '../fault'

/**
 * The state of files as they were opened (identity, size, times), noted when a reader asked
 * for it (recordOpens): a reader that holds no lock compares it with the files once it has
 * read (Chain.changedSince). Taken at each open's first stat, before any metadata is read.
 */
let opened: Map<string, string> | undefined

/** Start noting the state of every file opened from here on (keyed by resolved path). */
export function recordOpens (): Map<string, string> {
  opened = new Map()
  return opened
}

export function noteOpened (path: string, st: Stats): void { opened?.set(resolve(path), fileStateOf(st)) }

export function fileStateOf (st: Stats): string { return `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}` }

/** What an extent holds at a position: its own data, zeros that mask the parent, or nothing. */
export type State = 'data' | 'zero' | 'none' | 'bad'

export interface Run {
  start: number
  length: number
  state: 'data' | 'zero' | 'bad'
}

/** Reads bytes of the layers below, used to fill the rest of a grain on copy-on-write. */
export type ReadBelow = (buf: Buffer, off: number, pos: number, len: number) => Promise<void>

export interface Extent {
  readonly kind: 'flat' | 'sparse' | 'cowd' | 'zero' | 'stream' | 'sesparse'
  /** Backing file, undefined for ZERO extents. */
  readonly path?: string
  readonly size: number
  /** Allocation unit in bytes (the whole extent for flat files). */
  readonly grainBytes: number
  /** Problems found while opening (a GTE past EOF, a short flat file...): reads there fail with EIO. */
  readonly problems: string[]
  readonly writable: boolean
  /** State at `pos` and for how many bytes (at most `len`) it stays the same. */
  lookup (pos: number, len: number): { state: State, length: number }
  /** Every allocated run, sorted and merged. Memory is proportional to allocation. */
  runs (): Run[]
  /** Read [pos, pos+len); where the extent holds nothing the bytes are zeros. */
  read (buf: Buffer, off: number, pos: number, len: number): Promise<void>
  /**
   * Say where the bytes of [pos, pos+len) are instead of reading them (see ReadPlan). False when
   * this extent cannot (compressed grains, damage, a file shorter than it should be, a full
   * plan): the caller then reads, and reports what is wrong.
   */
  plan (p: ReadPlan, pos: number, len: number): boolean
  /**
   * Say where an overwrite of [pos, pos+len) goes instead of writing it (p.data runs only),
   * when every byte of it already has its place in the file; the extent then counts as written
   * (its next flush waits for the planned writes, then syncs). False when it cannot: the caller
   * then writes, and drops what p may already hold. Extents without it are always written by
   * the caller.
   */
  planWrite? (p: ReadPlan, pos: number, len: number): boolean
  /** Write [pos, pos+len), allocating grains; `below` fills the rest of a new grain. */
  write (buf: Buffer, off: number, pos: number, len: number, below: ReadBelow): Promise<void>
  /** Mark the extent open for writing on disk (uncleanShutdown) before the first change. */
  beginWrite (): Promise<void>
  /** Make every acknowledged write durable (data, then metadata). */
  flush (): Promise<void>
  /** Flush and mark the extent cleanly closed (uncleanShutdown = 0). */
  endWrite (): Promise<void>
  close (): Promise<void>
  /** Bytes of data the extent holds on disk. */
  allocatedBytes (): number
  /** Structural check (VMDK.md §3.5): a list of problems, empty when clean. */
  check (): Promise<string[]>
}

/**
 * Where the bytes of a read are, for a reader that does the I/O itself (the FUSE server's
 * worker threads, src/fs/plans.ts): runs of a descriptor and runs of zeros, in order. Both
 * return false once the plan is full. An overwrite's plan (Extent.planWrite) has descriptor
 * runs only.
 */
export interface ReadPlan {
  data (fd: number, pos: number, len: number): boolean
  zero (len: number): boolean
}

let plannedIo: (() => Promise<void>) | undefined

/**
 * Install the wait for reads and overwrites planned so far (Extent.plan, Extent.planWrite) to be
 * done by whoever took the plans. A layer waits for it before it closes its descriptors (a
 * number reused by the next open would be read or written instead), I/O holds wait for it as
 * for I/O in flight (src/store/gate.ts), and an extent's flush before it syncs.
 */
export function setPlannedIo (fn: (() => Promise<void>) | undefined): void { plannedIo = fn }

/** Resolve once every read and write planned before the call has been done (at once when none can be). */
export async function plannedIoDone (): Promise<void> { if (plannedIo !== undefined) await plannedIo() }

/**
 * An extent's overwrites handed to the FUSE workers since its last flush (Extent.planWrite),
 * and the rule its flush follows: wait for them before taking the snapshot it syncs, and stay
 * dirty when another is planned while it waits (that one may land after the sync).
 */
export class PlannedWrites {
  private planned = false

  mark (): void { this.planned = true }

  /** Before a flush snapshots its state: every planned write has been done once this resolves. */
  async settle (): Promise<void> {
    if (!this.planned) return
    this.planned = false
    await plannedIoDone()
  }

  /** A write was planned since settle() began: the flush must leave the extent dirty. */
  get pending (): boolean { return this.planned }
}

/** pread exactly len bytes or fail with EIO naming the file (short files are damage, not zeros). */
export async function readExact (fh: FileHandle, path: string, buf: Buffer, off: number, len: number, pos: number): Promise<void> {
  let done = 0
  while (done < len) {
    const { bytesRead } = await fh.read(buf, off + done, len - done, pos + done)
    if (bytesRead === 0) throw new RedoError('EIO', `${path}: short read at byte ${pos + done} (file ends before the data it should hold)`, path)
    done += bytesRead
  }
}

export async function writeExact (fh: FileHandle, buf: Buffer, off: number, len: number, pos: number): Promise<void> {
  let done = 0
  while (done < len) {
    const { bytesWritten } = await fh.write(buf, off + done, len - done, pos + done)
    done += bytesWritten
  }
}

/** A tiny FIFO mutex: allocation and metadata flushes must not interleave. */
export class Mutex {
  private tail: Promise<void> = Promise.resolve()

  async run<T> (fn: () => Promise<T>): Promise<T> {
    const prev = this.tail
    let release!: () => void
    this.tail = new Promise<void>(resolve => { release = resolve })
    await prev
    try {
      return await fn()
    } finally {
      release()
    }
  }
}

/** Zero-filled extent (`RW n ZERO`). */
export class ZeroExtent implements Extent {
  readonly kind = 'zero' as const
  readonly problems: string[] = []
  readonly writable = false
  readonly grainBytes: number
  constructor (readonly size: number) { this.grainBytes = size }
  lookup (_pos: number, len: number): { state: State, length: number } { return { state: 'zero', length: len } }
  runs (): Run[] { return this.size > 0 ? [{ start: 0, length: this.size, state: 'zero' }] : [] }
  async read (buf: Buffer, off: number, _pos: number, len: number): Promise<void> { buf.fill(0, off, off + len) }
  plan (p: ReadPlan, _pos: number, len: number): boolean { return p.zero(len) }
  async write (): Promise<void> { throw new RedoError('EROFS', 'a ZERO extent cannot be written') }
  async beginWrite (): Promise<void> {}
  async flush (): Promise<void> {}
  async endWrite (): Promise<void> {}
  async close (): Promise<void> {}
  allocatedBytes (): number { return 0 }
  async check (): Promise<string[]> { return [] }
}

/**
 * fdatasync that stays failed. Linux reports a failed write-back once per open file: the pages
 * are marked clean, and the next fdatasync returns success over data that never reached the
 * disk. A retried flush would then write grain tables pointing at lost grains and tell the guest
 * its fsync worked. So the first failure is kept: every later sync of the file fails with it,
 * the failure is listed in the file's problems (status shows it), and only opening the file
 * again (remounting) clears it.
 */
export class DataSync {
  private failure: RedoError | undefined
  constructor (private readonly fh: FileHandle, private readonly path: string, private readonly problems: string[]) {}

  async sync (): Promise<void> {
    if (this.failure !== undefined) throw this.failure
    try {
      failPoint('datasync')
      await this.fh.datasync()
    } catch (e) {
      const cause = (e as Error).message
      this.failure = new RedoError('EIO', `${this.path}: writing back to the disk failed (${cause}); what was written since the last successful flush may be lost, so every later flush of this file fails until it is opened again`, this.path)
      this.problems.push(this.failure.message)
      throw this.failure
    }
  }
}

/**
 * Wait for every promise, then throw the first failure. Unlike Promise.all this never returns
 * while a positioned read or write still owns the caller's buffer.
 */
export async function settleAll (ps: Array<Promise<void>>): Promise<void> {
  if (ps.length === 1) return await ps[0]
  const rs = await Promise.allSettled(ps)
  for (const r of rs) if (r.status === 'rejected') throw r.reason
}

/**
 * The whole new grain (`gb` bytes from `gStart`) for a write of `n` bytes of buf at `inGrain`
 * into a grain not allocated yet: the write's bytes, and around them (when `fill`) what lies
 * below, up to the extent's `size`; zeros otherwise. A whole-grain write is used as it is. The
 * head and the tail are read at once: each read is a round trip to the thread pool, and a
 * partial write followed by fsync waits for them.
 */
export async function newGrain (buf: Buffer, bo: number, n: number, gStart: number, inGrain: number, gb: number, size: number, fill: boolean, below: ReadBelow): Promise<Buffer> {
  if (n === gb) return buf.subarray(bo, bo + n)
  const valid = Math.min(gb, size - gStart)
  const g = Buffer.alloc(gb)
  if (fill) {
    const tail = inGrain + n
    const reads: Array<Promise<void>> = []
    if (inGrain > 0) reads.push(below(g, 0, gStart, inGrain))
    if (tail < valid) reads.push(below(g, tail, gStart + tail, valid - tail))
    await settleAll(reads)
  }
  buf.copy(g, inGrain, bo, bo + n)
  return g
}

/** Write several buffers back to back at pos (one writev; finishes a short write piecewise). */
export async function writeExactv (fh: FileHandle, bufs: Buffer[], pos: number): Promise<void> {
  if (bufs.length === 1) return await writeExact(fh, bufs[0], 0, bufs[0].length, pos)
  const total = bufs.reduce((s, b) => s + b.length, 0)
  const { bytesWritten } = await fh.writev(bufs, pos)
  if (bytesWritten === total) return
  const rest = Buffer.concat(bufs).subarray(bytesWritten)
  await writeExact(fh, rest, 0, rest.length, pos + bytesWritten)
}

/** Write a small file so that a crash leaves either the old or the new content. */
export async function writeFileDurable (path: string, text: string | Buffer): Promise<void> {
  const tmp = `${path}.redofs-tmp`
  // a fresh file: whatever has the name (a leftover, a FIFO, a symlink to elsewhere) goes first
  await unlink(tmp).catch(() => {})
  const fh = await open(tmp, 'wx')
  try {
    try {
      await fh.writeFile(text)
      await fh.sync()
    } finally {
      await fh.close()
    }
    await rename(tmp, path)
  } catch (e) {
    await unlink(tmp).catch(() => {})
    throw e
  }
  await syncDir(dirname(path))
}

export async function syncDir (dir: string): Promise<void> {
  const fh = await open(dir, 'r')
  try {
    await fh.sync()
  } catch (e) {
    // some filesystems refuse fsync on directories; an I/O error is a real failure
    const code = (e as NodeJS.ErrnoException).code
    if (code !== 'EINVAL' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'EBADF' && code !== 'EISDIR' && code !== 'EPERM' && code !== 'EACCES') throw e
  } finally {
    await fh.close()
  }
}

/** The real path of `p`, or `p` resolved when it cannot be read (missing, a broken link). */
export async function realOrResolved (p: string): Promise<string> {
  return await realpath(p).catch(() => resolve(p))
}

/**
 * Open a file of the store. Without O_NONBLOCK, opening a FIFO someone named like a VMDK (or a
 * .vmx, a journal...) would wait for a writer forever, and the mount with it; regular files
 * ignore the flag. Callers check that what they opened is a regular file.
 */
export async function openStoreFile (path: string, writable = false): Promise<FileHandle> {
  return await open(path, (writable ? constants.O_RDWR : constants.O_RDONLY) | constants.O_NONBLOCK)
}

/** A whole small file of the store (ENOENT as readFile throws it; anything but a regular file is refused). */
export async function readStoreFile (path: string): Promise<Buffer> {
  const fh = await openStoreFile(path)
  try {
    if (!(await fh.stat()).isFile()) throw new RedoError('EINVAL', `${path}: not a regular file`, path)
    return await fh.readFile()
  } finally {
    await fh.close()
  }
}

/** A whole small file, or undefined when it does not exist (other errors are thrown). */
export async function readIfExists (path: string): Promise<Buffer | undefined> {
  try {
    return await readStoreFile(path)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw e
  }
}
