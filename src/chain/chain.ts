/**
 * A chain of layers (base first) and its generations; the jobs that change its shape (addredo,
 * commit, discard) live in jobs.ts. Knows nothing about FUSE or VMs.
 */
import { realpath, rename, stat } from 'node:fs/promises'
import { basename, dirname, resolve } from 'node:path'
import { RedoError, toRedoError } from '../errors'
import { cidHex } from '../formats/descriptor'
import { fileStateOf, syncDir, type ReadPlan } from '../formats/extent'
import { DROPPED, Layer, reapDroppedIn, resolveContained } from '../formats/layer'
import { log } from '../log'
import { Index, mapOf, overlay, type MapEntry } from './view'
import { dropDigest } from './digest'
import { journalPath, readJournal, type CommitJournal } from './journal'
import { FROZEN_KEY, labelOf, partOfOf, setMeta } from './labels'
import { childrenOf, parentCandidates, peek, unfinishedDrops, type ParentIndex } from './peek'

export interface ChainOptions {
  writable?: boolean
  /** Accept parentCID mismatches (SPEC `--ignore-cid`). */
  ignoreCid?: boolean
  /** Store root: parents and extents must resolve inside it. */
  root?: string
  /** Open even when files have damaged grains (reads there fail with EIO); used by `check`. */
  lenient?: boolean
  /** Internal: do not finish interrupted commits (used while finishing one). */
  noRecovery?: boolean
  /**
   * The disk ("vm/disk") whose live top file `path` is, when it is served as one (a linked
   * clone's template, say): commits and discards refuse to write it or make it this chain's
   * top. The mount answers from what it serves, the command line from the store's .vmx files.
   */
  otherDisk?: (path: string) => Promise<string | undefined>
  /**
   * Parent links of the store read by the caller just before (a mount's scan): the top's
   * children are looked up there instead of reading the store again. An open that finishes an
   * interrupted commit invalidates it (the commit relinks files).
   */
  parents?: ParentIndex
}

const MAX_DEPTH = 255

export interface View {
  readonly generation: number
  readonly live: boolean
  readonly size: number
  /** Read up to len bytes at pos; returns the count (short only at the capacity). */
  read: (buf: Buffer, off: number, pos: number, len: number) => Promise<number>
  write: (buf: Buffer, off: number, pos: number, len: number) => Promise<void>
  allocatedBytes: () => number
  map: () => MapEntry[]
}

const GONE = 'gone'
/** dev:ino of a fileStateOf string. */
const identity = (state: string): string => state.split(':', 2).join(':')

/** See Chain.inFlux. */
export interface Flux {
  kind: 'interrupted' | 'unfinished' | 'partial'
  /** The redo log being merged. */
  child: string
  /** The journal, or the layer carrying the mark. */
  file: string
  /** What happened, and what makes the generation whole. */
  text: string
  remedy: string
}

export class Chain {
  private indexes = new Map<number, Index>()
  /** Files that name the top as their parent (set at writable open): the top must not change. */
  topChildren: string[] = []
  /**
   * A commit that failed and could not be undone left its journal: the next writable open rolls
   * it forward along the chain as the journal describes it, so until then the chain keeps that
   * shape (unfinishedRefusal); committing the same redo log again finishes it.
   */
  unfinished: { child: string, journal: string } | undefined
  /** Commits a crash had interrupted that this open finished (their journals), in order. */
  recovered: CommitJournal[] = []
  /** Commits a crash had interrupted that this open left as they are (read-only opens). */
  pending: CommitJournal[] = []

