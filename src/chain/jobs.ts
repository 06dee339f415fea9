/**
 * Jobs that change a chain's shape: addredo, commit, discard. Commit writes a journal first so
 * that a crash at any step is finished at the next open (finishCommit), never left half done.
 */
import { realpath, statfs, stat } from 'node:fs/promises'
import { basename, dirname, relative, resolve } from 'node:path'
import { RedoError, toRedoError } from '../errors'
import { createCowdLayer, createSparseLayer } from '../formats/create'
import { newCid } from '../formats/descriptor'
import { syncDir, type Run } from '../formats/extent'
import { DROPPED, Layer, parentHintFor, reapDropped } from '../formats/layer'
import { delayPoint, failPoint, faultPoint } from '../fault'
import { log } from '../log'
import type { Chain, ChainOptions } from './chain'
import { Index } from './view'
import { findLabel, labelOf, partOfOf, SESSION_KEY, setMeta } from './labels'
import { dropDigest, moveDigest, recordGeneration } from './digest'
import { journalPath, readJournal, removeJournal, writeJournal, type CommitJournal } from './journal'
import { diskNameOf, nextRedoPath } from './names'
import { childrenAmong, FileUsers, parentCandidates, peekStore, withAncestors } from './peek'

export interface Progress {
  done: number
  total: number
}

export interface JobControl {
  onProgress?: (p: Progress) => void
  /** Awaited between chunks: lets a caller pause a running commit. */
  gate?: () => Promise<void>
  /** Checked between chunks; a cancelled commit stops before re-linking (the chain stays valid). */
  cancelled?: () => boolean
  /** Wraps the moment the chain changes shape, so a caller can hold I/O off for it. */
  switchOver?: (fn: () => Promise<void>) => Promise<void>
  /**
   * Takes the merged child's dropped files (Layer.drop) to delete later; without it the commit
   * deletes them before it returns.
   */
  reap?: (files: string[]) => void
}

const COPY_CHUNK = 4 << 20
/** Chunks a commit keeps in flight. */
const COPY_WINDOW = 4
/** Bytes copied between background flushes of the parent during a commit. */
const FLUSH_BEHIND = 64 << 20

/** Flush the top, freeze it, and add an empty monolithicSparse redo log above it. Returns its path. */
export type RedoFormat = 'sparse' | 'cowd'

export async function addRedo (chain: Chain, opts: { label?: string, format?: RedoFormat, record?: boolean } = {}): Promise<string> {
  failPoint('addredo')
  const top = chain.top
  const pending = chain.unfinishedRefusal('addredo')
  if (pending !== undefined) throw pending
  // a child names its parent by CID (parentCID ffffffff means "no parent"): a layer without
  // descriptor (an ESX 2.x .REDO file or raw disk) has none to name
  if (!top.hasCids) throw new RedoError('EINVAL', `${top.path}: has no descriptor (ESX 2.x), so a redo log above it could not name it as its parent${top.isRaw ? '' : '; commit it into its base first'}`, top.path)
  // a child beside it means this file is not the top of its own chain: adding one would fork it
  const sameDir = chain.topChildren.filter(c => dirname(resolve(c)) === dirname(resolve(top.path)))
  if (sameDir.length > 0) {
    throw new RedoError('EBUSY', `${top.path}: not the top of its chain (${sameDir[0]} names it as its parent); add the redo log to the top instead`, top.path)
  }
  await top.flush()
  await top.endSession()
  // refused for space before anything changes (a label moved by a refused addredo would be lost)
  const dir = dirname(top.path)
  await ensureSpace(dir, 2 << 20, 'addredo')
  const path = await nextRedoPath(dir, diskNameOf(top.path))
  if (opts.label !== undefined) {
    const old = findLabel(chain, opts.label)
    if (old !== undefined) await setMeta(chain.layers[old], { label: null })
  }
  // (a partial-merge mark left on the live layer names no child of it: it goes)
  if (top.hasCids) await setMeta(top, { frozen: new Date(), label: opts.label, partOf: null })
  faultPoint('addredo.frozen')
  const link = { hint: parentHintFor(dir, top.path), cid: top.cid }
  if (opts.format === 'cowd') await createCowdLayer(path, top.size, link)
  else await createSparseLayer(path, top.size, link)
  const layer = await Layer.open(path, { writable: chain.opts.writable, root: chain.opts.root })
  chain.layers.push(layer)
  chain.topChildren = []
  log.chain('addredo: %s (parent CID %s)', path, top.descriptor.get('CID'))
  // a content record of the generation just frozen lets `redofs relink` verify it later
  if (opts.record === true) await recordGeneration(chain, chain.redoCount - 1)
  return path
}

