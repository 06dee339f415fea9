/** Shared bits of the CLI commands: option shapes, the store root, error output, progress. */
import { existsSync } from 'node:fs'
import { readdir } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { Chain, type ChainOptions } from '../chain/chain'
import { JOURNAL_SUFFIX } from '../chain/journal'
import { resolveGeneration } from '../chain/labels'
import { childrenOf } from '../chain/peek'
import { recordOpens } from '../formats/extent'
import { diskNameOf } from '../chain/names'
import { isRedoError, RedoError, toRedoError } from '../errors'
import { log } from '../log'
import { StoreLock } from '../store/lock'
import { liveFileOf, planStore, resolveDiskTop, type StorePlan } from '../store/tops'
import { pointVmxAt } from '../formats/vmx'
import { formatSize } from '../units'

export interface GlobalArgs {
  ignoreCid?: boolean
  store?: string
}

/** The containment root: --store, else the grandparent of the top file (<store>/<vm>/<file>). */
export function storeRoot (top: string, args: GlobalArgs): string {
  return resolve(args.store ?? dirname(dirname(resolve(top))))
}

/** Open a disk to be read (no lock: a mount, or another command, may be changing it). */
export async function openDisk (arg: string, args: GlobalArgs, extra: ChainOptions = {}): Promise<Chain> {
  let top = arg
  const open = async (): Promise<Chain> => {
    top = await resolveDiskTop(arg) // a commit may have merged the top away meanwhile
    return await Chain.open(top, { ignoreCid: args.ignoreCid === true, root: storeRoot(top, args), ...extra })
  }
  try {
    return await open()
  } catch (first) {
    log.cli('%s: the open failed (%s); once more', arg, (first as Error).message)
    // Tables read while a commit wrote them (a grain past the end of the file as it was when
    // the open started, a layer just dropped) can look damaged. Opened once more: a file that
    // is damaged fails the same way again, and then a commit still at work is said to be.
    try {
      return await open()
    } catch (e) {
      const err = toRedoError(e)
      const dir = dirname(err.file ?? top)
      const journal = (await readdir(dir).catch(() => [] as string[])).find(f => f.endsWith(JOURNAL_SUFFIX))
      if (journal === undefined) throw e
      throw new RedoError(err.code, `${err.message} (a commit is at work in ${dir}, ${journal}: run the command again once it has ended)`, err.file)
    }
  }
}

/**
 * The lock of the store `file` belongs to (--store, else its grandparent). A store root that
 * cannot take a lock file (a disk outside the <store>/<vm>/ layout, in a directory the user
 * cannot write) says so and how to name the store.
 */
export async function lockStore (file: string, args: GlobalArgs, what: string): Promise<StoreLock> {
  const root = storeRoot(file, args)
  try {
    return await StoreLock.acquire(root, `redofs ${what}`)
  } catch (e) {
    const err = toRedoError(e)
    if (err.code === 'EBUSY') throw err
    throw new RedoError(err.code, `cannot lock the store ${root} (${args.store !== undefined ? '--store' : `the directory above ${dirname(resolve(file))}`}): ${err.message}; name the store with --store DIR`, err.file)
  }
}

/**
 * Run `fn` on a disk opened for writing, holding the store lock (a mounted store, or another
 * offline command, makes this fail with a message naming the holder).
 */
export async function withWritableDisk<T> (arg: string, args: GlobalArgs, what: string, fn: (chain: Chain) => Promise<T>): Promise<T> {
  const top = await resolveDiskTop(arg, true)
  const lock = await lockStore(top, args, what)
  try {
    // another disk's live file, as a mount of the store would serve it (read once, on demand)
    let plan: Promise<StorePlan> | undefined
    const otherDisk = async (p: string): Promise<string | undefined> => {
      // a layer of this disk itself (its directory, its name) is nobody else's: no store scan
      // on the way of an ordinary commit or discard
      if (dirname(resolve(p)) === dirname(resolve(top)) && diskNameOf(p) === diskNameOf(top)) return undefined
      const s = await (plan ??= planStore(storeRoot(top, args)))
      const o = await liveFileOf(s, p)
      return o !== await liveFileOf(s, top) ? o : undefined
    }
    const chain = await Chain.open(top, { ignoreCid: args.ignoreCid === true, root: storeRoot(top, args), writable: true, otherDisk })
    try {
      // the open finished what a crash had interrupted: the chain is not the one `info` showed
      for (const j of chain.recovered) process.stderr.write(`redofs: finished the interrupted commit of ${j.child} into ${j.parent} first\n`)
      // every file the .vmx may name: the chain as the open found it, and what it merged away
      const before = [...chain.recovered.map(j => j.child), ...chain.layers.map(l => l.path)]
      try {
        return await fn(chain)
      } finally {
        // the .vmx names the chain's top (SPEC §1), as the mount keeps it, also when the command
        // failed after the open's recovery moved the top; what changed is done, so a .vmx that
        // cannot be rewritten is a warning
        if (resolve(chain.top.path) !== resolve(top)) {
          await pointVmxAt(before, chain.top.path).catch(e => { process.stderr.write(`redofs: warning: the .vmx still names the old top: ${toRedoError(e).message}\n`) })
        }
      }
    } finally {
      await chain.close()
    }
  } finally {
    await lock.release()
  }
}