  /**
   * Why generation g (a frozen one) cannot be read as it was: a commit merging g+1 into g's top
   * layer got part of the way. Interrupted by a crash (its journal, which a writable open
   * finishes), failed without being undone (`unfinished`), or failed or cancelled and undone as
   * far as it can be (the parent's PART_OF_KEY mark): g's old content is partly overwritten, and
   * only committing g+1 again makes the layer whole.
   */
  inFlux (g: number): Flux | undefined {
    const p = this.layers[g]
    const c = this.layers[g + 1]
    if (p === undefined || c === undefined) return undefined
    const j = this.pending.find(j => resolve(j.parent) === resolve(p.path) && resolve(j.child) === resolve(c.path))
    if (j !== undefined) return { kind: 'interrupted', child: c.path, file: journalPath(j.parent), text: `generation ${g} is being merged with the one above by an interrupted commit (${journalPath(j.parent)})`, remedy: 'a writable open finishes it' }
    const u = this.unfinished
    if (u !== undefined && resolve(u.child) === resolve(c.path)) return { kind: 'unfinished', child: c.path, file: u.journal, text: `generation ${g} is being merged with the one above by a commit that failed and is not undone (${u.journal})`, remedy: 'commit that redo log again, or reopen the disk, which finishes it' }
    const mark = partOfOf(p)
    if (mark !== undefined && resolve(dirname(p.path), mark) === resolve(c.path)) return { kind: 'partial', child: c.path, file: p.path, text: `generation ${g} holds part of generation ${g + 1}'s changes: a commit of ${c.path} into ${p.path} failed or was cancelled midway`, remedy: 'commit that redo log again to complete it' }
    return undefined
  }

  /**
   * For a reader that holds no lock (export, map): what changed the layers of generation g
   * since they were opened (`opened`: recordOpens, noted at each file's first stat), or
   * undefined when nothing did, so what was read is the generation as it was. A commit into a
   * layer shows by its journal coming or going (pending: the journals the open found), by the
   * new CID it stamps before its first write, by a file gone or replaced, and by the layer
   * above (merged away, or re-linked). Beyond that, a file's size and times count only where
   * content changes without a commit: the disk's live top (`liveTop`: a mount's writes) and
   * layers without CIDs. A frozen layer's descriptor is rewritten for labels and freeze times,
   * which change nothing read (an embedded one in place: same file, new times; a stand-alone
   * one replaced: not compared). Times are as fine as the file system keeps them: an overwrite
   * of the live top within one timestamp tick of the open can go unseen, so this is best
   * effort there (frozen generations are what to read from a disk in use).
   */
  async changedSince (g: number, opened: Map<string, string>, liveTop: boolean): Promise<string | undefined> {
    for (const [k, l] of this.layers.slice(0, g + 1).entries()) {
      const j = journalPath(l.path)
      const was = this.pending.some(p => resolve(journalPath(p.parent)) === resolve(j))
      const is = await stat(j).then(() => true, () => false)
      if (is !== was) return `${l.path}: a commit into it ${is ? 'started' : 'ended'} (${j})`
      const whole = !l.hasCids || (k === this.redoCount && liveTop)
      for (const f of l.files) {
        const before = opened.get(resolve(f))
        if (before === undefined) continue
        // a frozen layer's stand-alone descriptor is replaced (written anew and renamed) for a
        // label or freeze time: its CID says what matters
        if (!whole && !l.extents.some(e => e.path !== undefined && resolve(e.path) === resolve(f))) continue
        const now = await stat(f).then(fileStateOf, () => GONE)
        if (whole ? now !== before : identity(now) !== identity(before)) return `${f}: ${now === GONE ? 'removed' : whole ? 'written' : 'replaced'} since it was opened`
      }
      if (!l.hasCids) continue
      const d = (await peek(l.path))?.descriptor
      if (d !== undefined && d.cid !== l.cid) return `${l.path}: written (CID ${cidHex(d.cid)}, was ${cidHex(l.cid)})`
    }
    // A commit into g that began and ended between the open's reading of a layer and of its
    // journal (a layer of several extents takes a while) shows above it: the layer it merged is
    // gone, or was re-linked to the parent's new CID when the commit stopped
    const above = this.layers[g + 1]
    if (above !== undefined) {
      for (const f of above.files) if (opened.has(resolve(f)) && await stat(f).then(() => false, () => true)) return `${f}: merged or removed since it was opened`
      const d = above.hasCids ? (await peek(above.path))?.descriptor : undefined
      if (d !== undefined && above.hasParent && d.parentCID !== above.parentCID) return `${above.path}: re-linked (parent CID ${cidHex(d.parentCID)}, was ${cidHex(above.parentCID)})`
    }
    return undefined
  }