async function ensureSpace (dir: string, bytes: number, what: string): Promise<void> {
  const s = await statfs(dir)
  const free = s.bavail * s.bsize
  if (free < bytes) throw new RedoError('ENOSPC', `${what}: ${dir} has ${free} bytes free, ${bytes} needed`, dir)
}

/** Upper bound of the bytes a commit of `child` into `parent` adds to the parent's files. */
function commitSpace (runs: Run[], parent: Layer): number {
  if (parent.extents.every(e => e.kind === 'flat')) return 0
  // every grain of the child may land in a new grain of the parent (plus rounding at both ends)
  let n = 0
  const gb = Math.max(...parent.extents.map(e => e.grainBytes))
  for (const r of runs) n += Math.ceil(r.length / gb) * gb + gb
  return n
}

/**
 * Refuse to write or delete `layer` when another descriptor uses one of its files as its own (a
 * second import of one raw image, a descriptor naming another disk's flat file or delta): no
 * force, that is no chain another disk is built on but the same bytes under two names.
 */
async function refuseOtherUsers (layer: Layer, users: FileUsers, what: string): Promise<void> {
  const alias = await users.otherThan(layer.path, [layer.path, ...layer.extents.flatMap(e => e.path ?? [])])
  if (alias !== undefined) throw new RedoError('EBUSY', `${layer.path}: its file ${alias.file} is also used by ${alias.user}; ${what}`, layer.path)
}

export interface CommitResult {
  /** Label of the generation the commit removed (its content is gone), if it had one. */
  droppedLabel?: string
}

/**
 * The refusals of a commit at `level` that need no I/O beyond reading descriptors (a VM-wide
 * commit checks every disk before it starts): the layers involved and the parent's other children.
 */
export async function checkCommit (chain: Chain, level: number, opts: { force?: boolean } = {}): Promise<{ i: number, child: Layer, parent: Layer, above: Layer | undefined, others: string[] }> {
  const N = chain.redoCount
  if (N === 0) throw new RedoError('EINVAL', `${chain.top.path}: the disk has no redo log to commit`)
  if (!Number.isInteger(level) || level < 0 || level > N - 1) {
    throw new RedoError('EINVAL', `level ${level} is out of range: the chain has ${N} redo log${N === 1 ? '' : 's'} (levels 0..${N - 1})`)
  }
  const i = N - level
  const child = chain.layers[i]
  const parent = chain.layers[i - 1]
  const above = i < N ? chain.layers[i + 1] : undefined
  const pending = chain.unfinishedRefusal(`commit of ${child.path}`, child.path)
  if (pending !== undefined) throw pending
  if (!parent.writable) throw new RedoError('EROFS', `${parent.path}: parent is read-only; cannot commit into it`, parent.path)
  if (!parent.hasCids && above !== undefined) {
    throw new RedoError('EINVAL', `${parent.path}: has no descriptor (ESX 2.x), so ${above.path} could not be re-linked to it; commit from the top down instead`, parent.path)
  }
  const peeks = await withAncestors(await peekStore([parent.path, child.path], chain.opts.root))
  const [ofParent, ofChild] = await childrenAmong(peeks, [parent.path, child.path])
  const users = await FileUsers.of(peeks)
  await refuseOtherUsers(parent, users, 'committing into it would change that disk too')
  await refuseOtherUsers(child, users, 'the commit deletes it, which would break that disk')
  const others = ofParent.filter(p => resolve(p) !== resolve(child.path))
  if (others.length > 0 && opts.force !== true) {
    throw new RedoError('EBUSY', `${parent.path}: shared by other chains (${others.join(', ')}); committing into it would change them (use force=1)`, parent.path)
  }
  const owner = opts.force === true ? undefined : await chain.opts.otherDisk?.(parent.path)
  if (owner !== undefined) {
    throw new RedoError('EBUSY', `${parent.path}: the live file of disk ${owner}; committing into it would change that disk (use force=1)`, parent.path)
  }
  // the merged file is deleted: no other chain may be built on it (force cannot help them)
  const onChild = ofChild.filter(p => above === undefined || resolve(p) !== resolve(above.path))
  if (onChild.length > 0) {
    throw new RedoError('EBUSY', `${child.path}: other chains are built on it (${onChild.join(', ')}); a commit would delete it under them`, child.path)
  }
  return { i, child, parent, above, others }
}

