/**
 * fuse-native, tamed: extra -o options fuse-native cannot pass (big_writes, direct_io,
 * atomic_o_trunc), callbacks that fire exactly once with a valid errno, and no auto-timeout.
 * See native-notes/ for why each option is there.
 */
import Fuse = require('fuse-native')
import { dirname } from 'node:path'
import { errnoOf } from '../errors'
import { log } from '../log'

export class TunedFuse extends Fuse {
  constructor (mnt: string, ops: Fuse.Ops, opts: Fuse.FuseOpts, private readonly extra: string[]) {
    super(mnt, ops, opts)
  }

  protected override _fuseOptions (): string {
    const base = super._fuseOptions()
    const extra = this.extra.join(',')
    if (extra === '') return base
    return base === '' ? `-o${extra}` : `${base},${extra}`
  }
}

/** Reply through cb exactly once: the value's code, or the errno of what was thrown. */
export function once<T extends unknown[]> (op: string, cb: (code: number, ...rest: T) => void, work: () => Promise<[number, ...T] | number>): void {
  let done = false
  const reply = (code: number, ...rest: T): void => {
    if (done) return
    done = true
    cb(code, ...rest)
  }
  let p: Promise<[number, ...T] | number>
  try {
    p = work()
  } catch (e) {
    log.fs('%s failed: %s', op, (e as Error).message)
    reply(errnoOf(e), ...([] as unknown as T))
    return
  }
  p.then(r => {
    if (typeof r === 'number') reply(r, ...([] as unknown as T))
    else reply(...r)
  }, e => {
    log.fs('%s failed: %s', op, (e as Error).message)
    reply(errnoOf(e), ...([] as unknown as T))
  })
}

/**
 * Patch level of the loaded fuse-native addon (0: the stock prebuild). Level 1 fixes the async
 * handle leak; level 2 also honours per-open cache flags carried in the file handle's high
 * bits; level 3 keeps idle worker threads instead of ending them; level 4 lets the worker
 * threads do reads JS planned, level 5 overwrites too (src/fs/plans.ts; see scripts/native/);
 * level 6 parks idle workers beyond four instead of letting all of them wait on /dev/fuse.
 * Loaded the way fuse-native loads it, so it is the same addon.
 */
export function patchLevel (): number {
  const b = addon()
  return typeof b?.redofs_patch_level === 'number' ? b.redofs_patch_level : 0
}

/** The count of worker-side reads (level 4) and writes (level 5) completed per epoch (src/fs/plans.ts), if loaded. */
export function planCounter (): ((epoch: number) => number) | undefined {
  const b = addon()
  return (b?.redofs_patch_level ?? 0) >= 4 && typeof b?.redofs_plans_completed === 'function' ? b.redofs_plans_completed : undefined
}

let planTable: ArrayBuffer | null | undefined

/** Level 5's table of write plans (src/fs/plans.ts), if loaded: one per process, as in the addon. */
export function writePlanTable (): ArrayBuffer | undefined {
  if (planTable === undefined) {
    planTable = null
    const b = addon()
    if ((b?.redofs_patch_level ?? 0) >= 5 && typeof b?.redofs_write_plans === 'function') {
      try {
        planTable = b.redofs_write_plans()
      } catch (e) {
        // a runtime that refuses external buffers: JS does the writes
        log.fs('no worker-side writes: %s', (e as Error).message)
      }
    }
  }
  return planTable ?? undefined
}

interface Addon { redofs_patch_level?: number, redofs_plans_completed?: (epoch: number) => number, redofs_write_plans?: () => ArrayBuffer }

function addon (): Addon | undefined {
  try {
    const gypBuild = require('node-gyp-build') as (dir: string) => Addon
    return gypBuild(dirname(require.resolve('fuse-native/package.json')))
  } catch {
    return undefined
  }
}

/** Handle bits a level-2 addon turns into fuse_file_info flags (and strips from fh). */
export const FH_DIRECT_IO = 1 << 30
export const FH_KEEP_CACHE = 1 << 29
export const FH_MASK = FH_KEEP_CACHE - 1