  /** Why a job other than committing `child` must wait (see unfinished), or undefined. */
  unfinishedRefusal (what: string, child?: string): RedoError | undefined {
    const u = this.unfinished
    if (u === undefined || (child !== undefined && resolve(child) === resolve(u.child))) return undefined
    return new RedoError('EBUSY', `${what}: the commit of ${u.child} failed and is not undone (${u.journal}); commit that redo log again, or reopen the disk, which finishes it`, u.journal)
  }
  constructor (public layers: Layer[], readonly opts: ChainOptions) {}

  /**
   * Open the chain whose top is `top`, following parentFileNameHint down to the base. A commit
   * interrupted by a crash is finished first when the chain is opened writable.
   */
  static async open (top: string, opts: ChainOptions = {}): Promise<Chain> {
    // after a finished commit of an ESX 2.x .REDO file the top is its raw base
    let rawTop = false
    const recovered: CommitJournal[] = []
    for (let attempt = 0; ; attempt++) {
      const { layers, journals } = await walk(resolve(top), opts, rawTop)
      if (journals.length === 0 || opts.writable !== true || opts.noRecovery === true || attempt > 0) {
        const chain = new Chain(layers, opts)
        chain.recovered = recovered
        if (attempt === 0) chain.pending = journals
        if (opts.writable === true) {
          try {
            chain.topChildren = await opts.parents?.childrenOf(chain.top.path) ?? await childrenOf(chain.top.path, opts.root)
            if (opts.noRecovery !== true) {
              for (const dir of new Set(layers.map(l => dirname(l.path)))) {
                for (const f of await unfinishedDrops(dir)) await rename(f, f + DROPPED).catch(() => {})
                await reapDroppedIn(dir)
              }
              await chain.unfreezeTop()
            }
          } catch (e) {
            await chain.close().catch(() => {})
            throw e
          }
        }
        return chain
      }
      for (const l of layers) await l.close()
      const { finishCommit } = await import('./jobs')
      opts.parents?.invalidate() // finishing a commit relinks files
      for (const j of journals) {
        log.chain('finishing interrupted commit of %s into %s', j.child, j.parent)
        await finishCommit(j, opts)
        recovered.push(j)
        // the top was merged away: the parent is the top now (a file that took the top's name
        // after it was dropped stays the top)
        if (resolve(top) === j.child && j.above === null && !await stat(top).then(() => true, () => false)) { top = j.parent; rawTop = j.rawParent === true }
      }
    }
  }

  /**
   * A crash in addredo (after the top was marked frozen, before its redo log existed) or in
   * discard (after the layers above were dropped, before the new top was unmarked) leaves a
   * frozen generation's label, time and content record on the live top. Writes would change
   * the content they name, and the next addredo would freeze the layer under the old label.
   */
  private async unfreezeTop (): Promise<void> {
    const top = this.top
    if (!top.writable || !top.hasCids || this.topChildren.length > 0) return
    if (labelOf(top) !== undefined || top.descriptor.get(FROZEN_KEY) !== undefined || partOfOf(top) !== undefined) {
      log.chain('%s: clearing the label, frozen time or partial-merge mark a crash left on the live layer', top.path)
      await setMeta(top, { label: null, frozen: null, partOf: null })
    }
    if (await dropDigest(top.path)) await syncDir(dirname(top.path))
  }

  get generations (): number { return this.layers.length }
  get top (): Layer { return this.layers[this.layers.length - 1] }
  get size (): number { return this.layers[0].size }
  /** Number of redo logs above the base. */
  get redoCount (): number { return this.layers.length - 1 }

  /** Index of generation k (layers 0..k), built on first use. */
  index (k: number): Index {
    let ix = this.indexes.get(k)
    if (ix === undefined) {
      const below = this.indexes.get(k - 1)
      ix = Index.build(this.layers.slice(0, k + 1), below)
      this.indexes.set(k, ix)
    }
    return ix
  }

  /** Drop cached indexes (after the chain changed shape). */
  invalidate (): void {
    this.indexes.clear()
  }

  /** Read generation g. Past the capacity the count is short. */
  async read (g: number, buf: Buffer, off: number, pos: number, len: number): Promise<number> {
    const size = this.size
    if (pos >= size || len <= 0) return 0
    const n = Math.min(len, size - pos)
    const N = this.layers.length - 1
    if (g < N) await this.index(g).read(this.layers, buf, off, pos, n)
    else await this.readLive(buf, off, pos, n)
    return n
  }