/**
 * Merge the redo log `level` levels below the top into its parent (level 0 = the top one).
 * Generations above it renumber; their content does not change.
 */
export async function commit (chain: Chain, level: number, opts: { force?: boolean } & JobControl = {}): Promise<CommitResult> {
  const { i, child, parent, above, others } = await checkCommit(chain, level, opts)
  // what the child holds, worked out once: a frozen child does not change while it is merged
  const runs = child.runs()
  await ensureSpace(dirname(parent.path), commitSpace(runs, parent) + (1 << 20), `commit into ${parent.path}`)
  const bad = runs.find(r => r.state === 'bad')
  if (bad !== undefined) throw new RedoError('EIO', `${child.path}: damaged grains at byte ${bad.start}; commit refused (run redofs check)`, child.path)
  // a commit that failed past its copy is finished by the roll-forward, not copied again (its
  // child may be dropped already)
  const before = await readJournal(parent.path, chain.opts.root)
  if (before?.phase !== undefined) {
    throw new RedoError('EBUSY', `commit of ${child.path}: an earlier commit got past its copy (${journalPath(parent.path)}); reopen the disk (remount, or any offline command), which finishes it`, journalPath(parent.path))
  }
  await child.flush()
  // the parent's content record and label go first (durably): from here on they describe
  // nothing (its content changes), and a roll-forward must not mistake the record for the
  // child's moved onto the parent. A commit undone before it wrote anything puts the label back.
  if (await dropDigest(parent.path)) await syncDir(dirname(parent.path))
  const droppedLabel = labelOf(parent)
  if (droppedLabel !== undefined) await setMeta(parent, { label: null })
  let j: CommitJournal = {
    op: 'commit',
    parent: resolve(parent.path),
    child: resolve(child.path),
    above: above !== undefined ? resolve(above.path) : null,
    v: 2,
    parentCID: newCid(parent.cid),
    rawParent: parent.isRaw,
    started: new Date().toISOString()
  }
  await writeJournal(j)
  faultPoint('commit.journal')
  // the journal stays for the next writable open: the chain must keep its shape until then
  const unfinished = (): void => { chain.unfinished = { child: child.path, journal: journalPath(parent.path) } }
  const copy = { wrote: false }
  /**
   * Undo a failed or cancelled copy: the parent is marked as holding part of the child. When
   * that fails too, or a parent without descriptor cannot carry the mark, the journal stays
   * (unfinished).
   */
  const undo = async (): Promise<boolean> => {
    if (copy.wrote && !parent.hasCids) { unfinished(); chain.invalidate(); return false }
    const undone = await abandonCommit(child, parent, copy.wrote, droppedLabel).then(() => true, e => { log.chain('%s: undoing the commit failed: %s', child.path, (e as Error).message); return false })
    if (!undone) unfinished()
    else if (chain.unfinished?.child === child.path) chain.unfinished = undefined // the journal is gone
    chain.invalidate()
    return undone
  }
  /** What a stopped commit left, for its error. */
  const stopped = (undone: boolean): string => !undone
    ? 'it is not undone: the next writable open finishes it (until then the chain keeps its shape)'
    : !copy.wrote
        ? chain.inFlux(i - 1)?.kind === 'partial'
          ? `nothing more was copied; generation ${i - 1} still holds part of generation ${i}'s changes from an earlier attempt`
          : 'nothing was copied, every generation is unchanged'
        : `generations ${i} and up are unchanged; generation ${i - 1} holds part of generation ${i}'s changes and is not served or exported until this commit is run again`
  const belowIndex = i >= 2 ? chain.index(i - 2) : undefined
  const parentProblems = parent.problems.length
  try {
    await copyInto(child, parent, j.parentCID, chain.layers, belowIndex, opts, runs, copy)
  } catch (e) {
    // Failed, not crashed: the user is told so, so the next open must not finish this commit
    // (nor trip over a chain changed since). Undone like a cancel, unless writing the parent
    // back failed (its new CID may or may not be on the disk: only the journal's roll-forward
    // is safe then) or the undo fails: the journal stays and the next writable open finishes it.
    const err = toRedoError(e)
    let undone = false
    if (parent.problems.length === parentProblems) undone = await undo()
    else { unfinished(); chain.invalidate() }
    throw new RedoError(err.code, `commit of ${child.path} failed: ${err.message}; ${stopped(undone)}`, err.file)
  }
  if (opts.cancelled?.() === true) {
    const undone = await undo()
    throw new RedoError('ECANCELED', `commit of ${child.path} cancelled: ${stopped(undone)}`)
  }
  // the copy is complete (recorded before the I/O pause of the switch)
  await writeJournal(j = { ...j, phase: 'copied' })
  const swap = opts.switchOver ?? (async (fn: () => Promise<void>) => await fn())
  let dropped: string[] = []
  try {
    await swap(async () => {
      dropped = await relinkAndDrop(j, parent, child, above)
      chain.unfinished = undefined
      chain.layers.splice(i, 1)
      chain.invalidate()
      if (above === undefined) chain.topChildren = others
    })
  } catch (e) {
    // the copy is complete and the journal kept: the next writable open (or the same commit
    // again) finishes the switch
    if (chain.layers[i] === child) unfinished()
    throw e
  }
  // deleting the merged file can take a while: after the switch, with I/O flowing again
  if (opts.reap !== undefined) opts.reap(dropped)
  else await reapDropped(dropped)
  log.chain('commit: %s merged into %s', child.path, parent.path)
  return { droppedLabel }
}

