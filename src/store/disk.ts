/**
 * A mounted disk: its chain, the identity of each frozen generation (so an open file keeps
 * reading the same content when generations renumber), the control commands and their jobs.
 */
import { stat } from 'node:fs/promises'
import { basename, dirname } from 'node:path'
import type { Chain } from '../chain/chain'
import { addRedo, commit, discard, type RedoFormat } from '../chain/jobs'
import { recordGeneration } from '../chain/digest'
import { frozenAtOf, generationLabel, labelGeneration, resolveGeneration } from '../chain/labels'
import { RedoError, toRedoError } from '../errors'
import { cidHex } from '../formats/descriptor'
import type { ReadPlan } from '../formats/extent'
import { reapDropped, type Layer } from '../formats/layer'
import { log } from '../log'
import { parseArgs, type ArgValue } from './args'
import { IoGate } from './gate'
import type { DiskMode, Vmx } from '../formats/vmx'

export interface DiskOptions {
  readOnly: boolean
  maxRedos: number
  redoLimit?: number
  redoLimitHard: boolean
  redoFormat: RedoFormat
}

/** Identity of a frozen generation; survives renumbering. */
export class Generation {
  constructor (public frozenAt: Date) {}
}

export interface JobState {
  kind: 'addredo' | 'commit' | 'discard'
  args: string
  state: 'running' | 'paused' | 'done' | 'failed' | 'cancelled'
  /** Bytes per second over the time the job was not paused, and the seconds left at that rate. */
  rate?: number
  eta?: number
  done: number
  total: number
  started: string
  finished?: string
  error?: string
}

export type PowerOff = 'keep' | 'commit' | 'discard'

export class Disk {
  readonly gate = new IoGate()
  frozen: Generation[] = []
  liveMtime = new Date()
  job: JobState | null = null
  lastJob: JobState | null = null
  lastError = ''
  /** The top a write was refused for at the hard --redo-limit (status warns while it is the top). */
  private limitHit: Layer | undefined
  /** Things a command did that the user should know (a label dropped by a commit...). */
  notices: string[] = []
  poweroff: PowerOff = 'keep'
  private opens = new Map<Generation | 'live', number>()
  private running: Promise<void> | null = null
  /** Pause/cancel state of the running commit. */
  private ctl = { paused: false, cancel: false, wake: [] as Array<() => void>, pausedMs: 0, pausedAt: 0, freezing: false }
  private flushTimer: NodeJS.Timeout | null = null
  /** Called when the chain top file changes (to keep the .vmx pointing at it). */
  onTopChanged: (() => Promise<void>) | null = null
  /**
   * Set by the mount: runs fn at a moment no write(2) to the live file is half done (the kernel
   * may split one write into several requests) and, with `dropCache`, makes the kernel drop
   * what it cached of the live file before writers go on. Without a mount, nothing is needed.
   */
  liveBarrier: ((fn: () => Promise<void>, dropCache: boolean) => Promise<void>) | null = null

  constructor (
    readonly vm: string,
    readonly name: string,
    public chain: Chain,
    readonly mode: DiskMode,
    readonly opts: DiskOptions,
    readonly vmx?: { file: Vmx, device: string }
  ) {}

  static async create (vm: string, name: string, chain: Chain, mode: DiskMode, opts: DiskOptions, vmx?: { file: Vmx, device: string }): Promise<Disk> {
    const d = new Disk(vm, name, chain, mode, opts, vmx)
    // a generation froze when the layer above it was made: use that file's mtime as best known
    for (let g = 0; g < chain.redoCount; g++) {
      // recorded at addredo; for chains made elsewhere, the time the layer above was made
      const recorded = frozenAtOf(chain.layers[g])
      const st = recorded === undefined ? await stat(chain.layers[g + 1].path).catch(() => undefined) : undefined
      d.frozen.push(new Generation(recorded ?? (st?.birthtime !== undefined && st.birthtime.getTime() > 0 ? st.birthtime : st?.mtime ?? new Date())))
    }
    const st = await stat(chain.top.path).catch(() => undefined)
    if (st !== undefined) d.liveMtime = st.mtime
    return d
  }

