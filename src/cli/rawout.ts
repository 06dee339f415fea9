/**
 * The raw file `export` and `restore` write. A regular file (new or not) is written under a
 * temporary name beside it (`.<name>.redofs-new.<host>.<pid>`) and renamed over the target once
 * complete and synced: a failed or killed command leaves the target as it was, never a
 * complete-looking half (an existing target's space is freed only then: room for both is needed). Where no file can
 * be made beside it (a disk file inside a redofs mount, a directory without write permission)
 * and for devices, the target is written in place: nothing truncates its old content away
 * there, so the caller writes holes as zeros too (`dense`). A target that is one of the files
 * the command reads is refused: writing it would destroy the source while it is read.
 */
import { constants } from 'node:fs'
import { open, readdir, realpath, rename, stat, unlink, type FileHandle } from 'node:fs/promises'
import { hostname } from 'node:os'
import { basename, dirname, join, resolve } from 'node:path'
import { RedoError, toRedoError } from '../errors'
import { syncDir, writeExact } from '../formats/extent'
import { alive } from '../store/lock'

/** Errors that mean "no new file here", where writing the existing target in place still can. */
const NO_SIBLING = new Set(['EACCES', 'EPERM', 'EROFS', 'ENOSYS', 'EOPNOTSUPP', 'ENOTSUP'])

export class RawOutput {
  private constructor (
    readonly target: string,
    private readonly fh: FileHandle,
    /** The temporary name while writing; undefined when writing the target in place. */
    private readonly tmp: string | undefined,
    /** The target keeps its old bytes where nothing is written: write zeros too. */
    readonly dense: boolean,
    private readonly regular: boolean
  ) {}

  static async open (path: string, reading: string[]): Promise<RawOutput> {
    let target = resolve(path)
    const st = await stat(target).catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return undefined
      throw toRedoError(e, target)
    })
    if (st !== undefined) {
      target = await realpath(target) // a link's target is what gets written
      for (const f of reading) {
        const s = await stat(f).catch(() => undefined)
        if (s !== undefined && s.dev === st.dev && s.ino === st.ino) {
          throw new RedoError('EINVAL', `${path}: is ${f}, which this command reads; writing it would destroy it`, path)
        }
      }
    }
    if (st === undefined || st.isFile()) {
      // one name per process (two runs to one target must not share it); a killed run's of
      // this host goes (another host's pid says nothing here)
      const stem = `.${basename(target)}.redofs-new.${hostname()}.`
      for (const n of await readdir(dirname(target)).catch(() => [] as string[])) {
        const pid = n.startsWith(stem) ? n.slice(stem.length) : ''
        if (/^\d+$/.test(pid) && !alive(Number(pid))) await unlink(join(dirname(target), n)).catch(() => {})
      }
      const tmp = join(dirname(target), stem + String(process.pid))
      try {
        const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, st !== undefined ? st.mode & 0o7777 : 0o666)
        return new RawOutput(target, fh, tmp, false, true)
      } catch (e) {
        if (st === undefined || !NO_SIBLING.has((e as NodeJS.ErrnoException).code ?? '')) throw toRedoError(e, tmp)
      }
    }
    try {
      return new RawOutput(target, await open(target, 'r+'), undefined, true, st.isFile())
    } catch (e) {
      throw toRedoError(e, target)
    }
  }

  async write (buf: Buffer, off: number, len: number, pos: number): Promise<void> {
    try {
      await writeExact(this.fh, buf, off, len, pos)
    } catch (e) {
      throw toRedoError(e, this.target)
    }
  }

  /** Give the file its size, make it durable and put it under the target's name. */
  async finish (size: number): Promise<void> {
    try {
      if (this.regular) await this.fh.truncate(size)
      await this.fh.sync()
      await this.fh.close()
      if (this.tmp !== undefined) {
        await rename(this.tmp, this.target)
        await syncDir(dirname(this.target))
      }
    } catch (e) {
      await this.abort()
      throw toRedoError(e, this.target)
    }
  }

  /** Leave the target as it was (written in place, it keeps what was written so far). */
  async abort (): Promise<void> {
    await this.fh.close().catch(() => {})
    if (this.tmp !== undefined) await unlink(this.tmp).catch(() => {})
  }
}
