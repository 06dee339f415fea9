/** Finding chain tops in a VM directory: descriptors that no other descriptor names as parent. */
import { readdir, stat } from 'node:fs/promises'
import { basename, dirname, join, resolve } from 'node:path'
import { RedoError, toRedoError } from '../errors'
import { realOrResolved } from '../formats/extent'
import { Vmx, type DiskMode } from '../formats/vmx'
import { diskNameOf } from '../chain/names'
import { readJournal } from '../chain/journal'
import { brokenIn, FileUsers, peekDirs, withAncestors, type Peek } from '../chain/peek'

/** Chain tops among the descriptors in `dir` (parents found anywhere in `dirs`). */
export async function chainTops (dir: string, allDirs: string[] = [dir]): Promise<Peek[]> {
  return await topsAmong(dir, await peekDirs([...new Set([dir, ...allDirs])]))
}

/**
 * Chain tops in `dir` among descriptors already read (a store scan reads them once). Only a
 * child in the same directory makes a file no top: a disk that a linked clone in another VM
 * is built on is still its own VM's disk (served read-only while the clone uses it).
 */
export async function topsAmong (dir: string, all: Peek[]): Promise<Peek[]> {
  const here = all.filter(p => resolve(dirname(p.path)) === resolve(dir))
  const parents = new Set<string>()
  for (const p of here) if (p.parent !== undefined) parents.add(await realOrResolved(p.parent))
  const out: Peek[] = []
  for (const p of here) {
    const r = await realOrResolved(p.path)
    if (!parents.has(r) && !await mergedAway(p, r)) out.push(p)
  }
  return out
}

/**
 * A redo log whose commit a crash interrupted after the layer above it was re-linked to its
 * parent: nothing names it any more, but it is no top (its content is in the parent, and the
 * real top is above). The next writable open drops it.
 */
async function mergedAway (p: Peek, real: string): Promise<boolean> {
  if (p.parent === undefined) return false
  const j = await readJournal(p.parent).catch(() => undefined)
  // (with the layer above gone too, it stays, for the open to say what is wrong)
  return j?.above != null && await realOrResolved(j.child) === real && await stat(j.above).then(() => true, () => false)
}

/**
 * The top file of disk `<dir>/<disk>`: a .vmdk path is taken as it is; a bare disk name is looked
 * up among the chain tops of its directory. `writing`: the command will change the chain.
 */
export async function resolveDiskTop (arg: string, writing = false): Promise<string> {
  const file = /\.vmdk$|\.REDO$/i.test(arg)
  if (file) await stat(arg).catch(() => { throw new RedoError('ENOENT', `${arg}: no such file`, arg) })
  const dir = dirname(resolve(arg))
  const disk = file ? diskNameOf(arg) : basename(arg)
  // A file of the disk that cannot be read may be its top, or a redo log built on the layer
  // named: which chain a disk name means cannot be known, and writing a layer under it as if it
  // were not there would change what it is built on (the mount leaves such a disk out alike).
  // A file named to be read fixes its chain itself: salvaging what is intact stays possible.
  if (!file || writing) {
    const broken = (await brokenIn(dir)).find(b => diskNameOf(b.path) === disk)
    if (broken !== undefined) throw new RedoError('EIO', `${broken.error as string} (a file of disk "${disk}": its chain cannot be known until it is repaired or moved away)`, broken.path)
  }
  if (file) return resolve(arg)
  const tops = (await chainTops(dir)).filter(p => diskNameOf(p.path) === disk)
  if (tops.length === 0) throw new RedoError('ENOENT', `${arg}: no disk "${disk}" in ${dir}`, arg)
  // several tops of one disk name (a linked clone, a stray file): the newest redo number wins
  const redo = (p: Peek): number => Number(/-(\d{6})\.vmdk$/i.exec(p.path)?.[1] ?? 0)
  tops.sort((a, b) => redo(a) - redo(b) || basename(a.path).localeCompare(basename(b.path)))
  return tops[tops.length - 1].path
}

/** The VM directories of a store: its subdirectories but hidden ones. */
export async function vmDirs (root: string): Promise<string[]> {
  try {
    return (await readdir(root, { withFileTypes: true })).filter(e => e.isDirectory() && !e.name.startsWith('.')).map(e => join(root, e.name))
  } catch {
    return []
  }
}

/**
 * The top of the chain that `file` belongs to: follow children in the directory while there is
 * exactly one of the same disk name (a crash between addredo and the .vmx update heals here; a
 * child under another disk's name is that disk's, a clone made beside its parent).
 */