  /**
   * read() as a plan (Extent.plan): the bytes it covers, or -1 when the ordinary read must answer
   * (nothing to read, damage, a layer that cannot plan).
   */
  plan (g: number, p: ReadPlan, pos: number, len: number): number {
    const size = this.size
    if (pos >= size || len <= 0) return -1
    const n = Math.min(len, size - pos)
    const N = this.layers.length - 1
    const ok = g < N ? this.index(g).plan(this.layers, p, pos, n) : this.planLive(p, pos, n)
    return ok ? n : -1
  }

  private planLive (p: ReadPlan, pos: number, len: number): boolean {
    const top = this.top
    const N = this.layers.length - 1
    for (let q = pos; q < pos + len;) {
      const { state, length } = top.lookup(q, pos + len - q)
      const ok = state === 'data'
        ? top.plan(p, q, length)
        : state === 'zero' || (state === 'none' && N === 0)
          ? p.zero(length)
          : state === 'none' && this.index(N - 1).plan(this.layers, p, q, length)
      if (!ok) return false
      q += length
    }
    return true
  }

  private async readLive (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    const top = this.top
    const N = this.layers.length - 1
    const jobs: Array<Promise<void>> = []
    let failure: RedoError | undefined
    for (let p = pos; p < pos + len;) {
      const { state, length } = top.lookup(p, pos + len - p)
      const bo = off + p - pos
      if (state === 'data') jobs.push(top.read(buf, bo, p, length))
      else if (state === 'zero') buf.fill(0, bo, bo + length)
      else if (state === 'none') {
        if (N > 0) jobs.push(this.index(N - 1).read(this.layers, buf, bo, p, length))
        else buf.fill(0, bo, bo + length)
      } else { failure = new RedoError('EIO', `${top.path}: damaged grain at byte ${p} of the disk`, top.path); break }
      p += length
    }
    const rs = await Promise.allSettled(jobs)
    if (failure !== undefined) throw failure
    for (const r of rs) if (r.status === 'rejected') throw r.reason
  }

  /**
   * write() as a plan (Layer.planWrite): true when every byte of it is an overwrite in place in
   * the top layer, planned for the FUSE workers; false when write() must do it.
   */
  planWrite (p: ReadPlan, pos: number, len: number): boolean {
    return this.top.writable && this.topChildren.length === 0 && this.top.planWrite(p, pos, len)
  }

  /** Write into the top layer (the live generation). */
  async write (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    if (pos + len > this.size) throw new RedoError('ENOSPC', `write of ${len} bytes at ${pos} goes past the capacity (${this.size} bytes)`)
    if (!this.top.writable) throw new RedoError('EROFS', `${this.top.path}: the top of the chain is read-only`, this.top.path)
    if (this.topChildren.length > 0) {
      throw new RedoError('EROFS', `${this.top.path}: ${this.topChildren[0]} names it as its parent; writing it would break that chain`, this.top.path)
    }
    const N = this.layers.length - 1
    const below = async (b: Buffer, o: number, p: number, l: number): Promise<void> => {
      if (N > 0) await this.index(N - 1).read(this.layers, b, o, p, l)
      else b.fill(0, o, o + l)
    }
    await this.top.write(buf, off, pos, len, below)
  }

  view (g: number): View {
    const N = this.layers.length - 1
    if (!Number.isInteger(g) || g < 0 || g > N) throw new RedoError('ENOENT', `generation ${g} does not exist (the chain has generations 0..${N})`)
    const live = g === N
    return {
      generation: g,
      live,
      size: this.size,
      read: async (buf, off, pos, len) => await this.read(g, buf, off, pos, len),
      write: async (buf, off, pos, len) => {
        if (!live) throw new RedoError('EROFS', `generation ${g} is frozen`)
        await this.write(buf, off, pos, len)
      },
      allocatedBytes: () => this.allocatedBytes(g),
      map: () => this.map(g)
    }
  }

  allocatedBytes (g: number): number {
    let n = 0
    // (a generation a running discard has just removed asks too: getattr of its file)
    for (let i = 0; i <= Math.min(g, this.layers.length - 1); i++) n += this.layers[i].allocatedBytes()
    return Math.min(n, this.size)
  }

