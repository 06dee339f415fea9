/**
 * The JS-over-FUSE ceiling for the benchmark: fuse-native serving one raw file as
 * <mnt>/disk.img with the same options and the same option injection as redofs (TunedFuse:
 * big_writes, direct_io, no auto-timeout), one cached fd and async fs.read/fs.write.
 * Usage: node dist/scripts/bench-passthrough.js <raw> <mnt> [--cached] [--sync]
 *   --sync: readSync/writeSync on the JS thread instead of the libuv threadpool (one thread
 *   hand-off less per request; blocks the loop for the duration of each backing I/O).
 *   --cached: no direct_io but kernel_cache: pages survive close/open (what a frozen, immutable
 *   generation could use), i.e. re-reads come from the page cache without reaching JS.
 * Prints READY when mounted; SIGTERM/SIGINT unmount and exit.
 */
import { close, fstat, open, read, write, fsync, constants } from 'node:fs'
import { mkdirSync, readSync, writeSync } from 'node:fs'
import { resolve } from 'node:path'
import { TunedFuse } from '../src/fs/fuse'

const [raw, mntArg, ...rest] = process.argv.slice(2)
if (raw === undefined || mntArg === undefined) {
  process.stderr.write('usage: bench-passthrough <raw> <mnt> [--cached]\n')
  process.exit(2)
}
const mnt = resolve(mntArg)
const cached = rest.includes('--cached')
const sync = rest.includes('--sync')
const extra = ['big_writes', 'atomic_o_trunc']
if (!cached) extra.push('direct_io')

open(raw, constants.O_RDWR, (err, fd) => {
  if (err !== null) throw err
  fstat(fd, (err, st) => {
    if (err !== null) throw err
    const size = st.size
    const now = new Date()
    const fileStat = { mode: 0o100644, size, uid: 0, gid: 0, nlink: 1, mtime: now, atime: now, ctime: now, blksize: 65536, blocks: Math.ceil(size / 512) }
    const dirStat = { mode: 0o040755, size: 4096, uid: 0, gid: 0, nlink: 2, mtime: now, atime: now, ctime: now }
    const ops = {
      getattr: (path: string, cb: (code: number, st?: unknown) => void) => {
        if (path === '/') return cb(0, dirStat)
        if (path === '/disk.img') return cb(0, fileStat)
        cb(-2)
      },
      readdir: (path: string, cb: (code: number, names?: string[]) => void) => path === '/' ? cb(0, ['disk.img']) : cb(-20),
      open: (path: string, _flags: number, cb: (code: number, fh?: number) => void) => path === '/disk.img' ? cb(0, 1) : cb(-2),
      release: (_p: string, _fh: number, cb: (code: number) => void) => cb(0),
      read: (_p: string, _fh: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => {
        if (pos >= size) return cb(0)
        if (sync) {
          try { return cb(readSync(fd, buf, 0, Math.min(len, size - pos), pos)) } catch { return cb(-5) }
        }
        read(fd, buf, 0, Math.min(len, size - pos), pos, (err, n) => cb(err !== null ? -5 : n))
      },
      write: (_p: string, _fh: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => {
        if (pos >= size) return cb(-28)
        if (sync) {
          try { return cb(writeSync(fd, buf, 0, Math.min(len, size - pos), pos)) } catch { return cb(-5) }
        }
        write(fd, buf, 0, Math.min(len, size - pos), pos, (err, n) => cb(err !== null ? -5 : n))
      },
      fsync: (_p: string, _d: number, _fh: number, cb: (code: number) => void) => fsync(fd, err => cb(err !== null ? -5 : 0)),
      truncate: (_p: string, _s: number, cb: (code: number) => void) => cb(0),
      ftruncate: (_p: string, _fh: number, _s: number, cb: (code: number) => void) => cb(0)
    }
    mkdirSync(mnt, { recursive: true })
    // kernelCache is a fuse-native option redofs' local typing does not declare
    const fopts = { timeout: false, autoUnmount: true, fsname: 'passthrough', subtype: 'passthrough', kernelCache: cached }
    const fuse = new TunedFuse(mnt, ops as never, fopts as unknown as ConstructorParameters<typeof TunedFuse>[2], extra)
    fuse.mount(err => {
      if (err !== null && err !== undefined) throw err
      setImmediate(() => process.stdout.write(`READY ${mnt}\n`))
    })
    let stopping = false
    const stop = (): void => {
      if (stopping) return
      stopping = true
      fuse.unmount(() => close(fd, () => process.exit(0)))
    }
    process.on('SIGTERM', stop)
    process.on('SIGINT', stop)
  })
})