  /** Read-only when the store is, while the top is another chain's parent (a linked clone's), or when its file cannot be written. */
  get writable (): boolean { return this.readOnlyBecause === undefined }
  /** Why the live file is read-only, or undefined when it is writable. */
  get readOnlyBecause (): string | undefined {
    if (this.opts.readOnly === true) return 'store mounted --read-only'
    if (this.chain.topChildren.length > 0) return 'its top is another chain\'s parent; addredo first'
    if (this.chain.top.extents.some(e => e.kind === 'sesparse')) return `${this.chain.top.path} is an SEsparse redo log, which redofs reads but never writes; addredo first`
    if (!this.chain.top.writable) return `${this.chain.top.path} cannot be written; see the disk's problems in status`
    return undefined
  }
  get size (): number { return this.chain.size }

  // ---- open accounting -------------------------------------------------------------------

  generationAt (g: number): Generation | undefined { return this.frozen[g] }

  /** Labels of frozen generations: name → generation number. */
  labels (): Map<string, number> {
    const out = new Map<string, number>()
    for (let g = 0; g < this.chain.redoCount; g++) {
      const l = generationLabel(this.chain, g)
      if (l !== undefined) out.set(l, g)
    }
    return out
  }
  indexOf (gen: Generation): number { return this.frozen.indexOf(gen) }

  opened (gen: Generation | 'live'): void { this.opens.set(gen, (this.opens.get(gen) ?? 0) + 1) }
  released (gen: Generation | 'live'): void {
    const n = (this.opens.get(gen) ?? 1) - 1
    if (n <= 0) this.opens.delete(gen)
    else this.opens.set(gen, n)
  }

  /**
   * Frozen generations the running job changes or removes (a commit's merged generations, a
   * discard's), from the moment it is accepted until it ends: they do not open meanwhile.
   */
  private changing = new Set<Generation>()

  /** Why `gen` cannot be opened now (a running job is changing it), or undefined. */
  openRefusal (gen: Generation | 'live'): RedoError | undefined {
    if (gen === 'live') return undefined
    const flux = this.fluxRefusal(this.indexOf(gen))
    if (flux !== undefined) return flux
    if (!this.changing.has(gen)) return undefined
    return new RedoError('EBUSY', `${this.vm}/${this.name}: generation ${this.indexOf(gen)} is being changed by a running ${this.job?.kind ?? 'job'}; open it when that has ended`)
  }

  /**
   * Why frozen generation g, or its map, is not served: a commit got part of the way merging
   * into it (a read-only mount leaves one a crash interrupted as it is, and a commit that failed
   * or was cancelled leaves part of the generation above in it).
   */
  fluxRefusal (g: number): RedoError | undefined {
    const f = this.chain.inFlux(g)
    if (f === undefined) return undefined
    return new RedoError('EBUSY', `${this.vm}/${this.name}: ${f.text}; ${f.kind === 'interrupted' ? 'a writable mount finishes it' : f.remedy}`)
  }

  private refuseIfOpen (gens: Generation[], what: string): void {
    for (const gen of gens) {
      if ((this.opens.get(gen) ?? 0) > 0) {
        throw new RedoError('EBUSY', `${this.vm}/${this.name}: generation ${this.indexOf(gen)} is open; ${what} would take its file ${this.name}@${this.indexOf(gen)}.img away`)
      }
    }
  }

  // ---- I/O -------------------------------------------------------------------------------

  async read (gen: Generation | 'live', buf: Buffer, off: number, pos: number, len: number): Promise<number> {
    const live = gen === 'live'
    return await this.gate.run(live, async () => {
      const g = live ? this.chain.redoCount : this.indexOf(gen)
      if (g < 0) throw new RedoError('EIO', `${this.vm}/${this.name}: this generation no longer exists`)
      return await this.chain.read(g, buf, off, pos, len)
    })
  }

  /**
   * read() as a plan for the FUSE server's worker threads (Extent.plan): the bytes it covers, or
   * -1 when read() must answer (I/O held off, a generation gone, damage...). Planned and handed
   * over synchronously, so no layer switch can come between; I/O holds wait for the plans given
   * out as for reads in flight, and a layer waits for them before it closes its descriptors
   * (setPlannedIo).
   */
  planRead (gen: Generation | 'live', p: ReadPlan, pos: number, len: number): number {
    const live = gen === 'live'
    if (!this.gate.isOpen(live)) return -1
    const g = live ? this.chain.redoCount : this.indexOf(gen)
    return g < 0 ? -1 : this.chain.plan(g, p, pos, len)
  }

