/**
 * What every grain-table extent (hosted sparse KDMV, ESX COWD) does the same way: classify an
 * entry, walk a range grain by grain, list allocated runs, and read a range with one
 * positioned read per run of grains that lie back to back in the file.
 */
import type { FileHandle } from 'node:fs/promises'
import { RedoError } from '../errors'
import { SECTOR } from '../units'
import { readExact, settleAll, writeExact, type ReadPlan, type Run, type State } from './extent'

/** In-memory marker for a grain table entry found damaged at open (never a valid entry). */
export const BAD = 0xffffffff

export function stateOf (e: number): State {
  return e === 0 ? 'none' : e === 1 ? 'zero' : e === BAD ? 'bad' : 'data'
}

export interface GrainTables {
  readonly path: string
  readonly size: number
  readonly grainBytes: number
  /** Entries per table. */
  readonly perTable: number
  /** Tables that hold something; undefined elsewhere. */
  readonly tables: ReadonlyArray<Uint32Array | undefined>
  /**
   * Where a data entry's grain lies in the file: base + (entry - bias) * unit bytes. Hosted
   * sparse and COWD entries are sectors (0, 0, 512); SEsparse ones are grain numbers in its
   * grain area, so that 32 bits reach 16 TiB into the file.
   */
  readonly base: number
  readonly bias: number
  readonly unit: number
}

/** The entry layout of hosted sparse and COWD tables: a data entry is the grain's file sector. */
export const SECTOR_ENTRIES = { base: 0, bias: 0, unit: SECTOR } as const

export function entryOf (g: GrainTables, grain: number): number {
  const t = g.tables[Math.floor(grain / g.perTable)]
  return t === undefined ? 0 : t[grain % g.perTable]
}

/** State at pos and how far (at most len) it stays the same. */
export function lookupGrains (g: GrainTables, pos: number, len: number): { state: State, length: number } {
  const gb = g.grainBytes
  let grain = Math.floor(pos / gb)
  const state = stateOf(entryOf(g, grain))
  let length = Math.min(len, (grain + 1) * gb - pos)
  while (length < len) {
    grain++
    if (stateOf(entryOf(g, grain)) !== state) break
    length = Math.min(len, (grain + 1) * gb - pos)
  }
  return { state, length }
}

export function runsOfGrains (g: GrainTables): Run[] {
  const out: Run[] = []
  const gb = g.grainBytes
  for (let i = 0; i < g.tables.length; i++) {
    const t = g.tables[i]
    if (t === undefined) continue
    for (let k = 0; k < g.perTable; k++) {
      const e = t[k]
      if (e === 0) continue
      const start = (i * g.perTable + k) * gb
      if (start >= g.size) break
      const state = e === 1 ? 'zero' : e === BAD ? 'bad' : 'data'
      const length = Math.min(gb, g.size - start)
      const last = out[out.length - 1]
      if (last !== undefined && last.state === state && last.start + last.length === start) last.length += length
      else out.push({ start, length, state })
    }
  }
  return out
}

/**
 * Walk [pos, pos+len) as runs, in order: `data(filePos, at, n)` for bytes that lie back to back
 * in the file, `zero(at, n)` for unallocated and zeroed grains (`at`: offset from pos). Stops
 * when a callback returns false (returns -1) or at a damaged grain (returns its number);
 * otherwise returns -2.
 */
function walkGrains (g: GrainTables, pos: number, len: number, data: (filePos: number, at: number, n: number) => boolean, zero: (at: number, n: number) => boolean): number {
  const gb = g.grainBytes
  const end = pos + len
  let runFile = -1
  let runAt = 0
  let runLen = 0
  let zeroAt = 0
  let zeros = 0
  const flush = (): boolean => {
    const ok = (runLen === 0 || data(runFile, runAt, runLen)) && (zeros === 0 || zero(zeroAt, zeros))
    runLen = 0
    zeros = 0
    return ok
  }
  for (let q = pos; q < end;) {
    const grain = Math.floor(q / gb)
    const inGrain = q - grain * gb
    const n = Math.min(end - q, gb - inGrain)
    const e = entryOf(g, grain)
    if (e === 0 || e === 1) {
      if (runLen > 0 && !flush()) return -1
      if (zeros === 0) zeroAt = q - pos
      zeros += n
    } else if (e === BAD) {
      return flush() ? grain : -1
    } else {
      const fo = g.base + (e - g.bias) * g.unit + inGrain
      if (runLen > 0 && runFile + runLen === fo) runLen += n
      else {
        if (!flush()) return -1
        runFile = fo
        runAt = q - pos
        runLen = n
      }
    }
    q += n
  }
  return flush() ? -2 : -1
}

/**
 * Read [pos, pos+len): unallocated and zeroed grains read as zeros, damaged ones fail with EIO
 * (after every read already issued has finished with the caller's buffer).
 */
export async function readGrains (g: GrainTables, fh: FileHandle, buf: Buffer, off: number, pos: number, len: number): Promise<void> {
  const reads: Array<Promise<void>> = []
  const bad = walkGrains(g, pos, len,
    (filePos, at, n) => { reads.push(readExact(fh, g.path, buf, off + at, n, filePos)); return true },
    (at, n) => { buf.fill(0, off + at, off + at + n); return true })
  await settleAll(reads)
  if (bad >= 0) throw new RedoError('EIO', `${g.path}: grain ${bad} is damaged (its table entry points past the end of the file)`, g.path)
}

/**
 * Overwrite [pos, pos+len), every grain of which is allocated (the caller checked, in the same
 * tick): one pwrite per run of grains that lie back to back in the file.
 */
export async function overwriteGrains (g: GrainTables, fh: FileHandle, buf: Buffer, off: number, pos: number, len: number): Promise<void> {
  const writes: Array<Promise<void>> = []
  const r = walkGrains(g, pos, len, (filePos, at, n) => { writes.push(writeExact(fh, buf, off + at, n, filePos)); return true }, () => false)
  await settleAll(writes)
  if (r !== -2) throw new RedoError('EIO', `${g.path}: an overwrite in place met a grain that is not allocated or is damaged`, g.path)
}

/**
 * overwriteGrains as a plan (Extent.planWrite): false when a grain of [pos, pos+len) is not
 * allocated (or zeroed, or damaged) or when the plan is full.
 */
export function planOverwrite (g: GrainTables, fd: number, p: ReadPlan, pos: number, len: number): boolean {
  return walkGrains(g, pos, len, (filePos, _at, n) => p.data(fd, filePos, n), () => false) === -2
}

/** readGrains as a plan (Extent.plan): false at a damaged grain or when the plan is full. */
export function planGrains (g: GrainTables, fd: number, p: ReadPlan, pos: number, len: number): boolean {
  return walkGrains(g, pos, len, (filePos, _at, n) => p.data(fd, filePos, n), (_at, n) => p.zero(n)) === -2
}