/**
 * Refuse `arg` (a generation or level given by number) when opening the chain finished a commit
 * a crash had interrupted: the numbers the user read before (redofs info shows the chain as the
 * crash left it) have moved since.
 */
export function refuseRenumbered (chain: Chain, disk: string, arg: string): void {
  if (chain.recovered.length === 0) return
  throw new RedoError('EBUSY', `${disk}: finishing an interrupted commit renumbered the generations, so ${arg} may not name the one meant; nothing more was changed (see redofs info, then run the command again)`, chain.recovered[0].child)
}

/**
 * The generation `gen` (a number or label; the live one when undefined) of a disk opened to be
 * read, refusing one that a commit is merging into (see refuseInFlux).
 */
export function readableGeneration (chain: Chain, gen: number | string | undefined, source: string): number {
  const g = gen === undefined ? chain.redoCount : resolveGeneration(chain, gen, source)
  refuseInFlux(chain, g, source)
  return g
}

/** Refuse generation g when a commit got part of the way merging into it (Chain.inFlux). */
export function refuseInFlux (chain: Chain, g: number, source: string): void {
  const f = chain.inFlux(g)
  if (f === undefined) return
  const remedy = f.kind === 'interrupted' ? 'open the disk writable (mount it, or run an offline addredo, commit or discard) to finish it' : f.remedy
  throw new RedoError('EBUSY', `${source}: ${f.text}; ${remedy}`, f.file)
}

/**
 * A disk opened by a reader that takes no lock (export, map), with `unchanged`, which fails
 * once generation g was read if a commit or write changed it meanwhile (Chain.changedSince).
 */
export async function openForReading (file: string, args: GlobalArgs): Promise<{ chain: Chain, unchanged: (g: number, source: string) => Promise<void> }> {
  const opened = recordOpens() // the state of every file as the open finds it
  const chain = await openDisk(file, args)
  try {
    // the top is the disk's live layer unless a redo log beside it names it as its parent (a
    // frozen layer named by its path)
    const liveTop = (await childrenOf(chain.top.path, undefined)).length === 0
    const unchanged = async (g: number, source: string): Promise<void> => {
      const why = await chain.changedSince(g, opened, liveTop)
      if (why !== undefined) throw new RedoError('EBUSY', `${source}: generation ${g} changed while it was read (${why}); nothing was kept, run the command again`, chain.layers[g].path)
    }
    return { chain, unchanged }
  } catch (e) {
    await chain.close()
    throw e
  }
}

/** Run a command body: errors become one line on stderr and exit status 1. */
export function action<A> (fn: (args: A) => Promise<number | undefined | void>): (args: A) => Promise<void> {
  return async (args: A) => {
    try {
      const code = await fn(args)
      process.exitCode = typeof code === 'number' ? code : 0
    } catch (e) {
      const err = toRedoError(e)
      process.stderr.write(`redofs: ${err.message.split('\n')[0]}\n`)
      if (process.env.DEBUG !== undefined && process.env.DEBUG !== '') process.stderr.write(`${(e as Error).stack ?? ''}\n`)
      else if (!isRedoError(e)) log.cli('%O', e)
      process.exitCode = 1
    }
  }
}

/** A progress bar on a terminal (stderr), silent otherwise. */
export function progressBar (label: string): { update: (done: number, total: number) => void, end: () => void } {
  const tty = process.stderr.isTTY === true
  let last = 0
  const started = Date.now()
  return {
    update (done, total) {
      if (!tty) return
      const now = Date.now()
      if (now - last < 100 && done < total) return
      last = now
      const frac = total > 0 ? done / total : 1
      const width = 30
      const fill = Math.round(frac * width)
      const secs = (now - started) / 1000
      const rate = secs > 0 ? done / secs : 0
      const eta = rate > 0 ? (total - done) / rate : 0
      process.stderr.write(`\r${label} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${(frac * 100).toFixed(0).padStart(3)}% ${formatSize(done)}/${formatSize(total)} ${formatSize(Math.round(rate))}/s ETA ${eta.toFixed(0)}s `)
    },
    end () { if (tty) process.stderr.write('\n') }
  }
}

/** Split "file.vmdk@G" into the file and the generation (a number or a label). */
export function splitGeneration (arg: string): { file: string, gen?: number | string } {
  // a file whose own name holds '@' (data@2024.vmdk) is taken whole when it is there; a disk
  // name with '@' (data@2024) means a generation, as the mount's file names do
  if (/\.(vmdk|REDO)$/i.test(arg) && existsSync(arg)) return { file: arg }
  const m = /^(.*[^/])@([^/@]+)$/.exec(arg)
  if (m === null) return { file: arg }
  return { file: m[1], gen: /^\d+$/.test(m[2]) ? Number(m[2]) : m[2] }
}