export async function findTop (file: string): Promise<string | undefined> {
  const dir = dirname(file)
  const peeks = await peekDirs([dir])
  let cur: string | undefined = (await stat(file).then(() => file, () => undefined))
  if (cur === undefined) {
    const tops = (await chainTops(dir)).filter(p => diskNameOf(p.path) === diskNameOf(file))
    return tops.length === 1 ? tops[0].path : undefined
  }
  for (let depth = 0; depth < 256; depth++) {
    const at: string = cur
    const kids = peeks.filter(p => p.parent !== undefined && resolve(p.parent) === resolve(at) && diskNameOf(p.path) === diskNameOf(file))
    if (kids.length !== 1) break
    cur = kids[0].path
  }
  return cur
}

export interface WantedTop { top: string, mode: DiskMode, device?: string }

/**
 * The disks VM `name` (directory `dir`) has: its .vmx's (`<name>.vmx`, else the first one),
 * each followed up to its chain's top, or without a .vmx (or an unreadable one: its error is
 * returned) every chain top in the directory, persistent. `all`: the store's descriptors.
 */
export async function vmTops (name: string, dir: string, all: Peek[]): Promise<{ vmx?: Vmx, errors: Array<{ file: string, message: string }>, wanted: WantedTop[] }> {
  const files = await readdir(dir)
  const vmxName = files.includes(`${name}.vmx`) ? `${name}.vmx` : files.find(f => /\.vmx$/i.test(f))
  const errors: Array<{ file: string, message: string }> = []
  let vmx: Vmx | undefined
  if (vmxName !== undefined) {
    try {
      vmx = await Vmx.read(join(dir, vmxName))
    } catch (e) {
      errors.push({ file: join(dir, vmxName), message: toRedoError(e).message })
    }
  }
  const wanted: WantedTop[] = []
  if (vmx !== undefined) {
    for (const d of vmx.disks()) {
      const top = await findTop(resolve(dir, d.fileName))
      if (top === undefined) { errors.push({ file: resolve(dir, d.fileName), message: `${resolve(dir, d.fileName)}: disk named by ${vmx.path} (${d.device}) not found` }); continue }
      wanted.push({ top, mode: d.mode, device: d.device })
    }
  } else {
    for (const p of await topsAmong(dir, all)) wanted.push({ top: p.path, mode: 'persistent' })
  }
  return { vmx, errors, wanted }
}

/** A disk as its files' directory (real path) and disk name: every layer of it in that directory. */
export async function diskKey (file: string): Promise<string> {
  return `${await realOrResolved(dirname(file))}/${diskNameOf(file)}`
}

/** The files of .ctl/<vm>/ besides its disks' directories: the VM-wide commands, status, error. */
export const VM_COMMANDS = ['addredo', 'commit', 'discard'] as const
const VM_CTL_FILES = new Set<string>([...VM_COMMANDS, 'status', 'error'])

export interface FileError { file: string, message: string }

/** A disk the mount would serve (its chain may still fail to open), or one it leaves out. */
export interface PlannedDisk extends WantedTop {
  vm: string
  name: string
  /** "vm/disk" */
  id: string
  /** Real path of the top. */
  real: string
  /** Why the disk stays out (a static rule), for its VM's errors. */
  leftOut?: FileError
}

export interface StorePlan {
  /** Errors of the store itself (a VM directory that cannot be one). */
  errors: FileError[]
  vms: Array<{ name: string, dir: string, vmx?: Vmx, errors: FileError[] }>
  /** Every disk a VM names, in the order they are served: each VM's own-directory disks first. */
  disks: PlannedDisk[]
  /** Real path of every top a VM names in its own directory → "vm/disk", served or left out. */
  owned: Map<string, string>
  /** Every descriptor the plan read (for the parent links the disks' opens look up). */
  peeks: Peek[]
}

/**
 * What a mount of the store at `root` serves, read from the .vmx files and descriptors (no chain
 * is opened): every rule of the scan that needs no open. The mount opens the disks this plan
 * serves; offline jobs ask it whose live file a layer is.
 * - A VM directory named "status" stays out (.ctl/status is the store's status file); an
 *   unreadable one is that VM's error.
 * - A disk with a file that cannot be read stays out (its chain cannot be known); so does one
 *   named like a VM's control file, or "<another disk of the VM>@x" (the mount's name for
 *   generation or label x of that disk), or a second chain top of one disk name.
 * - One file is one disk: it belongs to the VM whose directory holds it when that VM names
 *   it (served or left out there); disks named from another directory come after every VM's
 *   own, and a file already taken is left out of the later VM.
 */