/**
 * Stop a commit whose copy did not finish: the parent holds part of the child's grains, all
 * still masked by the child, so every generation from the child up reads as before. The parent
 * got a new CID: re-link the child, drop what described the parent's old content, and remove
 * the journal. A parent that got nothing keeps its generation, and gets its `label` back.
 */
async function abandonCommit (child: Layer, parent: Layer, wrote: boolean, label: string | undefined): Promise<void> {
  if (child.hasCids) await child.setParent(child.parentHint as string, parent.cid)
  // the mark goes first: once the journal is gone, only it says the parent's generation is mixed
  if (parent.hasCids) await setMeta(parent, { label: wrote ? null : label ?? null, partOf: wrote ? relative(dirname(resolve(parent.path)), resolve(child.path)) : undefined })
  await dropDigest(parent.path)
  await removeJournal(parent.path)
}

/** Copy every run the child holds into the parent through the parent's write path. */
async function copyInto (child: Layer, parent: Layer, parentCID: number, layers: Layer[], belowIndex: Index | undefined, opts: JobControl, runs: Run[], copy = { wrote: false }): Promise<void> {
  await parent.beginSession(parentCID)
  // the work as chunks: neighbouring runs share a chunk; damaged runs were refused earlier
  const chunks: Array<{ pos: number, len: number, zero: boolean }> = []
  for (const r of runs) {
    if (r.state === 'bad') continue
    for (let p = r.start; p < r.start + r.length; p += COPY_CHUNK) chunks.push({ pos: p, len: Math.min(COPY_CHUNK, r.start + r.length - p), zero: r.state === 'zero' })
  }
  const total = chunks.reduce((s, c) => s + c.len, 0)
  let done = 0
  opts.onProgress?.({ done, total })
  const zeros = Buffer.alloc(COPY_CHUNK)
  const below = async (b: Buffer, o: number, p: number, l: number): Promise<void> => {
    if (belowIndex !== undefined) await belowIndex.read(layers, b, o, p, l)
    else b.fill(0, o, o + l)
  }
  // several chunks in flight: reads of the child and in-place writes of the parent overlap
  // (allocating writes still take the parent's allocation lock one at a time)
  const free: Buffer[] = Array.from({ length: COPY_WINDOW }, () => Buffer.alloc(COPY_CHUNK))
  // Flush as we go, one flush at a time: the disk writes back what was copied while the rest is
  // copied, so the final flush finds little left to do (the same ordered flush as at the end).
  let unflushed = 0
  let flushing: Promise<void> | null = null
  let flushFailure: unknown
  const flushBehind = (len: number): void => {
    unflushed += len
    if (unflushed < FLUSH_BEHIND || flushing !== null) return
    unflushed = 0
    flushing = parent.flush().catch(e => { flushFailure ??= e }).finally(() => { flushing = null })
  }
  let next = 0
  let stop = false
  let failure: unknown
  const worker = async (): Promise<void> => {
    while (!stop && failure === undefined && next < chunks.length) {
      const c = chunks[next++] // claimed before any await: workers never share a chunk
      if (opts.gate !== undefined) await opts.gate()
      await delayPoint('commit.chunk')
      if (opts.cancelled?.() === true) { stop = true; return }
      const b = c.zero ? zeros : free.pop() as Buffer
      try {
        failPoint('commit.copy')
        if (!c.zero) await child.read(b, 0, c.pos, c.len)
        copy.wrote = true
        await parent.write(b, 0, c.pos, c.len, below)
      } catch (e) {
        failure ??= e
      } finally {
        if (!c.zero) free.push(b)
      }
      done += c.len
      flushBehind(c.len)
      faultPoint('commit.copy')
      opts.onProgress?.({ done, total })
    }
  }
  await Promise.all(Array.from({ length: COPY_WINDOW }, worker))
  await flushing
  if (failure !== undefined) throw failure
  // a failed early flush fails the commit, unless it was cancelled: the final flush below then
  // decides, so a cancel still ends as a cancel when the disk recovered
  if (flushFailure !== undefined && opts.cancelled?.() !== true) throw flushFailure
  await parent.flush()
  await parent.endSession()
}

