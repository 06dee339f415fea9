/** Finding chain tops in a VM directory: descriptors that no other descriptor names as parent. */
import { readdir, realpath, stat } from 'node:fs/promises'
import { basename, dirname, join, resolve } from 'node:path'
import { RedoError, toRedoError } from '../errors'
import { Vmx, type DiskMode } from '../formats/vmx'
import { diskNameOf } from '../chain/names'
import { readJournal } from '../chain/journal'
import { brokenIn, peekDirs, type Peek } from '../chain/peek'

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
  const real = async (p: string): Promise<string> => await realpath(p).catch(() => resolve(p))
  const here = all.filter(p => resolve(dirname(p.path)) === resolve(dir))
  const parents = new Set<string>()
  for (const p of here) if (p.parent !== undefined) parents.add(await real(p.parent))
  const out: Peek[] = []
  for (const p of here) {
    const r = await real(p.path)
    if (!parents.has(r) && !await mergedAway(p, r, real)) out.push(p)
  }
  return out
}

/**
 * A redo log whose commit a crash interrupted after the layer above it was re-linked to its
 * parent: nothing names it any more, but it is no top (its content is in the parent, and the
 * real top is above). The next writable open drops it.
 */
async function mergedAway (p: Peek, real: string, realOf: (p: string) => Promise<string>): Promise<boolean> {
  if (p.parent === undefined) return false
  const j = await readJournal(p.parent).catch(() => undefined)
  // (with the layer above gone too, it stays, for the open to say what is wrong)
  return j?.above != null && await realOf(j.child) === real && await stat(j.above).then(() => true, () => false)
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

/** The real path of `p`, or `p` resolved when it cannot be read. */
export async function realOrResolved (p: string): Promise<string> {
  return await realpath(p).catch(() => resolve(p))
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

/**
 * Every disk top a mount of the store at `root` would serve: real path → "vm/disk" (read from
 * the .vmx files and descriptors; no chain is opened), by the scan's rules (store.ts): each
 * VM's own-directory disks first, and they are its own, then disks named from another
 * directory, one disk name per VM. For offline jobs: a layer listed here is another disk's
 * live file.
 */
export async function servedTops (root: string): Promise<Map<string, string>> {
  const dirs = (await vmDirs(root)).sort((a, b) => basename(a).localeCompare(basename(b)))
  const all = await peekDirs([root, ...dirs])
  const out = new Map<string, string>()
  const ids = new Set<string>()
  const claimed = new Set<string>()
  const later: Array<{ name: string, top: string }> = []
  const add = async (name: string, top: string): Promise<void> => {
    const id = `${name}/${diskNameOf(top)}`
    const real = await realOrResolved(top)
    if (out.has(real) || ids.has(id)) return
    out.set(real, id)
    ids.add(id)
  }
  for (const dir of dirs) {
    const name = basename(dir)
    if (name === 'status') continue // never served (store.ts)
    for (const w of (await vmTops(name, dir, all).catch(() => ({ wanted: [] as WantedTop[] }))).wanted) {
      if (resolve(dirname(w.top)) !== resolve(dir)) { later.push({ name, top: w.top }); continue }
      claimed.add(await diskKey(w.top))
      await add(name, w.top)
    }
  }
  for (const { name, top } of later) if (!claimed.has(await diskKey(top))) await add(name, top)
  return out
}
