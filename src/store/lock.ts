/**
 * One user per store: a lock file naming the holder, written under a name of its own and
 * hard-linked into place (atomic, on NFS too; created with O_EXCL where hard links are refused).
 * A lock of this host whose process is gone (or whose pid a younger process took) is stale and
 * is replaced; takers of one host take turns through an abstract socket (claimHost), so only
 * one of them can replace it.
 */
import { readFileSync } from 'node:fs'
import { link, open, readdir, readFile, rename, stat, unlink } from 'node:fs/promises'
import { createServer, type Server } from 'node:net'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { RedoError } from '../errors'
import { delayPoint, faultPoint } from '../fault'
import { readStoreFile } from '../formats/extent'
import { log } from '../log'

export interface LockInfo {
  pid: number
  host: string
  since: string
  what: string
}

export const lockPath = (root: string): string => join(root, '.redofs.lock')

/**
 * A process with this pid runs (perhaps another user's). A zombie does not: it has exited and
 * waits for its parent to reap it, which may be the very caller waiting for it to go (a script
 * that started `redofs mount` and runs `redofs umount`).
 */
export function alive (pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false
  try {
    process.kill(pid, 0)
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM'
  }
  const state = procStat(pid)?.[0]
  return state !== undefined && state !== 'Z' && state !== 'X'
}

/**
 * The fields of /proc/<pid>/stat after the command name (the state first, field 22 the start
 * time at [19]), or undefined when the process is gone. The name is in parentheses and may
 * hold spaces and parentheses itself.
 */
export function procStat (pid: number): string[] | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'latin1')
    return s.slice(s.lastIndexOf(')') + 2).split(' ')
  } catch {
    return undefined
  }
}

export async function readLock (root: string): Promise<LockInfo | undefined> {
  try {
    return JSON.parse((await readStoreFile(lockPath(root))).toString('utf8')) as LockInfo
  } catch {
    return undefined
  }
}

let tmpSeq = 0

const busy = (root: string, h: LockInfo): RedoError =>
  new RedoError('EBUSY', `${root}: store is in use by ${h.what} (pid ${h.pid} on ${h.host} since ${h.since})` +
    (h.host !== hostname() ? `; if that host is gone for good, delete ${lockPath(root)}` : ''), lockPath(root))

const NO_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS'])

/**
 * This host's claim on a store: an abstract UNIX socket named after the store directory's
 * device and inode. The kernel gives the name to one process at a time (per network namespace)
 * and frees it when that process ends, however it ends, so of the processes taking the store
 * on this host one at a time gets to look at the lock file: a stale lock is replaced by one
 * taker only. It does not decide alone (a holder may predate it, or live in another network
 * namespace): the lock file's holder must also be gone. Connections are refused. undefined:
 * another process has the claim.
 */
async function claimHost (root: string): Promise<Server | undefined> {
  const st = await stat(root, { bigint: true })
  const srv = createServer(c => c.destroy())
  srv.maxConnections = 0
  return await new Promise((resolve, reject) => {
    const failed = (e: Error): void => { if ((e as NodeJS.ErrnoException).code === 'EADDRINUSE') resolve(undefined); else reject(e) }
    srv.once('error', failed)
    srv.listen({ path: `\0redofs-store:${st.dev}:${st.ino}` }, () => {
      srv.off('error', failed)
      srv.on('error', e => log.store('%s: store claim socket: %s', root, e.message))
      srv.unref()
      resolve(srv)
    })
  })
}

/** `info` written to `path` (opened with `flags`) and synced. */
async function writeLockFile (path: string, flags: 'w' | 'wx', info: LockInfo): Promise<void> {
  const fh = await open(path, flags, 0o644)
  try {
    await fh.writeFile(JSON.stringify(info) + '\n')
    await fh.sync()
  } finally {
    await fh.close()
  }
}

/** A holder of this host whose process still runs (its pid not taken by a younger process). */
async function holdsHere (h: LockInfo): Promise<boolean> {
  return h.host === hostname() && alive(h.pid) && !await startedAfter(h.pid, h.since)
}

