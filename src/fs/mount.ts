/**
 * The FUSE adapter: maps paths to store objects (tree.ts), FUSE calls to disk calls, errors to
 * errnos, and control-file writes to store commands. No format or chain logic lives here.
 */
import { open as openAsync, statfs as statfsAsync, type FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import type Fuse from 'fuse-native'
import { RedoError } from '../errors'
import { setPlannedIo } from '../formats/extent'
import { log } from '../log'
import { USAGE } from '../store/args'
import type { Disk, Generation } from '../store/disk'
import type { Store } from '../store/store'
import { FH_DIRECT_IO, FH_KEEP_CACHE, FH_MASK, TunedFuse, once, patchLevel, planCounter, writePlanTable } from './fuse'
import { FH_CLASSIC, READ_PLAN, WRITE_PLAN, WorkerIo } from './plans'
import { resolvePath, type Node } from './tree'

const S_IFDIR = 0o040000
const S_IFREG = 0o100000
const S_IFLNK = 0o120000
const O_ACCMODE = 3
const EISDIR = -21
const ENOENT = -2
const EPERM = -1
const EROFS = -30
const EACCES = -13
const EINVAL = -22
/** Write barriers (betweenWrites) running at once across disks; the thread pool has 16 threads. */
const MAX_BARRIERS = 4

type Handle =
  | { kind: 'image', disk: Disk, gen: Generation | 'live', write: boolean, path: string }
  | { kind: 'text', data: Buffer }
  | { kind: 'command', node: Extract<Node, { kind: 'command' }>, path: string }

export interface MountOptions {
  allowOther?: boolean
  debug?: boolean
  /** Kernel readahead window of the mounted files, bytes; set by serve (0: the kernel's 128 KiB). */
  readahead?: number
  /**
   * Worker-side reads and overwrites (src/fs/plans.ts) when the addon has them; false: JS reads
   * and writes everything.
   */
  workerIo?: boolean
}

/** Worker-side I/O of every mount in this process (see RedoMount.mount). */
let processIo: WorkerIo | undefined

/**
 * 1 MiB instead of the kernel's 128 KiB for FUSE: the kernel then keeps several 128 KiB reads
 * in flight ahead of a sequential reader (cold dd 4k and 128k reads 1.4-1.6x faster;
 * native-notes/performance.md, session 6).
 */
export const DEFAULT_READAHEAD = 1 << 20

/** A chain switch waiting for the kernel to hold the live file's inode lock (see betweenWrites). */
interface Barrier { fn: () => Promise<void>, dropCache: boolean, result: Promise<void> | null, dropFh: FileHandle | null }

export class RedoMount {
  private fuse: TunedFuse | null = null
  private handles = new Map<number, Handle>()
  private nextFh = 1
  private readonly uid = process.getuid?.() ?? 0
  private readonly gid = process.getgid?.() ?? 0
  private readonly mountedAt = new Date()
  /** Paths of the command files whose write(2) is running its command. */
  private readonly commandsRunning = new Set<string>()
  /**
   * 'per-open' (patched addon): the page cache serves images, each open says whether to keep
   * what the kernel cached; 'direct': every file is direct_io (the stock addon cannot choose).
   */
  readonly cacheMode: 'per-open' | 'direct' = patchLevel() >= 2 ? 'per-open' : 'direct'
  /** Per frozen path: the generation its cached pages belong to. */
  private readonly cachedAs = new Map<string, Generation>()
  /** Disks whose live file changed under the kernel's cache: its next open drops the pages. */
  private readonly dropLive = new Set<Disk>()
  private readonly barriers = new Map<Disk, Barrier>()
  private readonly barrierTurns = new Map<Disk, Promise<void>>()
  private barriersRunning = 0
  private readonly barrierQueue: Array<() => void> = []
  /** Worker-side reads and overwrites (src/fs/plans.ts), set up at mount when the addon has them. */
  private plans: WorkerIo | null = null

  constructor (readonly store: Store, readonly mnt: string, readonly opts: MountOptions = {}) {}

  async mount (): Promise<void> {
    const extra = ['big_writes', 'atomic_o_trunc']
    if (this.cacheMode === 'direct') extra.push('direct_io')
    const fuse = new TunedFuse(this.mnt, this.ops(), {
      timeout: false,
      autoUnmount: true,
      allowOther: this.opts.allowOther === true,
      defaultPermissions: this.opts.allowOther === true,
      fsname: 'redofs',
      subtype: 'redofs',
      debug: this.opts.debug === true
    }, extra)
    const counter = this.opts.workerIo === false ? undefined : planCounter()
    if (counter !== undefined) {
      // one per process, like the addon's completion counters and the setPlannedIo hook: a
      // second mount in the process must count its plans in the same epochs
      processIo ??= new WorkerIo(counter, writePlanTable())
      const plans = processIo
      this.plans = plans
      // from now on layers that close and I/O holds wait for the plans given out before
      setPlannedIo(async () => await plans.drain())
    }
    await new Promise<void>((resolve, reject) => fuse.mount(err => err !== null && err !== undefined ? reject(err) : resolve()))
    this.fuse = fuse
    // the mount callback fires before INIT is answered: let it through before anyone uses it
    await new Promise(resolve => setImmediate(resolve))
    for (const d of this.disks()) {
      d.liveBarrier = async (fn, dropCache) => await this.betweenWrites(d, fn, dropCache)
    }
  }

  async unmount (): Promise<void> {
    const f = this.fuse
    if (f === null) return
    this.fuse = null
    for (const d of this.disks()) d.liveBarrier = null
    await new Promise<void>(resolve => f.unmount(err => {
      if (err !== null && err !== undefined) log.fs('unmount: %s', err.message)
      resolve()
    }))
  }

  private * disks (): Generator<Disk> {
    for (const vm of this.store.vms.values()) yield * vm.disks.values()
  }

  private livePath (d: Disk): string { return join(this.mnt, d.vm, `${d.name}.img`) }

  /**
   * Run fn while the kernel holds the live file's inode lock. Every write(2) to the file holds
   * that lock from its first FUSE request to its last (the kernel splits a write at max_write
   * and, through the page cache, at a partial page), and the kernel sends FSYNC holding it too.
   * So: open the live file through the mount from the thread pool (never synchronously: this
   * process serves the mount), fsync it, and run fn inside that FSYNC request. Whichever FSYNC
   * arrives first runs it (a user's fsync holds the same lock). With `dropCache` (the live
   * content changed), the file is opened once more without keep_cache before FSYNC is
   * answered, so the kernel drops its pages before any write or fsync caller goes on; that
   * descriptor is closed after the answer (close takes the inode lock).
   * One barrier per disk at a time, MAX_BARRIERS across disks: each holds up to two thread-pool
   * threads while it waits.
   */
  private async betweenWrites (d: Disk, fn: () => Promise<void>, dropCache: boolean): Promise<void> {
    const turn = this.barrierTurns.get(d) ?? Promise.resolve()
    let next!: () => void
    const mine = new Promise<void>(resolve => { next = resolve })
    this.barrierTurns.set(d, mine)
    await turn
    // across disks a few at a time: each blocks up to two of the thread pool's 16 threads in the
    // kernel until its FSYNC is answered, and answering needs the pool too
    while (this.barriersRunning >= MAX_BARRIERS) await new Promise<void>(resolve => this.barrierQueue.push(resolve))
    this.barriersRunning++
    const b: Barrier = { fn, dropCache, result: null, dropFh: null }
    this.barriers.set(d, b)
    let problem = ''
    try {
      try {
        const fh = await openAsync(this.livePath(d), 'r')
        try { await fh.sync() } finally { await fh.close() }
      } catch (e) {
        problem = (e as Error).message
      } finally {
        if (this.barriers.get(d) === b) this.barriers.delete(d)
      }
      if (b.result === null) {
        // the FSYNC never reached us: switch anyway, and say what was not guaranteed
        d.notice(`the write barrier on ${d.name}.img failed (${problem === '' ? 'the kernel sent no FSYNC' : problem}); a write(2) in flight during the switch may have been split`)
        b.result = this.runBarrier(d, b)
      } else if (problem !== '') {
        log.fs('%s/%s: fsync after the switch: %s', d.vm, d.name, problem)
      }
      await b.result
    } finally {
      await b.dropFh?.close().catch(e => log.fs('%s/%s: %s', d.vm, d.name, (e as Error).message))
      if (this.barrierTurns.get(d) === mine) this.barrierTurns.delete(d)
      this.barriersRunning--
      this.barrierQueue.shift()?.()
      next()
    }
  }

  /** The switch, then (if asked) an open without keep_cache that drops the live file's pages. */
  private async runBarrier (d: Disk, b: Barrier): Promise<void> {
    await b.fn()
    if (!b.dropCache) return
    this.dropLive.add(d)
    try {
      b.dropFh = await openAsync(this.livePath(d), 'r')
    } catch (e) {
      // the flag stays set: the next open of the file drops the pages
      d.notice(`could not drop the kernel's cached pages of ${d.name}.img (${(e as Error).message}); descriptors opened before the change may read old data until the file is opened again`)
    }
  }

  /**
   * A request a FUSE worker failed to do from its plan went right when JS did it: nothing was
   * lost, but it should not happen (a plan naming the wrong descriptor, say), so status says so.
   * When JS fails too, its error is reported the ordinary way.
   */
  private workerRetried (d: Disk, op: 'read' | 'write', path: string, len: number, pos: number): void {
    d.notice(`a worker-side ${op} of ${len} bytes at ${pos} of ${path.slice(1)} failed; done again by JS, it succeeded`)
  }

  /** A write done here, by JS (the worker-side plan declined or failed, or other files). */
  private writeOrdinary (fh: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void): void {
    once('write', cb, async () => {
      const h = this.handle(fh)
      if (h === undefined) return -9
      if (h.kind === 'image') {
        if (!h.write) return -9
        if (fh >= FH_CLASSIC) log.fs('%s: a worker-side write of %d bytes at %d failed; writing it here', h.path, len, pos)
        if (pos >= h.disk.size) return -28 // ENOSPC: a block device does not grow
        // a write across the end stops there, as on a block device (the caller gets ENOSPC next)
        const n = Math.min(len, h.disk.size - pos)
        await h.disk.write(buf, 0, pos, n)
        if (fh >= FH_CLASSIC) this.workerRetried(h.disk, 'write', h.path, len, pos)
        return n
      }
      if (h.kind !== 'command') return EACCES
      const text = buf.toString('utf8', 0, len)
      this.commandsRunning.add(h.path)
      try {
        await this.runCommand(h.node, text)
      } finally {
        this.commandsRunning.delete(h.path)
      }
      return len
    })
  }

  /** A read done here, by JS (the worker-side plan declined or failed, or other files). */
  private readOrdinary (fh: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void): void {
    once('read', cb, async () => {
      const h = this.handle(fh)
      if (h === undefined) return -9 // EBADF
      if (fh >= FH_CLASSIC) log.fs('%s: a worker-side read of %d bytes at %d failed; reading it here', h.kind === 'image' ? h.path : 'control file', len, pos)
      if (h.kind === 'image') {
        const n = await h.disk.read(h.gen, buf, 0, pos, len)
        if (fh >= FH_CLASSIC) this.workerRetried(h.disk, 'read', h.path, len, pos)
        return n
      }
      const data = h.kind === 'text' ? h.data : Buffer.from(this.usage(h.node))
      if (pos >= data.length) return 0
      return data.copy(buf, 0, pos, Math.min(data.length, pos + len))
    })
  }

  private newHandle (h: Handle): number {
    const fh = this.nextFh
    this.nextFh = this.nextFh >= FH_MASK - 1 ? 1 : this.nextFh + 1
    this.handles.set(fh, h)
    return fh
  }

  private handle (fh: number): Handle | undefined {
    return this.handles.get(fh & FH_MASK)
  }

  /**
   * Cache flags for an image open (per-open mode). The kernel keeps one page cache per path, so
   * a frozen path's pages may be kept only while the path names the same generation.
   * While descriptors of the old generation are still open on a renumbered path, new opens
   * bypass the cache entirely, so neither side ever sees the other's pages.
   */
  private cacheFlags (disk: Disk, path: string, gen: Generation | 'live'): number {
    if (this.cacheMode !== 'per-open') return 0
    // The live file changes only through writes to it (write-through: they update the cache)
    // and discards (which drop the cache), so its pages are kept across opens too.
    if (gen === 'live') return this.dropLive.delete(disk) ? 0 : FH_KEEP_CACHE
    for (const h of this.handles.values()) {
      if (h.kind === 'image' && h.path === path && h.gen !== gen) return FH_DIRECT_IO
    }
    const keep = this.cachedAs.get(path) === gen
    this.cachedAs.set(path, gen)
    return keep ? FH_KEEP_CACHE : 0
  }

  private stat (node: Node): Fuse.Stat {
    const base = { uid: this.uid, gid: this.gid, nlink: 1, atime: this.mountedAt, ctime: this.mountedAt, mtime: this.mountedAt, blksize: 65536 }
    switch (node.kind) {
      case 'dir':
        return { ...base, mode: S_IFDIR | 0o755, size: 4096, nlink: 2 }
      case 'image': {
        const d = node.disk
        const live = node.gen === 'live'
        const g = live ? d.chain.redoCount : d.indexOf(node.gen as Generation)
        const mtime = live ? d.liveMtime : (node.gen as Generation).frozenAt
        return {
          ...base,
          mode: S_IFREG | (live && d.writable ? 0o644 : 0o444),
          size: d.size,
          blocks: Math.ceil(d.chain.allocatedBytes(Math.max(0, g)) / 512),
          mtime,
          ctime: mtime
        }
      }
      case 'command':
        return { ...base, mode: S_IFREG | 0o600, size: Buffer.byteLength(this.usage(node)) }
      case 'info':
        // size 0, like /proc: the text can change between this stat and the open, and a size the
        // kernel (or a reader sizing its buffer by fstat) took from here would cut it; readers
        // read to the end instead, and direct_io (see open) lets reads past this size through
        return { ...base, mode: S_IFREG | 0o444, size: 0, mtime: new Date(), ctime: new Date() }
      case 'link':
        return { ...base, mode: S_IFLNK | 0o777, size: node.target.length }
    }
  }

  private usage (node: Extract<Node, { kind: 'command' }>): string {
    if (node.command === 'poweroff' && node.disk !== undefined) return `${node.disk.poweroff}\n# ${USAGE.poweroff}\n`
    const u = USAGE[node.command] ?? node.command
    return `usage: echo '[args]' > ${node.command}\n${u}\n`
  }

  private ops (): Fuse.Ops {
    const lookup = (path: string): Node => {
      const n = resolvePath(this.store, path)
      if (n === undefined) throw new RedoError('ENOENT', `${path}: no such file`)
      return n
    }
    return {
      getattr: (path, cb) => once('getattr', cb, async () => [0, this.stat(lookup(path))]),
      readdir: (path, cb) => once('readdir', cb, async () => {
        const n = lookup(path)
        if (n.kind !== 'dir') return -20 // ENOTDIR
        return [0, n.names()]
      }),
      open: (path, flags, cb) => once('open', cb, async () => {
        const n = lookup(path)
        const acc = flags & O_ACCMODE
        const wantsWrite = acc === 1 || acc === 2
        switch (n.kind) {
          case 'dir': return EISDIR
          case 'link': return -40 // ELOOP: the kernel follows links itself
          case 'image': {
            if (wantsWrite && (n.gen !== 'live' || !n.disk.writable)) {
              n.disk.lastError = n.gen !== 'live'
                ? `${path}: generation ${n.disk.indexOf(n.gen)} is frozen; open it read-only`
                : `${path}: the live file is read-only (${n.disk.readOnlyBecause ?? 'read-only'})`
              return EROFS
            }
            const busy = n.disk.openRefusal(n.gen)
            if (busy !== undefined) {
              n.disk.lastError = busy.message
              return -16 // EBUSY
            }
            n.disk.opened(n.gen)
            const flags = this.cacheFlags(n.disk, path, n.gen)
            return [0, this.newHandle({ kind: 'image', disk: n.disk, gen: n.gen, write: wantsWrite, path }) | flags]
          }
          case 'info':
            if (wantsWrite) return EACCES
            return [0, this.newHandle({ kind: 'text', data: Buffer.from(n.text()) }) | (this.cacheMode === 'per-open' ? FH_DIRECT_IO : 0)]
          case 'command':
            // A second writer while a command written here still runs would wait, unkillable, on
            // the file's inode lock that the first write(2) holds, and then run its command after
            // all: it is refused now, as a command during a job is (SPEC §3)
            if (wantsWrite && this.commandsRunning.has(path)) {
              const msg = `${path}: the command written to it before is still running`
              if (n.disk !== undefined) n.disk.lastError = msg
              else n.vm.lastError = msg
              return -16 // EBUSY
            }
            return [0, this.newHandle({ kind: 'command', node: n, path })]
        }
      }),
      create: (_path, _mode, cb) => cb(EPERM),
      read: (_path, fh, buf, len, pos, cb) => {
        const plans = this.plans
        if (plans !== null && fh < FH_CLASSIC) {
          const h = this.handle(fh)
          if (h?.kind === 'image') {
            let planned = false
            try {
              planned = plans.plan(buf, len, p => h.disk.planRead(h.gen, p, pos, len))
            } catch (e) {
              log.fs('read plan failed (reading the ordinary way): %s', (e as Error).message)
            }
            if (planned) { cb(READ_PLAN); return }
          }
        }
        this.readOrdinary(fh, buf, len, pos, cb)
      },
      write: (_path, fh, buf, len, pos, cb) => {
        const plans = this.plans
        if (plans !== null && fh < FH_CLASSIC) {
          const h = this.handle(fh)
          if (h?.kind === 'image' && h.write && pos + len <= h.disk.size) {
            let slot = -1
            try {
              slot = plans.planWrite(len, p => h.disk.planWrite(p, pos, len))
            } catch (e) {
              log.fs('write plan failed (writing the ordinary way): %s', (e as Error).message)
            }
            if (slot >= 0) { cb(WRITE_PLAN + slot); return }
          }
        }
        this.writeOrdinary(fh, buf, len, pos, cb)
      },
      release: (_path, fh, cb) => once('release', cb, async () => {
        const h = this.handle(fh)
        this.handles.delete(fh & FH_MASK)
        if (h?.kind === 'image') h.disk.released(h.gen)
        return 0
      }),
      flush: (_path, _fh, cb) => cb(0),
      fsync: (_path, _datasync, fh, cb) => once('fsync', cb, async () => {
        const h = this.handle(fh)
        if (h?.kind !== 'image' || h.gen !== 'live') return 0
        const b = this.barriers.get(h.disk)
        if (b !== undefined && b.result === null) {
          // the kernel holds the file's inode lock until we answer: no write(2) is half done
          b.result = this.runBarrier(h.disk, b)
          await b.result.catch(() => {})
        }
        await h.disk.fsync()
        return 0
      }),
      truncate: (path, size, cb) => once('truncate', cb, async () => this.truncate(lookup(path), size)),
      ftruncate: (path, _fh, size, cb) => once('ftruncate', cb, async () => this.truncate(lookup(path), size)),
      statfs: (_path, cb) => once('statfs', cb, async () => {
        const s = await statfsAsync(this.store.root)
        // fuse-native passes 32-bit fields: grow the block size until the counts fit
        let bsize = s.bsize
        let scale = 1
        while (s.blocks / scale > 0xffffffff) { scale *= 2; bsize *= 2 }
        const f = (n: number): number => Math.floor(n / scale)
        return [0, {
          bsize, frsize: bsize, blocks: f(s.blocks), bfree: f(s.bfree), bavail: f(s.bavail),
          files: Math.min(s.files, 0xffffffff), ffree: Math.min(s.ffree, 0xffffffff), favail: Math.min(s.ffree, 0xffffffff),
          fsid: 0, flag: 0, namemax: 255
        }]
      }),
      readlink: (path, cb) => once('readlink', cb, async () => {
        const n = lookup(path)
        if (n.kind !== 'link') return EINVAL
        return [0, n.target]
      }),
      utimens: (_path, _a, _m, cb) => cb(0),
      chmod: (_p, _m, cb) => cb(EPERM),
      chown: (_p, _u, _g, cb) => cb(EPERM),
      unlink: (_p, cb) => cb(EPERM),
      rename: (_s, _d, cb) => cb(EPERM),
      mkdir: (_p, _m, cb) => cb(EPERM),
      rmdir: (_p, cb) => cb(EPERM),
      symlink: (_s, _d, cb) => cb(EPERM),
      link: (_s, _d, cb) => cb(EPERM),
      mknod: (_p, _m, _d, cb) => cb(EPERM)
    }
  }

  private truncate (n: Node, size: number): number {
    if (n.kind === 'command') return 0 // `echo x > file` opens with O_TRUNC
    if (n.kind !== 'image') return EACCES
    if (n.gen !== 'live' || !n.disk.writable) return EROFS
    return size === n.disk.size ? 0 : EPERM
  }

  private async runCommand (node: Extract<Node, { kind: 'command' }>, text: string): Promise<void> {
    const lines = text.split('\n').map(l => l.trim()).filter(l => l !== '')
    if (lines.length > 1) {
      const msg = `${node.command}: one command per write (got ${lines.length} lines)`
      if (node.disk !== undefined) node.disk.lastError = msg
      else node.vm.lastError = msg
      throw new RedoError('EINVAL', msg)
    }
    const line = lines[0] ?? ''
    if (node.disk !== undefined) {
      await node.disk.command(node.command, line)
    } else {
      await this.store.vmCommand(node.vm.name, node.command, line)
    }
  }
}