  /**
   * write() as a plan for the FUSE server's worker threads (Layer.planWrite): the bytes it covers
   * (all of len), or -1 when write() must do it (I/O held off, a new grain to allocate...).
   * Only overwrites in place, so neither the redo log's size nor its tables change.
   */
  planWrite (p: ReadPlan, pos: number, len: number): number {
    if (!this.writable || pos + len > this.size || !this.gate.isOpen(true) || !this.chain.planWrite(p, pos, len)) return -1
    this.liveMtime = new Date()
    this.scheduleFlush()
    return len
  }

  async write (buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    if (!this.writable) throw new RedoError('EROFS', `${this.vm}/${this.name}: disk is read-only`)
    if (pos + len > this.size) throw new RedoError('ENOSPC', `${this.vm}/${this.name}: write past the capacity`)
    await this.gate.run(true, async () => {
      if (this.opts.redoLimit !== undefined && this.opts.redoLimitHard && this.chain.redoCount > 0 &&
          this.chain.top.allocatedBytes() + len > this.opts.redoLimit && !this.coveredByTop(pos, len)) {
        this.limitHit = this.chain.top // for status: the refusal itself is only an errno
        throw new RedoError('ENOSPC', `${this.vm}/${this.name}: redo log ${basename(this.chain.top.path)} reached --redo-limit`)
      }
      await this.chain.write(buf, off, pos, len)
      this.liveMtime = new Date()
    })
    this.scheduleFlush()
  }

  private coveredByTop (pos: number, len: number): boolean {
    const r = this.chain.top.lookup(pos, len)
    return r.state === 'data' && r.length >= len
  }

  /** Metadata reaches the disk within a few seconds even without fsync. */
  private scheduleFlush (): void {
    if (this.flushTimer !== null) return
    this.flushTimer = setTimeout(() => {
      this.flushTimer = null
      this.fsync().catch(e => log.store('%s/%s: background flush failed: %s', this.vm, this.name, (e as Error).message))
    }, 3000)
    this.flushTimer.unref()
  }

  async fsync (): Promise<void> {
    await this.gate.run(true, async () => await this.chain.flush())
  }

  // ---- commands --------------------------------------------------------------------------

  private fail (e: unknown): never {
    const err = toRedoError(e)
    this.lastError = err.message
    throw err
  }

  /** Run a control command (one line of key=value words). Resolves when done or accepted. */
  async command (kind: string, text: string): Promise<void> {
    try {
      await this.dispatch(kind, text)
    } catch (e) {
      this.fail(e)
    }
  }

