// Local typing for fuse-native 2.2.6 (it ships none). Only what redofs uses.
declare module 'fuse-native' {
  namespace Fuse {
  interface Stat {
    mode: number, uid: number, gid: number, size: number, dev?: number, nlink: number, ino?: number,
    rdev?: number, blksize?: number, blocks?: number, atime: Date | number, mtime: Date | number, ctime: Date | number
  }
  interface Statfs {
    bsize: number, frsize: number, blocks: number, bfree: number, bavail: number,
    files: number, ffree: number, favail: number, fsid: number, flag: number, namemax: number
  }
  interface Ops {
    init?: (cb: (code: number) => void) => void
    getattr?: (path: string, cb: (code: number, st?: Stat) => void) => void
    readdir?: (path: string, cb: (code: number, names?: string[]) => void) => void
    open?: (path: string, flags: number, cb: (code: number, fh?: number) => void) => void
    create?: (path: string, mode: number, cb: (code: number, fh?: number) => void) => void
    read?: (path: string, fh: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => void
    write?: (path: string, fh: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => void
    release?: (path: string, fh: number, cb: (code: number) => void) => void
    flush?: (path: string, fh: number, cb: (code: number) => void) => void
    fsync?: (path: string, datasync: number, fh: number, cb: (code: number) => void) => void
    truncate?: (path: string, size: number, cb: (code: number) => void) => void
    ftruncate?: (path: string, fh: number, size: number, cb: (code: number) => void) => void
    statfs?: (path: string, cb: (code: number, st?: Statfs) => void) => void
    readlink?: (path: string, cb: (code: number, target?: string) => void) => void
    utimens?: (path: string, atime: number, mtime: number, cb: (code: number) => void) => void
    chmod?: (path: string, mode: number, cb: (code: number) => void) => void
    chown?: (path: string, uid: number, gid: number, cb: (code: number) => void) => void
    unlink?: (path: string, cb: (code: number) => void) => void
    rename?: (src: string, dest: string, cb: (code: number) => void) => void
    mkdir?: (path: string, mode: number, cb: (code: number) => void) => void
    rmdir?: (path: string, cb: (code: number) => void) => void
    symlink?: (src: string, dest: string, cb: (code: number) => void) => void
    link?: (src: string, dest: string, cb: (code: number) => void) => void
    mknod?: (path: string, mode: number, dev: number, cb: (code: number) => void) => void
    access?: (path: string, mode: number, cb: (code: number) => void) => void
  }
  interface FuseOpts {
    timeout?: number | false
    autoUnmount?: boolean
    allowOther?: boolean
    defaultPermissions?: boolean
    fsname?: string
    subtype?: string
    entryTimeout?: number
    attrTimeout?: number
    maxRead?: number
    force?: boolean
    mkdir?: boolean
    debug?: boolean
  }
  }
  class Fuse {
    constructor (mnt: string, ops: Fuse.Ops, opts?: Fuse.FuseOpts)
    mnt: string
    mount (cb: (err: Error | null) => void): void
    unmount (cb: (err: Error | null) => void): void
    protected _fuseOptions (): string
    static unmount (mnt: string, cb: (err: Error | null) => void): void
  }
  export = Fuse
}
