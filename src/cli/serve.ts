/**
 * Serving a store in the foreground: mount, announce, and on SIGINT/SIGTERM, `redofs umount`
 * or an external fusermount -u, unmount and power everything off cleanly.
 */
import { lstat, mkdir, readFile, readdir, realpath, stat, unlink, writeFile } from 'node:fs/promises'
import { readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { patchLevel } from '../fs/fuse'
import { DEFAULT_READAHEAD, RedoMount, type MountOptions } from '../fs/mount'
import { log } from '../log'
import { procStat } from '../store/lock'
import { Store, type StoreOptions } from '../store/store'

/**
 * Where servers note their pid by mountpoint (its canonical path), for `redofs umount`: one
 * directory per user, mode
 * 0700. A shared one in /tmp could be made by another user first, who could then plant entries
 * (umount signals the pid one names) or links (the server writes its entry through them).
 */
export const REGISTRY = join(tmpdir(), `redofs-mounts-${process.getuid?.() ?? 'user'}`)

export const registryFile = (mnt: string): string => join(REGISTRY, encodeURIComponent(resolve(mnt)) + '.json')

/** The registry, made if missing; refused unless it is this user's own, writable by nobody else. */
async function registry (): Promise<string> {
  await mkdir(REGISTRY, { mode: 0o700 }).catch((e: NodeJS.ErrnoException) => { if (e.code !== 'EEXIST') throw e })
  const st = await lstat(REGISTRY)
  if (!st.isDirectory() || st.uid !== process.getuid?.() || (st.mode & 0o022) !== 0) {
    throw new Error(`${REGISTRY}: not a directory of this user's that only it can write; remove it`)
  }
  return REGISTRY
}

export interface Served {
  pid: number
  /** The server's start time (clock ticks since boot, /proc/PID/stat): with pid, names the process. */
  start?: number
  store: string
  mnt: string
}

/** Start time of a process in clock ticks since boot, or undefined when there is no such process. */
export function processStart (pid: number): number | undefined {
  const v = Number(procStat(pid)?.[19]) // field 22, starttime
  return Number.isFinite(v) ? v : undefined
}

/**
 * Is `mnt` a mountpoint right now? Reads mountinfo; never touches the path itself (so callers
 * pass the canonical path: mountinfo holds it with symbolic links resolved). `unknown` answers
 * when mountinfo cannot be read.
 */
export function isMounted (mnt: string, unknown = false): boolean {
  const target = escapeMountPath(mnt)
  try {
    return readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some(l => l.split(' ')[4] === target)
  } catch {
    return unknown
  }
}

/**
 * Set the kernel's readahead window (KiB) for the files of the mount at `mnt` (canonical path). The
 * mount's backing device info is named after its device number, taken from mountinfo; the only
 * access to the mount itself is one asynchronous stat, which this server answers (a synchronous
 * one would deadlock it). Returns why it could not.
 */
export async function setReadahead (mnt: string, kib: number): Promise<string | undefined> {
  const target = escapeMountPath(mnt)
  let dev: string | undefined
  try {
    // the kernel sets the window from libfuse's answer to its INIT request, which may come
    // after our mount callback: a request through the mount returns only after INIT is done
    // (asynchronous, from the thread pool: the server answers it)
    await stat(mnt)
    for (const l of (await readFile('/proc/self/mountinfo', 'utf8')).split('\n')) {
      const f = l.split(' ')
      const dash = f.indexOf('-')
      // the last line for a path is the mount on top; it must be ours (a FUSE mount)
      if (f[4] === target) dev = dash > 0 && (f[dash + 1] ?? '').startsWith('fuse') ? f[2] : undefined
    }
  } catch (e) {
    return (e as Error).message
  }
  if (dev === undefined || !/^\d+:\d+$/.test(dev)) return `no FUSE mount at ${mnt} in /proc/self/mountinfo`
  const file = `/sys/class/bdi/${dev}/read_ahead_kb`
  try {
    await writeFile(file, `${kib}\n`)
    const now = Number((await readFile(file, 'utf8')).trim())
    return now === kib ? undefined : `${file} reads ${now} after writing ${kib}`
  } catch (e) {
    return (e as Error).message
  }
}

function escapeMountPath (p: string): string {
  // mountinfo escapes these four characters in paths as octal
  return resolve(p).replace(/\\/g, '\\134').replace(/ /g, '\\040').replace(/\t/g, '\\011').replace(/\n/g, '\\012')
}

export async function serve (storeDir: string, mnt: string, sopts: StoreOptions, mopts: MountOptions, announce: (m: string) => void): Promise<void> {
  // a stray rejection must not take every disk down with the process: report it and serve on
  process.on('unhandledRejection', e => {
    process.stderr.write(`redofs: internal error (still serving): ${(e as Error)?.stack ?? String(e)}\n`)
  })
  const store = await Store.open(storeDir, sopts)
  const m = new RedoMount(store, resolve(mnt), mopts)
  let canonical = resolve(mnt)
  try {
    await mkdir(resolve(mnt), { recursive: true })
    canonical = await realpath(resolve(mnt)) // before mounting: afterwards the path is ours to serve
    await m.mount()
  } catch (e) {
    await store.close().catch(() => {})
    throw e
  }
  const ra = mopts.readahead ?? DEFAULT_READAHEAD
  if (ra > 0) {
    const kib = Math.ceil(ra / 4096) * 4 // whole pages
    const why = await setReadahead(canonical, kib)
    if (why === undefined) log.fs('readahead window %d KiB', kib)
    else if (mopts.readahead === undefined) log.fs('readahead window left at the kernel default: %s', why)
    else process.stderr.write(`redofs: warning: --readahead not applied (the kernel's window stays): ${why}\n`)
  }
  // without an entry `redofs umount` still unmounts (fusermount -u), which this server notices
  await registry().then(async () => {
    await pruneRegistry()
    await writeFile(registryFile(canonical), JSON.stringify({ pid: process.pid, start: processStart(process.pid), store: store.root, mnt: canonical } satisfies Served))
  }).catch(e => { process.stderr.write(`redofs: warning: no registry entry for redofs umount: ${(e as Error).message}\n`) })
  let stopping: Promise<void> | null = null
  const stop = async (why: string): Promise<void> => {
    if (stopping !== null) return await stopping
    stopping = (async () => {
      log.fs('stopping (%s)', why)
      clearInterval(watch)
      await m.unmount()
      try {
        await store.close() // throws (after closing everything) when a power-off action failed
      } finally {
        await unlink(registryFile(canonical)).catch(() => {})
      }
    })()
    return await stopping
  }
  /** Stop and exit: 1, with the reason on stderr, when the unmount or a power-off action failed. */
  const finish = (why: string): void => {
    void stop(why).then(() => process.exit(0), e => {
      process.stderr.write(`redofs: unmount: ${(e as Error).message}\n`)
      process.exit(1)
    })
  }
  const watch = setInterval(() => {
    // an unreadable mountinfo is no reason to stop serving
    if (!isMounted(canonical, true)) finish('unmounted from outside')
  }, 1000)
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => { finish(sig) })
  for (const vm of store.vms.values()) {
    for (const err of vm.errors) process.stderr.write(`redofs: left out: ${err.message}\n`)
  }
  if (patchLevel() < 2) {
    process.stderr.write('redofs: warning: the stock fuse-native addon is loaded: long-running mounts slow down (leaked handles) and every file is direct_io; build the patched one with bash scripts/build-fuse-native.sh\n')
  }
  announce(`mounted ${store.root} at ${resolve(mnt)}`)
}