  private async dispatch (kind: string, text: string): Promise<void> {
    switch (kind) {
      case 'addredo': {
        const a = parseArgs(text, { label: 'name', record: 'bool' }, 'addredo')
        this.precheck('addredo')
        return await this.runJob('addredo', text, async () => await this.doAddRedo(a.label as string | undefined, a.record === true))
      }
      case 'label': {
        const a = parseArgs(text, { gen: 'gen', name: 'name' }, 'label')
        if (a.gen === undefined || a.name === undefined) throw new RedoError('EINVAL', 'label: needs gen=G and name=NAME')
        this.precheck('label') // a running commit or discard moves and drops labels itself
        const g = resolveGeneration(this.chain, a.gen as number | string, 'label')
        await labelGeneration(this.chain, g, a.name as string)
        return
      }
      case 'commit': {
        const a = parseArgs(text, { level: 'level', freeze: 'bool', wait: 'bool', force: 'bool' }, 'commit')
        const plan = this.planCommit(a)
        const job = this.runJob('commit', text, async (st) => await this.doCommit(plan, st), plan.removed)
        if (a.wait === false) { job.catch(() => {}); return }
        return await job
      }
      case 'discard': {
        const a = parseArgs(text, { to: 'gen', force: 'bool' }, 'discard')
        const to = this.planDiscard(a.to as number | string | undefined)
        return await this.runJob('discard', text, async () => await this.doDiscard(to, a.force === true), this.frozen.slice(to))
      }
      case 'job': {
        const w = text.trim()
        const job = this.job
        if (job === null || job.kind !== 'commit') throw new RedoError('EINVAL', `job: no commit is running on ${this.vm}/${this.name}`)
        if (w === 'pause') {
          if (this.closing) throw new RedoError('EBUSY', 'job: the store is being unmounted; the commit is being cancelled')
          if (this.ctl.freezing) throw new RedoError('EBUSY', 'job: this commit freezes I/O on the live file; it cannot be paused (use freeze=0 with level >= 1)')
          if (!this.ctl.paused) { this.ctl.paused = true; this.ctl.pausedAt = Date.now(); job.state = 'paused' }
        } else if (w === 'resume') {
          this.resumeJob()
        } else if (w === 'cancel') {
          this.ctl.cancel = true
          this.resumeJob()
        } else throw new RedoError('EINVAL', `job: expected pause, resume or cancel, got "${w}"`)
        return
      }
      case 'poweroff': {
        if (this.closing) throw new RedoError('EBUSY', `${this.vm}/${this.name}: the store is being unmounted`)
        const w = text.trim()
        if (w !== 'keep' && w !== 'commit' && w !== 'discard') throw new RedoError('EINVAL', `poweroff: expected keep, commit or discard, got "${w}"`)
        // only an undoable disk asks (SPEC §4): taken elsewhere it would do nothing at power off
        if (this.mode !== 'undoable') throw new RedoError('EINVAL', `poweroff: ${this.vm}/${this.name} is ${this.mode}; only an undoable disk chooses at power off`)
        this.poweroff = w
        return
      }
      default:
        throw new RedoError('EINVAL', `unknown command ${kind}`)
    }
  }

  precheck (kind: string): void {
    if (this.opts.readOnly) throw new RedoError('EROFS', `${kind}: the store is mounted read-only`)
    if (this.closing) throw new RedoError('EBUSY', `${this.vm}/${this.name}: the store is being unmounted`)
    if (this.job !== null) throw new RedoError('EBUSY', `${this.vm}/${this.name}: a ${this.job.kind} job is running`)
    // generations held with no job of this disk: a command on the whole VM is on its way here
    if (this.changing.size > 0) throw new RedoError('EBUSY', `${this.vm}/${this.name}: a command on the whole VM is running`)
    if (kind !== 'commit' && kind !== 'label') {
      const pending = this.chain.unfinishedRefusal(`${this.vm}/${this.name}`)
      if (pending !== undefined) throw pending
    }
    if (kind === 'addredo' && this.chain.redoCount >= this.opts.maxRedos) {
      throw new RedoError('EBUSY', `${this.vm}/${this.name}: already ${this.chain.redoCount} redo logs (--max-redos ${this.opts.maxRedos})`)
    }
  }

  /**
   * Hold opens of the generations a VM-wide discard or commit will remove, before its jobs start
   * (it checks every disk first, then runs them). Released by the job's end, or by
   * `releaseHold` when the job never ran.
   */
  hold (gens: Generation[]): void { this.changing = new Set(gens) }
  releaseHold (): void { if (this.job === null) this.changing = new Set() }

  /** Validate a discard before accepting it: the generation that becomes live (its number). */
  planDiscard (toArg: number | string | undefined): number {
    this.precheck('discard')
    const N = this.chain.redoCount
    if (N === 0) throw new RedoError('EINVAL', `${this.vm}/${this.name}: the disk has no redo log to discard`)
    const to = toArg !== undefined ? resolveGeneration(this.chain, toArg, 'discard') : N - 1
    if (to < 0 || to >= N) throw new RedoError('EINVAL', `discard: to=${to} is out of range (0..${N - 1})`)
    this.refuseIfOpen(this.frozen.slice(to), 'discard')
    return to
  }