  map (g: number): MapEntry[] {
    const N = this.layers.length - 1
    const segs = g < N ? this.index(g).segments : overlay(N > 0 ? this.index(N - 1).segments : [], this.top.runs(), N)
    return mapOf(segs, this.size)
  }

  async flush (): Promise<void> {
    await this.top.flush()
  }

  async close (): Promise<void> {
    let first: unknown
    for (const l of [...this.layers].reverse()) {
      try { await l.close() } catch (e) { first ??= e }
    }
    if (first !== undefined) throw first
  }

  /** Structural problems of every file and every link. */
  async check (): Promise<string[]> {
    const out: string[] = []
    for (const l of this.layers) out.push(...await l.check())
    for (let i = 1; i < this.layers.length; i++) out.push(...linkProblems(this.layers[i], this.layers[i - 1]))
    return [...new Set(out)]
  }
}

function linkProblems (child: Layer, parent: Layer): string[] {
  const out: string[] = []
  if (child.size !== parent.size) {
    out.push(`${child.path}: capacity ${child.size} bytes differs from its parent ${parent.path} (${parent.size} bytes)`)
  }
  if (child.hasCids && parent.hasCids && child.parentCID !== parent.cid) {
    out.push(`${child.path}: parentCID ${cidHex(child.parentCID)} does not match CID ${cidHex(parent.cid)} of its parent ${parent.path}`)
  }
  return out
}

async function walk (top: string, opts: ChainOptions, rawTop = false): Promise<{ layers: Layer[], journals: CommitJournal[] }> {
  const layers: Layer[] = []
  const journals: CommitJournal[] = []
  const seen = new Map<string, string>()
  try {
    let path = top
    let child: Layer | undefined
    for (;;) {
      const real = await realpath(path).catch(() => path)
      if (seen.has(real)) {
        throw new RedoError('ELOOP', `${child?.path ?? path}: parent loop: ${path} is already in the chain (${[...seen.values()].map(p => basename(p)).join(' -> ')} -> ${basename(path)})`, child?.path ?? path)
      }
      if (layers.length > MAX_DEPTH) throw new RedoError('ELOOP', `${top}: chain deeper than ${MAX_DEPTH} layers`, top)
      seen.set(real, path)
      let layer: Layer
      try {
        layer = await Layer.open(path, { writable: opts.writable, root: opts.root })
      } catch (e) {
        const err = toRedoError(e, path)
        // ESX 2.x: the parent of a bare REDO file is a raw flat disk without descriptor
        if ((child === undefined ? rawTop : child.legacyParent !== undefined) && err.code === 'EINVAL' && /not a VMDK file/.test(err.message)) {
          layer = await Layer.openRaw(path, { writable: opts.writable })
        } else throw err
      }
      layers.push(layer)
      if (opts.lenient !== true && layer.problems.length > 0) {
        const p = layer.problems
        throw new RedoError('EIO', p[0] + (p.length > 1 ? ` (and ${p.length - 1} more problems; run redofs check)` : ''), layer.path)
      }
      const j = await readJournal(path, opts.root)
      if (j !== undefined) journals.push(j)
      if (child !== undefined) {
        const journaled = journals.some(x => resolve(x.child) === resolve(child!.path) && resolve(x.parent) === resolve(path))
        for (const problem of linkProblems(child, layer)) {
          const isCid = problem.includes('parentCID')
          if (isCid && (journaled || opts.ignoreCid === true)) continue
          throw new RedoError('EINVAL', problem, child.path)
        }
      }
      if (!layer.hasParent) break
      const hint = layer.parentHint as string
      const candidates = parentCandidates(layer.path, hint)
      let found: string | undefined
      for (const c of candidates) {
        if (await stat(c).then(() => true, () => false)) { found = c; break }
      }
      if (found === undefined) {
        throw new RedoError('ENOENT', `${layer.path}: parent ${candidates[0]} not found (parentFileNameHint "${hint}")`, layer.path)
      }
      path = await resolveContained(dirname(layer.path), found, opts.root, 'parentFileNameHint', layer.path, hint)
      child = layer
    }
    layers.reverse()
    return { layers, journals }
  } catch (e) {
    for (const l of layers) await l.close().catch(() => {})
    throw e
  }
}
