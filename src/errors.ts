import { constants as osConstants } from 'node:os'

/** errno names redofs uses; fs/ maps them to negative numbers, cli/ to an exit status. */
export type ErrnoName =
  | 'ENOENT' | 'EIO' | 'EINVAL' | 'EBUSY' | 'EROFS' | 'ENOSPC' | 'EPERM' | 'EEXIST'
  | 'ENOTDIR' | 'EISDIR' | 'EACCES' | 'ELOOP' | 'EXDEV' | 'ENOTSUP' | 'EAGAIN' | 'ECANCELED'

/**
 * The one error type of redofs: an errno plus a message that names the file and what is wrong.
 * `file` is kept separately so status output can list it.
 */
export class RedoError extends Error {
  readonly code: ErrnoName
  readonly file?: string

  constructor (code: ErrnoName, message: string, file?: string) {
    super(message)
    this.name = 'RedoError'
    this.code = code
    this.file = file
  }

  /** Negative errno number as FUSE wants it. */
  get errno (): number {
    return -(osConstants.errno as Record<string, number>)[this.code]
  }
}

export function isRedoError (e: unknown): e is RedoError {
  return e instanceof RedoError
}

/** Turn anything thrown (node fs errors included) into a RedoError, keeping errno codes. */
export function toRedoError (e: unknown, file?: string): RedoError {
  if (e instanceof RedoError) return e
  const err = e as NodeJS.ErrnoException
  const code = (err && typeof err.code === 'string' && err.code in osConstants.errno) ? err.code as ErrnoName : 'EIO'
  const where = file ?? err?.path
  const msg = err?.message ?? String(e)
  return new RedoError(code, where && !msg.includes(where) ? `${where}: ${msg}` : msg, where)
}

/** Negative errno for any thrown value (FUSE callbacks need a number in (-512, 0)). */
export function errnoOf (e: unknown): number {
  const n = toRedoError(e).errno
  return Number.isInteger(n) && n < 0 && n > -512 ? n : -5
}

export function fail (code: ErrnoName, message: string, file?: string): never {
  throw new RedoError(code, message, file)
}