  /** Validate a commit before accepting it (so wait=0 refusals still fail the write). */
  planCommit (a: Record<string, ArgValue>): { levels: number[], freeze: boolean, force: boolean, removed: Generation[] } {
    this.precheck('commit')
    const N = this.chain.redoCount
    if (N === 0) throw new RedoError('EINVAL', `${this.vm}/${this.name}: the disk has no redo log to commit`)
    const level = a.level ?? 0
    const levels = level === 'all' ? Array.from({ length: N }, (_, k) => N - 1 - k) : [level as number]
    for (const l of levels) {
      if (l > N - 1) throw new RedoError('EINVAL', `commit: level=${l} is out of range: the disk has ${N} redo log${N === 1 ? '' : 's'} (levels 0..${N - 1})`)
    }
    const pending = this.chain.unfinishedRefusal(`${this.vm}/${this.name}`, this.chain.layers[N - levels[0]].path)
    if (pending !== undefined) throw pending
    // the generation just below the merged redo log disappears
    const removed = level === 'all' ? this.frozen.slice() : [this.frozen[N - (level as number) - 1]]
    this.refuseIfOpen(removed, 'commit')
    const lvl0 = levels.some(l => l === 0)
    return { levels, freeze: a.freeze !== false || lvl0, force: a.force === true, removed }
  }

  private resumeJob (): void {
    if (this.ctl.paused) {
      this.ctl.paused = false
      this.ctl.pausedMs += Date.now() - this.ctl.pausedAt
      if (this.job !== null) this.job.state = 'running'
    }
    const ws = this.ctl.wake
    this.ctl.wake = []
    for (const w of ws) w()
  }

  /** Between chunks: every copying worker of a paused commit waits here. */
  private async jobGate (): Promise<void> {
    while (this.ctl.paused && !this.ctl.cancel) await new Promise<void>(resolve => { this.ctl.wake.push(resolve) })
  }

  /** `changing`: the frozen generations the job changes or removes (they do not open meanwhile). */
  private runJob (kind: JobState['kind'], args: string, body: (st: JobState) => Promise<void>, changing: Generation[] = []): Promise<void> {
    this.ctl = { paused: false, cancel: false, wake: [], pausedMs: 0, pausedAt: 0, freezing: false }
    const st: JobState = { kind, args: args.trim(), state: 'running', done: 0, total: 0, started: new Date().toISOString() }
    this.job = st
    this.changing = new Set(changing)
    const p = (async () => {
      try {
        await body(st)
        st.state = 'done'
        this.lastError = ''
      } catch (e) {
        const err = toRedoError(e)
        st.state = err.code === 'ECANCELED' ? 'cancelled' : 'failed'
        st.error = err.message
        this.lastError = err.message
        throw err
      } finally {
        st.finished = new Date().toISOString()
        this.job = null
        this.changing = new Set()
        this.lastJob = st
        this.running = null
      }
    })()
    this.running = p.catch(() => {})
    return p
  }

  async idle (): Promise<void> {
    while (this.running !== null) await this.running
  }

  /** Deletions of dropped files (Layer.drop) still running after their job returned. */
  private reaping: Promise<void> = Promise.resolve()

  /**
   * Delete dropped files in the background. The job is complete and durable without them, and
   * deleting a large file takes a while (ext4 frees every extent, and under `-o discard` trims
   * them synchronously: ~0.15 s for 512 MiB here), which the command that asked for the job need
   * not wait for. The next change of the chain (addredo, commit, discard: a new file must not
   * take a name still being deleted, a space check must see the space freed) and unmount wait
   * for it (reaped); after a crash the next writable open deletes the files.
   */
  private async reaped (): Promise<void> {
    for (let p = this.reaping; ; p = this.reaping) {
      await p
      if (p === this.reaping) return
    }
  }

  private reapLater (files: string[]): void {
    if (files.length === 0) return
    this.reaping = this.reaping.then(async () => await reapDropped(files)).catch(e => log.store('%s/%s: %s', this.vm, this.name, (e as Error).message))
  }

  /**
   * After the job changed the chain: the job itself is done, so a .vmx that cannot be rewritten
   * is a notice, not its failure (a retry would add another redo log). The next change, or the
   * next mount (which follows the chain up from the file the .vmx names), rewrites it.
   */
  private async topChanged (): Promise<void> {
    this.liveMtime = new Date()
    try {
      if (this.onTopChanged !== null) await this.onTopChanged()
    } catch (e) {
      this.notice(`the .vmx could not be updated to name ${basename(this.chain.top.path)} (${toRedoError(e).message}); the next change or mount tries again`)
    }
  }

