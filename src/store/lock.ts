/**
 * One user per store. On this host, an abstract socket the kernel frees when its process ends
 * (claimHost) decides; the lock file names the holder for messages and for other hosts sharing
 * the store: written under a name of its own and hard-linked into place (atomic, on NFS too;
 * created with O_EXCL where hard links are refused). A lock file of this host whose writer no
 * longer holds the claim is stale and is replaced.
 */
import { link, open, readdir, readFile, rename, stat, unlink } from 'node:fs/promises'
import { createServer, type Server } from 'node:net'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { RedoError } from '../errors'
import { faultPoint } from '../fault'
import { log } from '../log'

export interface LockInfo {
  pid: number
  host: string
  since: string
  what: string
}

export const lockPath = (root: string): string => join(root, '.redofs.lock')

function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM'
  }
}

export async function readLock (root: string): Promise<LockInfo | undefined> {
  try {
    return JSON.parse(await readFile(lockPath(root), 'utf8')) as LockInfo
  } catch {
    return undefined
  }
}

let tmpSeq = 0

const NO_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS'])

/**
 * This host's claim on a store: an abstract UNIX socket named after the store directory's
 * device and inode. The kernel gives the name to one process at a time and frees it when that
 * process ends, however it ends, so among the processes of this host exactly one can hold (or
 * be taking) the store, and a lock file naming this host whose writer does not hold the claim
 * is stale, even if its pid now belongs to someone else. undefined: another process has it.
 */
async function claimHost (root: string): Promise<Server | undefined> {
  const st = await stat(root)
  const srv = createServer()
  return await new Promise((resolve, reject) => {
    srv.once('error', e => { if ((e as NodeJS.ErrnoException).code === 'EADDRINUSE') resolve(undefined); else reject(e) })
    srv.listen({ path: `\0redofs-store:${st.dev}:${st.ino}` }, () => { srv.unref(); resolve(srv) })
  })
}

export class StoreLock {
  private constructor (readonly root: string, private readonly info: LockInfo, private readonly claim: Server) {}

  static async acquire (root: string, what: string): Promise<StoreLock> {
    const info: LockInfo = { pid: process.pid, host: hostname(), since: new Date().toISOString(), what }
    const p = lockPath(root)
    const claim = await claimHost(root)
    if (claim === undefined) {
      const holder = await readLock(root)
      throw new RedoError('EBUSY', holder !== undefined && holder.host === info.host
        ? `${root}: store is in use by ${holder.what} (pid ${holder.pid} on ${holder.host} since ${holder.since})`
        : `${root}: store is in use by another process of this host`, p)
    }
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
      const fh = await open(tmp, 'w', 0o644)
      try {
        await fh.writeFile(JSON.stringify(info) + '\n')
        await fh.sync()
      } finally {
        await fh.close()
      }
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
      if (holder !== undefined && holder.host !== info.host) {
        throw new RedoError('EBUSY', `${root}: store is in use by ${holder.what} (pid ${holder.pid} on ${holder.host} since ${holder.since})`, p)
      }
      // Written on this host, or unreadable: whoever wrote it does not hold this host's claim
      // (it ended, or its pid now belongs to another process). An unreadable file may still be
      // another host's, being created in place: it gets a moment first.
      if (holder === undefined && attempt < 2) { await new Promise(resolve => setTimeout(resolve, 50)); continue }
      log.store('%s: taking over a stale lock (%s)', root, holder !== undefined ? `pid ${holder.pid} since ${holder.since}` : 'unreadable')
      await rename(tmp, p) // replaces it in one step
      return
    }
  }

  /** The lock created with O_EXCL and written; false when it exists. */
  private static async createInPlace (p: string, info: LockInfo): Promise<boolean> {
    let fh
    try {
      fh = await open(p, 'wx', 0o644)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false
      throw e
    }
    try {
      await fh.writeFile(JSON.stringify(info) + '\n')
      await fh.sync()
    } finally {
      await fh.close()
    }
    return true
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
