/**
 * The datastore: VM directories, their disks and modes, the store lock, and what happens at
 * power on (mount) and power off (unmount). A disk that cannot be opened is left out with its
 * error; everything else is served.
 */
import { stat } from 'node:fs/promises'
import { dirname, relative, resolve } from 'node:path'
import { Chain } from '../chain/chain'
import { ParentIndex, peekStore } from '../chain/peek'
import { checkCommit, checkDiscard, commit, type RedoFormat } from '../chain/jobs'
import { SESSION_KEY } from '../chain/labels'
import { RedoError, toRedoError } from '../errors'
import { delayPoint } from '../fault'
import { realOrResolved } from '../formats/extent'
import { log } from '../log'
import { parseArgs } from './args'
import { Disk, type DiskOptions } from './disk'
import { StoreLock } from './lock'
import { planStore, type FileError } from './tops'
export type { FileError } from './tops'
import { Vmx, type DiskMode } from '../formats/vmx'

export interface StoreOptions {
  readOnly?: boolean
  ignoreCid?: boolean
  maxRedos?: number
  redoLimit?: number
  redoLimitHard?: boolean
  redoFormat?: RedoFormat
}

export class Vm {
  disks = new Map<string, Disk>()
  errors: FileError[] = []
  lastError = ''
  constructor (readonly name: string, readonly dir: string, readonly vmx?: Vmx) {}
}

export class Store {
  readonly vms = new Map<string, Vm>()
  readonly errors: FileError[] = []
  private lock: StoreLock | null = null
  /** Real path of every served disk's top → "vm/disk". */
  private readonly served = new Map<string, string>()
  /** Real path of every top a VM names in its own directory → "vm/disk", served or left out. */
  private owned = new Map<string, string>()
  readonly diskOpts: DiskOptions

  private constructor (readonly root: string, readonly opts: StoreOptions) {
    this.diskOpts = {
      readOnly: opts.readOnly === true,
      maxRedos: opts.maxRedos ?? 32,
      redoLimit: opts.redoLimit,
      redoLimitHard: opts.redoLimitHard === true,
      redoFormat: opts.redoFormat ?? 'sparse'
    }
  }

  /** Lock the store, open every disk, and power the disks on (SPEC §4). */
  static async open (root: string, opts: StoreOptions = {}): Promise<Store> {
    const r = resolve(root)
    const st = await stat(r).catch(() => undefined)
    if (st === undefined || !st.isDirectory()) throw new RedoError('ENOTDIR', `${r}: store is not a directory`, r)
    const s = new Store(r, opts)
    if (opts.readOnly !== true) s.lock = await StoreLock.acquire(r, 'redofs mount')
    try {
      await s.scan()
      if (opts.readOnly !== true) await s.powerOn()
    } catch (e) {
      await s.close().catch(() => {})
      throw e
    }
    return s
  }

  /** Open every disk the plan serves (tops.ts planStore holds the rules); one that fails stays out. */
  private async scan (): Promise<void> {
    const plan = await planStore(this.root, this.opts.readOnly !== true)
    this.errors.push(...plan.errors)
    this.owned = plan.owned
    for (const v of plan.vms) this.vms.set(v.name, Object.assign(new Vm(v.name, v.dir, v.vmx), { errors: v.errors }))
    // the plan's parent links, for every open (read again after one finished an interrupted
    // commit, which relinks files)
    let parents = await ParentIndex.of(plan.peeks)
    for (const d of plan.disks) {
      if (parents.stale) parents = await ParentIndex.of(await peekStore([], this.root))
      const vm = this.vms.get(d.vm) as Vm
      if (d.leftOut !== undefined) { vm.errors.push(d.leftOut); continue }
      try {
        // damaged grains do not keep a disk out: reads there fail with EIO, the rest is served
        const otherDisk = async (p: string): Promise<string | undefined> => {
          const r = await realOrResolved(p)
          const o = this.served.get(r) ?? this.owned.get(r)
          return o !== d.id ? o : undefined
        }
        const chain = await Chain.open(d.top, { writable: this.opts.readOnly !== true, ignoreCid: this.opts.ignoreCid, root: this.root, lenient: true, otherDisk, parents })
        const disk = await Disk.create(d.vm, d.name, chain, d.mode, this.diskOpts, vm.vmx !== undefined && d.device !== undefined ? { file: vm.vmx, device: d.device } : undefined)
        disk.onTopChanged = async () => {
          // the served map follows the disk's live file (replaced with no await in between)
          const now = await realOrResolved(disk.chain.top.path)
          for (const [f, o] of this.served) if (o === d.id) this.served.delete(f)
          this.served.set(now, d.id)
          await this.syncVmx(disk)
        }
        for (const j of chain.recovered) disk.notice(`finished the interrupted commit of ${j.child} into ${j.parent} at mount`)
        if (chain.topChildren.length > 0) {
          vm.errors.push({ file: chain.top.path, message: `${chain.top.path}: other chains use it as their parent; ${d.name}.img is read-only (addredo to write)` })
        }
        vm.disks.set(d.name, disk)
        this.served.set(await realOrResolved(chain.top.path), d.id) // the open may have finished a commit
        await this.syncVmx(disk)
      } catch (e) {
        const err = toRedoError(e, d.top)
        log.store('left out %s: %s', d.top, err.message)
        vm.errors.push({ file: err.file ?? d.top, message: err.message })
      }
    }
  }

