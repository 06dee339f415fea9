/**
 * One user per store: a lock file naming the holder, written under a name of its own and
 * hard-linked into place (atomic, on NFS too; created with O_EXCL where hard links are refused).
 * A lock left by a dead process on this host is taken over.
 */
import { link, open, readdir, readFile, rename, unlink } from 'node:fs/promises'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { RedoError } from '../errors'
import { faultPoint } from '../fault'

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

export class StoreLock {
  private constructor (readonly root: string, private readonly info: LockInfo) {}

  static async acquire (root: string, what: string): Promise<StoreLock> {
    const info: LockInfo = { pid: process.pid, host: hostname(), since: new Date().toISOString(), what }
    const p = lockPath(root)
    // The lock appears complete or not at all: written and synced under a name of our own, then
    // linked into place (link fails if the name exists; atomic on NFS too). Created in place,
    // a kill between the create and the write left an empty lock that nobody could read.
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
      return await StoreLock.take(root, info, p, tmp)
    } finally {
      await unlink(tmp).catch(() => {})
    }
  }

  private static async take (root: string, info: LockInfo, p: string, tmp: string): Promise<StoreLock> {
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await link(tmp, p)
        return new StoreLock(root, info)
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code
        if (code === 'EPERM' || code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'ENOSYS') {
          // no hard links here (vfat, exFAT, some network and FUSE file systems): created in
          // place, which a kill between create and write can leave empty
          if (await StoreLock.createInPlace(p, info)) return new StoreLock(root, info)
        } else if (code !== 'EEXIST') throw e
      }
      const holder = await readLock(root)
      if (holder !== undefined && holder.host === info.host && !alive(holder.pid)) {
        // stale: move it aside atomically so two takers cannot both succeed
        const aside = `${p}.stale-${process.pid}`
        try {
          await rename(p, aside)
        } catch { continue } // another process took it over first; the retry reads the new holder
        // Between our read and our rename another taker may have replaced the stale lock with
        // its own live one: then put that back (link never overwrites) instead of deleting it.
        const moved = await readFile(aside, 'utf8').then(t => JSON.parse(t) as LockInfo, () => undefined)
        if (moved !== undefined && (moved.pid !== holder.pid || moved.since !== holder.since)) {
          // put it back (never over a newer one); where hard links are refused, by an O_EXCL create
          await link(aside, p).catch(async e => {
            const code = (e as NodeJS.ErrnoException).code
            if (code === 'EPERM' || code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'ENOSYS') await StoreLock.createInPlace(p, moved).catch(() => {})
          })
        }
        await unlink(aside).catch(() => {})
        continue
      }
      if (holder === undefined) {
        if (attempt < 2) { await new Promise(resolve => setTimeout(resolve, 50)); continue }
        throw new RedoError('EBUSY', `${root}: store is locked (${p} exists but cannot be read)`, p)
      }
      throw new RedoError('EBUSY', `${root}: store is in use by ${holder.what} (pid ${holder.pid} on ${holder.host} since ${holder.since})`, p)
    }
    throw new RedoError('EBUSY', `${root}: could not take the store lock ${p}`, p)
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
    const holder = await readLock(this.root)
    if (holder?.pid === this.info.pid && holder.host === this.info.host) await unlink(lockPath(this.root)).catch(() => {})
  }
}