/**
 * Delete this user's entries of servers that are gone (killed hard: nothing removed their
 * entry). An entry stays while a process with its pid and start time runs, so a live server's
 * is never touched and one whose pid was reused by another process goes; when /proc does not
 * show the process (hidepid, another pid namespace) the entry stays if the pid exists at all.
 * The file is read again just before the unlink: a server starting on the same mountpoint may
 * have just written its own.
 */
async function pruneRegistry (): Promise<void> {
  const uid = process.getuid?.()
  for (const name of await readdir(REGISTRY).catch(() => [] as string[])) {
    if (!name.endsWith('.json')) continue
    const file = join(REGISTRY, name)
    try {
      if ((await stat(file)).uid !== uid) continue
      const text = await readFile(file, 'utf8')
      const e = JSON.parse(text) as Partial<Served>
      if (typeof e.pid !== 'number' || serverAlive(e.pid, e.start)) continue
      if (await readFile(file, 'utf8') !== text) continue
      await unlink(file)
      log.fs('deleted the registry entry of a server that is gone: %s', file)
    } catch { /* unreadable or already gone: leave it to whoever wrote it */ }
  }
}

function serverAlive (pid: number, start: number | undefined): boolean {
  const now = processStart(pid)
  if (now !== undefined) return start === undefined || now === start
  try {
    process.kill(pid, 0)
    return true
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/** The registry entry of the server of `mnt`, if this user's registry holds one of its own. */
export async function readServed (mnt: string): Promise<Served | undefined> {
  try {
    await registry()
    const st = await lstat(registryFile(mnt))
    if (!st.isFile() || st.uid !== process.getuid?.()) return undefined
    return JSON.parse(await readFile(registryFile(mnt), 'utf8')) as Served
  } catch {
    return undefined
  }
}