/** Whether the process `pid` of this host started after `since` (its pid was reused). */
async function startedAfter (pid: number, since: string): Promise<boolean> {
  try {
    const btime = Number(/^btime (\d+)$/m.exec(await readFile('/proc/stat', 'latin1'))?.[1])
    const start = Number(procStat(pid)?.[19]) / 100 // USER_HZ
    const t = Date.parse(since)
    return Number.isFinite(btime) && Number.isFinite(start) && Number.isFinite(t) && (btime + start) * 1000 > t + 2000
  } catch {
    return false
  }
}

export class StoreLock {
  private constructor (readonly root: string, private readonly info: LockInfo, private readonly claim: Server) {}

  static async acquire (root: string, what: string): Promise<StoreLock> {
    const info: LockInfo = { pid: process.pid, host: hostname(), since: new Date().toISOString(), what }
    const p = lockPath(root)
    let claim = await claimHost(root)
    // another process of this host is taking the store (or holds it): give a taker a moment
    for (let wait = 0; claim === undefined && wait < 5; wait++) {
      const holder = await readLock(root)
      if (holder !== undefined && await holdsHere(holder)) throw busy(root, holder)
      await new Promise(resolve => setTimeout(resolve, 100))
      claim = await claimHost(root)
    }
    if (claim === undefined) throw new RedoError('EBUSY', `${root}: store is in use by another process of this host (it holds the store's claim but no lock file names it yet)`, p)
    try {
      // The lock file appears complete or not at all: written and synced under a name of our
      // own, then linked into place (link fails if the name exists; atomic on NFS too).
      // Created in place, a kill between the create and the write left an empty lock.
      const tmp = `${p}.${info.host}.${process.pid}.${++tmpSeq}.tmp`
      // such names left by killed processes of this host
      for (const n of await readdir(root).catch(() => [])) {
        const m = /^\.redofs\.lock\.(.+)\.(\d+)\.\d+\.tmp$/.exec(n)
        if (m !== null && m[1] === info.host && !alive(Number(m[2]))) await unlink(join(root, n)).catch(() => {})
      }
      await writeLockFile(tmp, 'w', info)
      faultPoint('lock.staged')
      try {
        await StoreLock.take(root, info, p, tmp)
        return new StoreLock(root, info, claim)
      } finally {
        await unlink(tmp).catch(() => {})
      }
    } catch (e) {
      claim.close()
      throw e
    }
  }

  /** The lock file in place, with this host's claim held (see claimHost). */
  private static async take (root: string, info: LockInfo, p: string, tmp: string): Promise<void> {
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await link(tmp, p)
        return
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code ?? ''
        if (NO_LINKS.has(code)) {
          // no hard links here (vfat, exFAT, some network and FUSE file systems): created in
          // place, which a kill between create and write can leave empty
          if (await StoreLock.createInPlace(p, info)) return
        } else if (code !== 'EEXIST') throw e
      }
      const holder = await readLock(root)
      if (holder === undefined) {
        // another host's, being created in place, or damaged: never taken over
        if (attempt < 2) { await new Promise(resolve => setTimeout(resolve, 50)); continue }
        throw new RedoError('EBUSY', `${root}: store is locked (${p} exists but cannot be read)`, p)
      }
      if (holder.host !== info.host || await holdsHere(holder)) throw busy(root, holder)
      // its writer is gone (or its pid now belongs to a younger process), and no other taker
      // of this host can be here (we hold the claim): replaced in one step
      log.store('%s: taking over a stale lock (pid %d since %s)', root, holder.pid, holder.since)
      await delayPoint('lock.takeover') // tests: widen the window another taker would race in
      await rename(tmp, p)
      return
    }
    throw new RedoError('EBUSY', `${root}: could not take the store lock ${p}`, p)
  }

  /** The lock created with O_EXCL and written; false when it exists. */
  private static async createInPlace (p: string, info: LockInfo): Promise<boolean> {
    return await writeLockFile(p, 'wx', info).then(() => true, e => { if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false; throw e })
  }

  async release (): Promise<void> {
    try {
      const holder = await readLock(this.root)
      if (holder?.pid === this.info.pid && holder.host === this.info.host) await unlink(lockPath(this.root)).catch(() => {})
    } finally {
      this.claim.close()
    }
  }
}