/**
 * Re-link the layer above to the parent, then drop the merged child (Layer.drop), then delete
 * the journal. Returns the dropped files, for the caller to reap.
 */
async function relinkAndDrop (j: CommitJournal, parent: Layer, child: Layer | undefined, above: Layer | undefined): Promise<string[]> {
  // the copy is complete: a roll-forward that finds the child gone may finish from here
  if (j.phase === undefined) await writeJournal(j = { ...j, phase: 'copied' })
  if (j.above !== null) {
    let a = above
    let own = false
    if (a === undefined) {
      if (!await exists(j.above)) throw new RedoError('ENOENT', `${j.above}: the layer above an interrupted commit is missing`, j.above)
      a = await Layer.open(j.above, { writable: true })
      own = true
    }
    try {
      const hint = parentHintFor(dirname(a.path), parent.path)
      faultPoint('commit.relink')
      if (a.parentHint !== hint || a.parentCID !== parent.cid) await a.setParent(hint, parent.cid)
      // a disk mode's session is marked on its first redo log: merged away, the next one is first
      const session = child?.descriptor.get(SESSION_KEY)
      if (session !== undefined && a.hasCids && a.descriptor.get(SESSION_KEY) === undefined) {
        const d = a.descriptor.clone()
        d.set(SESSION_KEY, session)
        await a.saveDescriptor(d)
      }
    } finally {
      if (own) await a.close()
    }
  }
  // the parent now holds the content of the child's generation: it takes its label and time
  // (an ESX 2.x raw base has no descriptor to hold them)
  const c = !parent.hasCids ? undefined : child ?? await openJournaledChild(j)
  if (c !== undefined) {
    const frozen = c.descriptor.get('ddb.redofs.frozen')
    // and the child's partial-merge mark: it names the layer above, now the parent's
    const mark = partOfOf(c)
    const partOf = mark === undefined ? null : relative(dirname(resolve(parent.path)), resolve(dirname(c.path), mark))
    await setMeta(parent, { label: labelOf(c) ?? null, frozen: frozen !== undefined ? new Date(frozen) : null, partOf })
    if (child === undefined) await c.close()
  }
  await moveDigest(j.child, parent.path)
  faultPoint('commit.drop')
  let dropped: string[] = []
  const drop = child ?? await openJournaledChild(j)
  if (drop !== undefined) dropped = await drop.drop()
  // from here a file under the child's name is not the child (its name was free)
  if (j.phase !== 'dropped') await writeJournal({ ...j, phase: 'dropped' })
  faultPoint('commit.unjournal')
  await removeJournal(parent.path)
  return dropped
}

async function exists (p: string): Promise<boolean> {
  return await stat(p).then(() => true, () => false)
}