export async function planStore (root: string, writable = true): Promise<StorePlan> {
  const dirs = (await vmDirs(root)).sort((a, b) => basename(a).localeCompare(basename(b)))
  // every descriptor of the store, read once: chains may cross VM directories (linked clones)
  const all = await peekDirs([root, ...dirs])
  const plan: StorePlan = { errors: [], vms: [], disks: [], owned: new Map(), peeks: all }
  // descriptors whose files another descriptor uses too: they may stay frozen under redo logs
  // (commits and discards refuse to write or delete them: jobs.ts refuseOtherUsers), but are no
  // disk's live file
  const shared = (await FileUsers.of(await withAncestors(all))).shared()
  const claimed = new Map<string, string>() // diskKey → "vm/disk"
  const taken = new Map<string, string>() // real path of a planned top → "vm/disk"
  const later: Array<() => Promise<void>> = []
  for (const dir of dirs) {
    const name = basename(dir)
    if (name === 'status') {
      plan.errors.push({ file: dir, message: `${dir}: VM "status" left out: .ctl/status is the store's status file; rename the directory` })
      continue
    }
    const { vmx, errors, wanted } = await vmTops(name, dir, all).catch(e => ({ vmx: undefined, errors: [{ file: dir, message: toRedoError(e, dir).message }], wanted: [] as WantedTop[] }))
    const vm = { name, dir, vmx, errors }
    plan.vms.push(vm)
    const own = (w: WantedTop): boolean => resolve(dirname(w.top)) === resolve(dir)
    for (const w of wanted.filter(own)) {
      claimed.set(await diskKey(w.top), `${name}/${diskNameOf(w.top)}`)
      plan.owned.set(await realOrResolved(w.top), `${name}/${diskNameOf(w.top)}`)
    }
    const broken = new Set<string>()
    for (const b of await brokenIn(dir)) {
      broken.add(diskNameOf(b.path))
      errors.push({ file: b.path, message: b.error as string })
    }
    const names = new Set([...wanted.map(w => diskNameOf(w.top)), ...broken])
    const ids = new Set<string>()
    const place = async (w: WantedTop): Promise<void> => {
      const diskName = diskNameOf(w.top)
      if (broken.has(diskName)) return // its error is the VM's already
      const id = `${name}/${diskName}`
      const real = await realOrResolved(w.top)
      const d: PlannedDisk = { ...w, vm: name, name: diskName, id, real }
      const out = (message: string): void => { d.leftOut = { file: w.top, message: `${w.top}: ${message}` } }
      const at = diskName.lastIndexOf('@')
      const other = diskName.slice(0, Math.max(at, 0))
      const owner = claimed.get(await diskKey(w.top))
      if (VM_CTL_FILES.has(diskName)) out(`disk "${diskName}" left out: .ctl/${name}/${diskName} is the VM's own control file; rename the disk`)
      else if (at > 0 && names.has(other)) out(`disk "${diskName}" left out: ${diskName}.img is the name of generation or label "${diskName.slice(at + 1)}" of disk "${other}"; rename one of the two disks`)
      else if (ids.has(id)) out(`a second chain top for disk "${diskName}" (left out)`)
      else if (taken.has(real)) out(`already served as ${taken.get(real) as string}; disk "${diskName}" of ${name} left out`)
      else if (owner !== undefined && owner !== id) out(`a disk of VM directory ${owner}; disk "${diskName}" of ${name} left out`)
      else if (writable && shared.has(real)) out(`its file ${shared.get(real) as string}; writing it would change that disk too, so disk "${diskName}" is left out (redofs addredo puts a redo log above it)`)
      else {
        ids.add(id)
        taken.set(real, id)
      }
      plan.disks.push(d)
    }
    for (const w of wanted) {
      if (own(w)) await place(w)
      else later.push(async () => await place(w))
    }
  }
  for (const place of later) await place()
  return plan
}

/**
 * Whose live file `path` is in the store `plan` describes ("vm/disk"): a disk the mount serves,
 * or one a VM owns but leaves out. For offline jobs.
 */
export async function liveFileOf (plan: StorePlan, path: string): Promise<string | undefined> {
  const r = await realOrResolved(path)
  return plan.disks.find(d => d.leftOut === undefined && d.real === r)?.id ?? plan.owned.get(r)
}