  /** Bumped whenever the chain changes shape: background work on a generation number stops. */
  private shape = 0

  /** `record`: also write a content record of the generation frozen (read in the background). */
  async doAddRedo (label?: string, record = false): Promise<void> {
    await this.reaped()
    await this.betweenWrites(false, async () => await this.gate.freezeLive(async () => {
      await addRedo(this.chain, { label, format: this.opts.redoFormat })
      this.frozen.push(new Generation(frozenAtOf(this.chain.layers[this.chain.redoCount - 1]) ?? new Date()))
      this.shape++
    }))
    await this.topChanged()
    if (record) this.recordLater(this.chain.redoCount - 1)
  }

  /** The content record being read in the background, if any. */
  private recording: Promise<void> = Promise.resolve()

  /** Content record of a newly frozen generation (for relink), read in the background. */
  private recordLater (g: number): void {
    const shape = this.shape
    const stale = (): boolean => this.shape !== shape || this.closing
    const before = this.recording
    this.recording = new Promise<void>(resolve => {
      setImmediate(() => {
        void before.then(async () => await recordGeneration(this.chain, g, stale))
          .catch(e => log.store('%s/%s: content record of generation %d: %s', this.vm, this.name, g, (e as Error).message))
          .finally(resolve)
      })
    })
  }

  /**
   * A job about to change frozen content (a commit merging into a layer, a discard making one
   * live) first stops a content record in progress: read meanwhile, it would mix old and new
   * content, and saved after the job dropped the layer's record, it would outlive it.
   */
  private async stopRecords (): Promise<void> {
    this.shape++
    await this.recording
  }

  /** Set at unmount: background work stops. */
  closing = false

  /**
   * Unmount: a paused commit is cancelled (nobody could resume it any more), jobs end, and
   * from then on every read and write fails with EIO once those in flight are done: a
   * descriptor opened before the (lazy) unmount must not write while the disk powers off.
   */
  async shutdown (): Promise<void> {
    this.closing = true
    if (this.ctl.paused) { this.ctl.cancel = true; this.resumeJob() }
    await this.idle()
    await this.recording // stopped by `closing`: nothing is saved after the power-off's jobs
    await this.gate.close(`${this.vm}/${this.name}: the store is being unmounted`)
    await this.reaped()
  }

  private async doCommit (plan: { levels: number[], freeze: boolean, force: boolean }, st: JobState): Promise<void> {
    // before any await: `pause` must refuse a freezing commit from its start (runJob calls this
    // at once), not only once it holds the live file's I/O
    this.ctl.freezing = plan.freeze
    await this.stopRecords()
    const run = async (): Promise<void> => {
      for (const [n, level] of plan.levels.entries()) {
        const i = this.chain.redoCount - level
        const merged = this.frozen[i - 1]
        let r: Awaited<ReturnType<typeof commit>>
        try {
          r = await commit(this.chain, level, {
            force: plan.force,
            onProgress: p => {
              st.done = p.done
              st.total = p.total
              const secs = (Date.now() - Date.parse(st.started) - this.ctl.pausedMs) / 1000
              st.rate = secs > 0 ? Math.round(p.done / secs) : 0
              st.eta = st.rate > 0 ? Math.round((p.total - p.done) / st.rate) : undefined
            },
            gate: async () => await this.jobGate(),
            cancelled: () => this.ctl.cancel,
            switchOver: async fn => await this.gate.freezeAll(async () => {
              await fn()
              this.frozen.splice(i - 1, 1)
              this.shape++
            }),
            // only the last level's file is deleted in the background: the levels before delete
            // theirs within the job, since the next level's space check must see that space
            reap: n === plan.levels.length - 1 ? files => this.reapLater(files) : undefined
          })
        } catch (e) {
          // a commit that stopped may have changed the merged generation: it gets a new
          // identity, so the kernel drops what it cached of it at the next open
          const k = this.frozen.indexOf(merged)
          if (k >= 0) { this.frozen[k] = new Generation(merged.frozenAt); this.shape++ }
          const u = this.chain.unfinished
          if (u !== undefined) this.notice(`commit of ${u.child} failed and is not undone: the chain keeps its shape until it is committed again or the store is remounted`)
          const f = this.chain.inFlux(i - 1)
          if (f?.kind === 'partial') this.notice(`${f.text}; it does not open until that redo log is committed again`)
          throw e
        }
        if (r.droppedLabel !== undefined) this.notice(`label "${r.droppedLabel}" dropped: commit merged generation ${i - 1} away`)
      }
    }
    await this.reaped() // before any hold: an earlier job's deletion does not stall live I/O
    if (plan.freeze) await this.gate.freezeLive(run)
    else await run()
    await this.topChanged()
  }