  private async syncVmx (disk: Disk): Promise<void> {
    if (disk.vmx === undefined || this.opts.readOnly === true) return
    const rel = relative(dirname(disk.vmx.file.path), disk.chain.top.path)
    await disk.vmx.file.setFileName(disk.vmx.device, rel)
  }

  // ---- modes -----------------------------------------------------------------------------

  private async powerOn (): Promise<void> {
    for (const vm of this.vms.values()) {
      for (const disk of vm.disks.values()) {
        try {
          await this.powerOnDisk(disk)
        } catch (e) {
          const err = toRedoError(e)
          vm.errors.push({ file: disk.chain.top.path, message: `power on of ${disk.name} (${disk.mode}): ${err.message}` })
          vm.disks.delete(disk.name)
          await disk.chain.close().catch(() => {})
        }
      }
    }
  }

  /**
   * Layer index of the redo log the power-on of a nonpersistent or undoable disk added, or
   * undefined. Not necessarily the top: a user's addredo during the session stacks more redo
   * logs on it, and they belong to the session too.
   */
  private sessionStart (disk: Disk): number | undefined {
    const k = disk.chain.layers.findIndex((l, i) => i > 0 && l.descriptor.get(SESSION_KEY) !== undefined)
    return k < 0 ? undefined : k
  }

  private async markSession (disk: Disk, mode: DiskMode): Promise<void> {
    const top = disk.chain.top
    const d = top.descriptor.clone()
    d.set(SESSION_KEY, mode)
    await top.saveDescriptor(d)
  }

  private async powerOnDisk (disk: Disk): Promise<void> {
    switch (disk.mode) {
      case 'persistent':
        return
      case 'nonpersistent': {
        const k = this.sessionStart(disk)
        if (k !== undefined) {
          log.store('%s/%s: discarding a stale session', disk.vm, disk.name)
          await disk.doDiscard(k - 1, true, false) // force: as at power off (powerOffDisk)
        }
        await disk.doAddRedo()
        await this.markSession(disk, 'nonpersistent')
        return
      }
      case 'undoable':
        if (this.sessionStart(disk) !== undefined) return // a kept session: append to it
        await disk.doAddRedo()
        await this.markSession(disk, 'undoable')
        return
      case 'append':
        if (disk.chain.redoCount === 0) await disk.doAddRedo()
    }
  }

  private async powerOffDisk (disk: Disk): Promise<void> {
    await disk.shutdown()
    if (disk.opts.readOnly) return
    const k = this.sessionStart(disk)
    if (k === undefined) return
    if (disk.chain.unfinished !== undefined) {
      // the journal describes the chain as it is: the next writable open finishes that commit first
      log.store('%s/%s: power-off action skipped: the commit of %s is not finished', disk.vm, disk.name, disk.chain.unfinished.child)
      return
    }
    // force: the generation a session started from may be shared (a linked clone built on it);
    // it becomes the top again, but this mode never writes it (the next power on adds a session
    // redo log), so the session's end is not refused for that. A generation a stopped commit
    // left holding part of the session is refused: the session stays, and the power off fails
    if (disk.mode === 'nonpersistent' || (disk.mode === 'undoable' && disk.poweroff === 'discard')) {
      await disk.doDiscard(k - 1, true, false)
    } else if (disk.mode === 'undoable' && disk.poweroff === 'commit') {
      // every redo log of the session, bottom first, into the generation it started from
      while (disk.chain.redoCount >= k) await commit(disk.chain, disk.chain.redoCount - k, {})
      await this.syncVmx(disk)
    }
  }

  // ---- lookup and VM-wide commands ---------------------------------------------------------

