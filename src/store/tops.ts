/** Finding chain tops in a VM directory: descriptors that no other descriptor names as parent. */
import { realpath, stat } from 'node:fs/promises'
import { basename, dirname, resolve } from 'node:path'
import { RedoError } from '../errors'
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