  notice (msg: string): void {
    this.notices.push(`${new Date().toISOString()} ${msg}`)
    if (this.notices.length > 20) this.notices.shift()
  }

  /** `mixed`: see DiscardOptions (a user's force=1 means both; a power-off's force does not). */
  async doDiscard (to: number, force = false, mixed = force): Promise<void> {
    await this.stopRecords()
    await this.reaped()
    // the live file then reads as generation `to`: pages cached from the discarded top must go
    let files: string[] = []
    await this.betweenWrites(true, async () => await this.gate.freezeAll(async () => {
      // checked again: a generation may have been opened while the barrier waited (at power
      // off the gate is closed: a descriptor still open reads nothing more)
      if (!this.closing) this.refuseIfOpen(this.frozen.slice(to), 'discard')
      const r = await discard(this.chain, to, { force, mixed })
      files = r.files
      this.frozen = this.frozen.slice(0, to)
      this.shape++
      if (r.droppedLabel !== undefined) this.notice(`label "${r.droppedLabel}" dropped: discard made generation ${to} live again`)
      if (r.mixedLive !== undefined) this.notice(r.mixedLive)
    }))
    // deleting the discarded files can take a while: not while I/O is held off (and in the
    // background, unless the disk is powering off: the store is released right after)
    if (this.closing) await reapDropped(files)
    else this.reapLater(files)
    await this.topChanged()
  }

  /** Run a chain switch between two write(2) calls to the live file, not inside one. */
  private async betweenWrites (dropCache: boolean, fn: () => Promise<void>): Promise<void> {
    if (this.liveBarrier === null) await fn()
    else await this.liveBarrier(fn, dropCache)
  }

  // ---- status ----------------------------------------------------------------------------

  status (): Record<string, unknown> {
    const c = this.chain
    const warnings: string[] = []
    if (this.opts.redoLimit !== undefined && c.redoCount > 0 && c.top.allocatedBytes() > this.opts.redoLimit) {
      warnings.push(`redo log ${basename(c.top.path)} holds ${c.top.allocatedBytes()} bytes, past --redo-limit ${this.opts.redoLimit}`)
    } else if (this.limitHit === c.top && c.redoCount > 0) {
      warnings.push(`redo log ${basename(c.top.path)} holds ${c.top.allocatedBytes()} bytes and reached --redo-limit ${this.opts.redoLimit as number} (hard): writes that need new grains fail with ENOSPC; addredo, commit or discard to go on`)
    }
    return {
      vm: this.vm,
      disk: this.name,
      mode: this.mode,
      device: this.vmx?.device ?? null,
      dir: dirname(c.top.path),
      top: basename(c.top.path),
      capacity: c.size,
      writable: this.writable,
      redoLogs: c.redoCount,
      generations: c.layers.map((l, g) => ({
        generation: g,
        file: l.path,
        format: l.createType,
        cid: l.hasCids ? cidHex(l.cid) : null,
        parentCID: l.hasParent && l.hasCids ? cidHex(l.parentCID) : null,
        allocated: l.allocatedBytes(),
        live: g === c.redoCount,
        label: generationLabel(c, g) ?? null,
        frozenAt: g < c.redoCount ? this.frozen[g]?.frozenAt.toISOString() ?? null : null,
        inFlux: c.inFlux(g)?.text ?? null
      })),
      job: this.job,
      lastJob: this.lastJob,
      poweroff: this.poweroff,
      error: this.lastError,
      problems: c.layers.flatMap(l => l.problems),
      notices: this.notices,
      warnings
    }
  }
}