  disk (vm: string, name: string): Disk | undefined {
    return this.vms.get(vm)?.disks.get(name)
  }

  /** A command on every disk of a VM, all or none: every disk is checked before any changes. */
  async vmCommand (vmName: string, kind: string, text: string): Promise<void> {
    const vm = this.vms.get(vmName)
    if (vm === undefined) throw new RedoError('ENOENT', `no VM ${vmName}`)
    try {
      const disks = [...vm.disks.values()]
      if (disks.length === 0) throw new RedoError('EINVAL', `${vmName}: the VM has no disks`)
      switch (kind) {
        case 'addredo': {
          parseArgs(text, { label: 'name', record: 'bool' }, 'addredo')
          for (const d of disks) d.precheck('addredo')
          const done: Disk[] = []
          try {
            for (const d of disks) {
              await d.command('addredo', text)
              done.push(d)
              await delayPoint('vm.addredo')
            }
          } catch (e) {
            // undone by merging each new redo log back, not by discarding it: the VM may have
            // written into it since, and those writes were acknowledged
            const left: string[] = []
            for (const d of done.reverse()) await d.command('commit', 'level=0').catch(u => { left.push(`${d.name} (${toRedoError(u).message})`) })
            const err = toRedoError(e)
            if (left.length > 0) throw new RedoError(err.code, `${err.message}; the redo log added on ${left.join(', ')} could not be merged back`, err.file)
            throw e
          }
          return
        }
        case 'commit': {
          const a = parseArgs(text, { level: 'level', freeze: 'bool', wait: 'bool', force: 'bool' }, 'commit')
          // every disk's refusals first, for every level it merges: all or none; then, with no
          // await in between, each disk's open generations are checked and those it removes held
          for (const d of disks) {
            for (const level of d.planCommit(a).levels) await checkCommit(d.chain, level, { force: a.force === true })
          }
          try {
            for (const d of disks) d.hold(d.planCommit(a).removed)
            await Promise.all(disks.map(async d => { d.releaseHold(); await d.command('commit', text) }))
          } finally {
            for (const d of disks) d.releaseHold()
          }
          return
        }
        case 'discard': {
          const a = parseArgs(text, { to: 'gen' }, 'discard')
          // every disk checked first, open generations included, and held from then on: all or none
          try {
            // the checks that read descriptors first; then each disk's open generations are
            // checked and held with no await in between (one opened meanwhile is seen)
            for (const d of disks) await checkDiscard(d.chain, d.planDiscard(a.to as number | string | undefined))
            for (const d of disks) d.hold(d.frozen.slice(d.planDiscard(a.to as number | string | undefined)))
            // each disk's hold ends as its own job takes over (no await in between): per-disk
            // commands stay refused until then
            for (const d of disks) { d.releaseHold(); await d.command('discard', text) }
          } finally {
            for (const d of disks) d.releaseHold()
          }
          return
        }
        default:
          throw new RedoError('EINVAL', `unknown command ${kind}`)
      }
    } catch (e) {
      vm.lastError = toRedoError(e).message
      throw e
    }
  }

  status (): Record<string, unknown> {
    return {
      store: this.root,
      readOnly: this.opts.readOnly === true,
      errors: this.errors,
      vms: [...this.vms.values()].map(vm => this.vmStatus(vm))
    }
  }

  vmStatus (vm: Vm): Record<string, unknown> {
    return {
      name: vm.name,
      dir: vm.dir,
      vmx: vm.vmx?.path ?? null,
      error: vm.lastError,
      errors: vm.errors,
      disks: [...vm.disks.values()].map(d => d.status())
    }
  }

  /** Power off every disk, flush and close everything, release the lock. */
  /** Power every disk off and release the store; then throws if a power-off action failed. */
  async close (): Promise<void> {
    const failed: string[] = []
    for (const vm of this.vms.values()) {
      for (const disk of vm.disks.values()) {
        try {
          await this.powerOffDisk(disk)
        } catch (e) {
          log.store('power off of %s/%s failed: %s', vm.name, disk.name, (e as Error).message)
          failed.push(`${vm.name}/${disk.name} (${disk.mode}): ${toRedoError(e).message}`)
        }
        await disk.chain.close().catch(e => log.store('close of %s/%s failed: %s', vm.name, disk.name, (e as Error).message))
      }
    }
    if (this.lock !== null) await this.lock.release()
    this.lock = null
    if (failed.length > 0) throw new RedoError('EIO', `power off failed: ${failed.join('; ')}`)
  }
}