/**
 * The redo log a journal merges, opened; undefined once it is gone. After its drop the name
 * was free, and a file another tool created under it since is not the child: left alone.
 */
async function openJournaledChild (j: CommitJournal, root?: string): Promise<Layer | undefined> {
  if (j.phase === 'dropped' || !await exists(j.child)) return undefined
  if (j.phase === undefined && j.v !== undefined) return await Layer.open(j.child, { root }) // never dropped yet
  // Past the copy the drop may have freed the name. Another file under it shows by the dropped
  // file beside it (unless reaped since), or by naming the parent's new CID, which the child
  // never does (its link is changed only by an undo, which ends the journal first).
  const c = await Layer.open(j.child, { root })
  const why = await exists(j.child + DROPPED) ? `${basename(j.child + DROPPED)} is there` : c.hasParent && c.hasCids && c.parentCID === j.parentCID ? 'it names the parent\'s new CID' : undefined
  if (why === undefined) return c
  log.chain('%s: not the merged redo log (%s): left alone', j.child, why)
  await c.close()
  return undefined
}

/** Finish a commit that a crash interrupted (all steps are idempotent). */
export async function finishCommit (j: CommitJournal, opts: ChainOptions): Promise<void> {
  const { Chain } = await import('./chain')
  // the parent of an ESX 2.x .REDO file may be a raw disk without descriptor (the journal says)
  const raw = j.rawParent === true
  const child = await openJournaledChild(j, opts.root)
  if (child !== undefined) {
    // open the parent's own chain for the COW source below it, and the child alone
    let pchain: Chain | undefined
    let parent: Layer | undefined
    try {
      pchain = raw ? undefined : await Chain.open(j.parent, { ...opts, writable: true, ignoreCid: true, noRecovery: true })
      parent = pchain?.top ?? await Layer.openRaw(j.parent, { writable: true })
      // merging a file that is not the parent's child would put another disk's data into it
      const target = await realpath(j.parent).catch(() => j.parent)
      const named = child.hasParent ? parentCandidates(child.path, child.parentHint as string) : []
      if (!(await Promise.all(named.map(async c => await realpath(c).catch(() => c)))).includes(target)) {
        throw new RedoError('EINVAL', `${journalPath(j.parent)}: names ${j.child} as the redo log to merge, but that file's parent is not ${j.parent}; inspect the journal by hand`, journalPath(j.parent))
      }
      // the commit checked the child before it started: damage found now must not be merged
      // away (its ranges would read the parent's old data instead of failing)
      const runs = child.runs()
      const bad = runs.find(r => r.state === 'bad')
      if (bad !== undefined) throw new RedoError('EIO', `${child.path}: damaged grains at byte ${bad.start}; the interrupted commit into ${j.parent} cannot be finished (run redofs check)`, child.path)
      // a journal from before such commits were refused: the shared file stays as it is
      await refuseOtherUsers(parent, await FileUsers.of(await withAncestors(await peekStore([parent.path], opts.root))), `the interrupted commit of ${child.path} into it cannot be finished (it would change that disk too): give each disk its own copy`)
      const below = pchain !== undefined && pchain.redoCount > 0 ? pchain.index(pchain.redoCount - 1) : undefined
      await copyInto(child, parent, j.parentCID, pchain?.layers ?? [parent], below, {}, runs)
      await reapDropped(await relinkAndDrop(j, parent, child, undefined))
    } finally {
      await child.close().catch(() => {})
      if (pchain !== undefined) await pchain.close()
      else await parent?.close()
    }
  } else {
    // the redo log is gone, which is right only once its copy was complete (older journals do
    // not say: they are finished as they always were)
    if (j.v !== undefined && j.phase === undefined) {
      throw new RedoError('ENOENT', `${journalPath(j.parent)}: the redo log it merges (${j.child}) is missing, and nothing shows the commit got past its copy; inspect the journal by hand`, journalPath(j.parent))
    }
    const parent = raw ? await Layer.openRaw(j.parent, { writable: true }) : await Layer.open(j.parent, { writable: true, root: opts.root })
    try {
      await reapDropped(await relinkAndDrop(j, parent, undefined, undefined))
    } finally {
      await parent.close()
    }
  }
}

