/**
 * What every grain-table extent (hosted sparse KDMV, ESX COWD) does the same way: classify an
 * entry, walk a range grain by grain, list allocated runs, and read a range with one
 * positioned read per run of grains that lie back to back in the file.
 */
import type { FileHandle } from 'node:fs/promises'
import { RedoError } from '../errors'
import { SECTOR } from '../units'
import { readExact, settleAll, type ReadPlan, type Run, type State } from './extent'

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
}

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
 * Read [pos, pos+len): unallocated and zeroed grains read as zeros, damaged ones fail with EIO
 * (after every read already issued has finished with the caller's buffer).
 */
export async function readGrains (g: GrainTables, fh: FileHandle, buf: Buffer, off: number, pos: number, len: number): Promise<void> {
  const gb = g.grainBytes
  const end = pos + len
  const reads: Array<Promise<void>> = []
  let runFile = -1
  let runBuf = 0
  let runLen = 0
  const flush = (): void => {
    if (runLen > 0) reads.push(readExact(fh, g.path, buf, runBuf, runLen, runFile))
    runLen = 0
  }
  for (let p = pos; p < end;) {
    const grain = Math.floor(p / gb)
    const inGrain = p - grain * gb
    const n = Math.min(end - p, gb - inGrain)
    const e = entryOf(g, grain)
    const bo = off + (p - pos)
    if (e === 0 || e === 1) {
      flush()
      buf.fill(0, bo, bo + n)
    } else if (e === BAD) {
      flush()
      await settleAll(reads)
      throw new RedoError('EIO', `${g.path}: grain ${grain} is damaged (its table entry points past the end of the file)`, g.path)
    } else {
      const fo = e * SECTOR + inGrain
      if (runLen > 0 && runFile + runLen === fo) runLen += n
      else { flush(); runFile = fo; runBuf = bo; runLen = n }
    }
    p += n
  }
  flush()
  await settleAll(reads)
}

/** readGrains as a plan: one entry per run of grains back to back in the file. */
export function planGrains (g: GrainTables, fd: number, p: ReadPlan, pos: number, len: number): boolean {
  const gb = g.grainBytes
  const end = pos + len
  let runFile = -1
  let runLen = 0
  let zeros = 0
  const flush = (): boolean => {
    const ok = (runLen === 0 || p.data(fd, runFile, runLen)) && (zeros === 0 || p.zero(zeros))
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
      if (runLen > 0 && !flush()) return false
      zeros += n
    } else if (e === BAD) {
      return false
    } else {
      const fo = e * SECTOR + inGrain
      if (runLen > 0 && runFile + runLen === fo) runLen += n
      else { if (!flush()) return false; runFile = fo; runLen = n }
    }
    q += n
  }
  return flush()
}