export interface DiscardResult {
  /** Label of the generation that became live again (labels name frozen generations only). */
  droppedLabel?: string
  /** The discarded layers' files, dropped (Layer.drop): the caller reaps them (reapDropped). */
  files: string[]
  /** Set when force=1 made a generation holding part of a failed commit live: what it held. */
  mixedLive?: string
}

export interface DiscardOptions {
  /** Make live a layer other chains share, or another disk's live file. */
  force?: boolean
  /** Make live a generation a stopped commit left holding part of the one above (Chain.inFlux). */
  mixed?: boolean
}

/**
 * Every refusal of a discard to `to`, checked without changing anything (a VM-wide discard checks
 * every disk before it starts). Returns the generation kept and the other chains built on it.
 */
export async function checkDiscard (chain: Chain, to?: number, opts: DiscardOptions = {}): Promise<{ g: number, others: string[] }> {
  const N = chain.redoCount
  if (N === 0) throw new RedoError('EINVAL', `${chain.top.path}: the disk has no redo log to discard`)
  const g = to ?? N - 1
  if (!Number.isInteger(g) || g < 0 || g >= N) throw new RedoError('EINVAL', `to=${g} is out of range (generations 0..${N - 1} can be kept)`)
  const pending = chain.unfinishedRefusal('discard')
  if (pending !== undefined) throw pending
  const flux = chain.inFlux(g)
  if (flux !== undefined && opts.mixed !== true) throw new RedoError('EBUSY', `discard: ${flux.text}; discarding down to it would make that mix live (use force=1)`, flux.file)
  // the layer that becomes live will be written: it must not be another chain's parent
  const next = chain.layers[g + 1].path
  const peeks = await withAncestors(await peekStore(chain.layers.slice(g).map(l => l.path), chain.opts.root))
  const kids = await childrenAmong(peeks, chain.layers.slice(g).map(l => l.path))
  const users = await FileUsers.of(peeks)
  await refuseOtherUsers(chain.layers[g], users, 'making it live would change that disk too')
  for (const l of chain.layers.slice(g + 1)) await refuseOtherUsers(l, users, 'the discard deletes it, which would break that disk')
  const others = kids[0].filter(p => resolve(p) !== resolve(next))
  if (others.length > 0 && opts.force !== true) {
    throw new RedoError('EBUSY', `${chain.layers[g].path}: shared by other chains (${others.join(', ')}); it cannot become live (use force=1)`, chain.layers[g].path)
  }
  const owner = opts.force === true ? undefined : await chain.opts.otherDisk?.(chain.layers[g].path)
  if (owner !== undefined) {
    throw new RedoError('EBUSY', `${chain.layers[g].path}: the live file of disk ${owner}; it cannot become this disk's too (use force=1)`, chain.layers[g].path)
  }
  // the discarded files are deleted: no other chain may be built on any of them (force cannot help them)
  for (let k = 1; k < kids.length; k++) {
    const above = chain.layers[g + k + 1]?.path
    const on = kids[k].filter(p => above === undefined || resolve(p) !== resolve(above))
    if (on.length > 0) {
      const l = chain.layers[g + k].path
      throw new RedoError('EBUSY', `${l}: other chains are built on it (${on.join(', ')}); a discard would delete it under them`, l)
    }
  }
  return { g, others }
}

/**
 * Remove the top redo log, or every redo log above generation `to`. The files are only dropped
 * (renamed), so a caller holding I/O off can reap them after resuming it.
 */
export async function discard (chain: Chain, to?: number, opts: DiscardOptions = {}): Promise<DiscardResult> {
  const { g, others } = await checkDiscard(chain, to, opts)
  const flux = chain.inFlux(g)
  const mixedLive = flux === undefined ? undefined : `generation ${g} is live now, holding part of the discarded ${flux.child}'s changes (a commit into it had failed or was cancelled midway)`
  // top first: every intermediate state is a valid, shorter chain
  const files: string[] = []
  while (chain.layers.length - 1 > g) {
    const l = chain.layers[chain.layers.length - 1]
    files.push(...await l.drop())
    chain.layers.pop()
  }
  chain.invalidate()
  chain.topChildren = others
  const live = chain.top
  await dropDigest(live.path)
  const droppedLabel = labelOf(live)
  if (live.hasCids) await setMeta(live, { label: null, frozen: null, partOf: null })
  return { droppedLabel, files, mixedLive }
}
