/**
 * Cheap look at a VMDK file's descriptor without opening its extents: used to find the other
 * children of a layer (linked clones) and the chain tops of a directory.
 */
import { readdir, stat } from 'node:fs/promises'
import { basename, dirname, isAbsolute, join, resolve } from 'node:path'
import { COWD_MAGIC } from '../formats/cowd'
import { Descriptor } from '../formats/descriptor'
import { openStoreFile, realOrResolved } from '../formats/extent'
import { DROPPED } from '../formats/layer'
import { KDMV_MAGIC, descriptorIntent, descriptorIntentPath, parseSparseHeader } from '../formats/sparse'
import { SECTOR } from '../units'

export interface Peek {
  path: string
  descriptor?: Descriptor
  /** Parent file this one names, resolved like the chain does (may not exist). */
  parent?: string
  /** Set for files that are extents of another descriptor, never chain members themselves. */
  extentOnly: boolean
  /** The descriptor is embedded in a sparse extent (it names that file, under any old name). */
  embedded?: boolean
  /** Set when a file that should be a descriptor cannot be read as one. */
  error?: string
  /**
   * Set when extentOnly is only a guess (the data of a flat extent has no header to tell): what
   * is wrong with the file if no descriptor uses it after all (brokenIn).
   */
  unless?: string
}

/** Names VMware gives to extents (never chain members): -flat, -sNNN, -fNNN, -delta, -ctk... */
export const EXTENT_NAME = /-(flat|s\d{3}|f\d{3}|delta|sesparse|ctk)\.vmdk$/i

/** Parent candidates for a hint: relative to the child first, then the bare name beside it. */
export function parentCandidates (childPath: string, hint: string): string[] {
  const dir = dirname(childPath)
  const norm = hint.replace(/\\/g, '/')
  const out = [resolve(dir, norm)]
  if (isAbsolute(norm) || /^[A-Za-z]:\//.test(norm)) out.push(join(dir, basename(norm)))
  return [...new Set(out)]
}

export async function peek (path: string): Promise<Peek | undefined> {
  let fh
  try { fh = await openStoreFile(path) } catch { return undefined }
  try {
    const st = await fh.stat()
    if (!st.isFile()) return EXTENT_NAME.test(path) ? { path, extentOnly: true } : { path, extentOnly: false, error: `${path}: not a regular file` }
    if (st.size < 4) return EXTENT_NAME.test(path) ? { path, extentOnly: true } : { path, extentOnly: false, error: `${path}: file too short to be a VMDK (${st.size} bytes)` }
    const head = Buffer.alloc(Math.min(st.size, 4096))
    await fh.read(head, 0, head.length, 0)
    const magic = head.readUInt32LE(0)
    let text: string | undefined
    if (magic === KDMV_MAGIC) {
      const h = parseSparseHeader(head.subarray(0, 512), path)
      if (h.descriptorOffset === 0 || h.descriptorSize === 0) return { path, extentOnly: true }
      const b = Buffer.alloc(Math.min(h.descriptorSize * SECTOR, 1 << 20))
      await fh.read(b, 0, b.length, h.descriptorOffset * SECTOR)
      // an interrupted rewrite of the area left the new descriptor in its intent file
      const intent = await descriptorIntent(path, h.descriptorOffset, b)
      text = (intent?.kind === 'apply' ? intent.area : b).toString('utf8')
    } else if (magic === COWD_MAGIC) {
      return { path, extentOnly: true }
    } else {
      const unknown = `${path}: not a VMDK file (unknown magic ${head.subarray(0, 4).toString('hex')})`
      if (st.size > 1 << 20) return { path, extentOnly: true, unless: unknown }
      const t = head.toString('latin1')
      if (!/^\s*(#|version\s*=)/i.test(t)) {
        if (EXTENT_NAME.test(path) || st.size > 1 << 16) return { path, extentOnly: true, unless: unknown }
        return { path, extentOnly: false, error: unknown }
      }
      const b = Buffer.alloc(st.size)
      await fh.read(b, 0, st.size, 0)
      text = b.toString('utf8')
    }
    const descriptor = Descriptor.parse(text, path)
    const hint = descriptor.hasParent ? descriptor.parentFileNameHint : undefined
    return { path, descriptor, parent: hint !== undefined ? parentCandidates(path, hint)[0] : undefined, extentOnly: false, embedded: magic === KDMV_MAGIC }
  } catch (e) {
    if (EXTENT_NAME.test(path)) return { path, extentOnly: true }
    return { path, extentOnly: false, error: (e as Error).message }
  } finally {
    await fh.close()
  }
}

/**
 * Every descriptor-bearing .vmdk in `dirs`. A file named like an extent (`-flat.vmdk`...) that
 * a descriptor uses as its extent is not one, whatever it holds: a flat extent's bytes are the
 * guest's, and may start like a monolithicSparse file.
 */
export async function peekDirs (dirs: string[]): Promise<Peek[]> {
  const out: Peek[] = []
  for (const d of dirs) {
    let names: string[]
    try { names = await readdir(d) } catch { continue }
    for (const n of names.sort()) {
      if (!/\.vmdk$/i.test(n) || n.startsWith('.')) continue
      const p = await peek(join(d, n))
      if (p !== undefined && !p.extentOnly && p.error === undefined) out.push(p)
    }
  }
  const named = out.filter(p => EXTENT_NAME.test(p.path))
  if (named.length === 0) return out
  const extents = new Set<string>()
  for (const f of out.flatMap(p => filesOf(p).slice(1))) { const id = await fileId(f); if (id !== undefined) extents.add(id) }
  const dropped = new Set<Peek>()
  for (const p of named) if (extents.has(await fileId(p.path) ?? '')) dropped.add(p)
  return out.filter(p => !dropped.has(p))
}

/**
 * `peeks` and the descriptors their parent links lead to outside them (a template in a hidden
 * or nested directory that no store scan reads), so that who uses which file is known for
 * every layer of their chains.
 */
export async function withAncestors (peeks: Peek[]): Promise<Peek[]> {
  const out = [...peeks]
  const known = new Set<string>()
  for (const p of peeks) known.add(await realOrResolved(p.path))
  for (let i = 0; i < out.length && out.length < 100_000; i++) {
    const parent = out[i].parent
    if (parent === undefined) continue
    const r = await realOrResolved(parent)
    if (known.has(r)) continue
    known.add(r)
    const q = await peek(r)
    if (q?.descriptor !== undefined) out.push(q)
  }
  return out
}

/** The VM directories of a store root (and the root itself). */
export async function storeDirs (root: string): Promise<string[]> {
  const out = [root]
  try {
    for (const e of await readdir(root, { withFileTypes: true })) if (e.isDirectory() && !e.name.startsWith('.')) out.push(join(root, e.name))
  } catch {}
  return out
}

/** Files (descriptors) anywhere in the store that name `parent` as their parent. */
export async function childrenOf (parent: string, root: string | undefined): Promise<string[]> {
  return (await childrenAmong(await peekStore([parent], root), [parent]))[0]
}

/** The descriptors of the store `root` (or, without one, of the directories `layers` lie in). */
export async function peekStore (layers: string[], root: string | undefined): Promise<Peek[]> {
  return await peekDirs(root !== undefined ? await storeDirs(root) : [...new Set(layers.map(p => dirname(p)))])
}

/** childrenOf each of `parents` among descriptors already read. */
export async function childrenAmong (peeks: Peek[], parents: string[]): Promise<string[][]> {
  const index = await ParentIndex.of(peeks)
  return await Promise.all(parents.map(async p => await index.childrenOf(p) ?? []))
}

/**
 * Which descriptors use which file (device and inode: hard links are one file), from
 * descriptors already read, one stat per file. Writing or deleting a layer whose file another
 * descriptor uses would change that disk too (a raw image imported twice, a descriptor naming
 * another disk's flat file or delta).
 */
export class FileUsers {
  private constructor (private readonly byId: Map<string, Array<{ real: string, path: string, file: string }>>) {}

  static async of (peeks: Peek[]): Promise<FileUsers> {
    const byId = new Map<string, Array<{ real: string, path: string, file: string }>>()
    for (const p of peeks) {
      const real = await realOrResolved(p.path)
      for (const file of new Set(filesOf(p))) {
        const id = await fileId(file)
        if (id === undefined) continue
        const list = byId.get(id) ?? []
        if (!list.some(u => u.real === real)) list.push({ real, path: p.path, file })
        byId.set(id, list)
      }
    }
    return new FileUsers(byId)
  }

  /** A descriptor other than `layer` that uses one of `files` (the layer's own), with the file. */
  async otherThan (layer: string, files: string[]): Promise<{ user: string, file: string } | undefined> {
    const self = await realOrResolved(layer)
    for (const f of files) {
      const id = await fileId(f)
      const other = id !== undefined ? this.byId.get(id)?.find(u => u.real !== self) : undefined
      if (other !== undefined) return { user: other.path, file: f }
    }
    return undefined
  }

  /** Every descriptor (by real path) a file of which another descriptor uses too, saying which. */
  shared (): Map<string, string> {
    const out = new Map<string, string>()
    for (const list of this.byId.values()) {
      for (const u of list) {
        const other = list.find(o => o.real !== u.real)
        if (other !== undefined && !out.has(u.real)) out.set(u.real, `${u.file} is also used by ${other.path}${other.file !== u.file ? ` (as ${other.file})` : ''}`)
      }
    }
    return out
  }
}

/** A descriptor's files: itself, and the extents a stand-alone one lists. */
export function filesOf (p: Peek): string[] {
  return [p.path, ...p.embedded === true ? [] : (p.descriptor?.extents ?? []).flatMap(e => e.file !== undefined ? [resolve(dirname(p.path), e.file)] : [])]
}

/** A file's identity (device and inode: hard links are one file), or undefined when it cannot be read. */
export async function fileId (f: string): Promise<string | undefined> {
  return await stat(f).then(s => `${s.dev}:${s.ino}`, () => undefined)
}

/**
 * Who names whom as parent, from descriptors already read: a mount's scan of the store answers
 * every disk's childrenOf from it instead of reading the whole store again per disk (with
 * hundreds of disks that was minutes).
 */
export class ParentIndex {
  private valid = true
  private constructor (private readonly byParent: Map<string, string[]>) {}

  static async of (peeks: Peek[]): Promise<ParentIndex> {
    const byParent = new Map<string, string[]>()
    for (const p of peeks) {
      if (p.parent === undefined) continue
      const r = await realOrResolved(p.parent)
      const list = byParent.get(r)
      if (list === undefined) byParent.set(r, [p.path])
      else list.push(p.path)
    }
    return new ParentIndex(byParent)
  }

  /** The files that name `parent`; undefined once the store changed under the index. */
  async childrenOf (parent: string): Promise<string[] | undefined> {
    if (!this.valid) return undefined
    const r = await realOrResolved(parent)
    return [...this.byParent.get(r) ?? []]
  }

  invalidate (): void {
    this.valid = false
  }

  get stale (): boolean {
    return !this.valid
  }
}

/**
 * What a drop killed between its renames (Layer.drop: the descriptor first) left under the old
 * names in `dir`: the extents of a dropped stand-alone descriptor that no descriptor in `dir`
 * uses, and the dropped layer's content record and descriptor intent. For the reaper.
 */
export async function unfinishedDrops (dir: string): Promise<string[]> {
  let names: string[]
  try { names = await readdir(dir) } catch { return [] }
  const have = new Set(names)
  const out: string[] = []
  let used: Set<string> | undefined
  for (const n of names.filter(n => n.endsWith(DROPPED))) {
    const was = n.slice(0, -DROPPED.length)
    if (have.has(was)) continue
    for (const side of [`${was}.redofs-digest`, basename(descriptorIntentPath(was))]) if (have.has(side)) out.push(join(dir, side))
    // only a stand-alone descriptor has extents of its own: an embedded one names its own
    // file, under whatever name it had
    const p = /\.vmdk$/i.test(was) ? await peek(join(dir, n)) : undefined
    for (const e of p?.embedded === false ? p.descriptor?.extents ?? [] : []) {
      const f = e.file
      if (f === undefined || basename(f) !== f || !have.has(f) || have.has(f + DROPPED)) continue
      used ??= await extentsUsedIn(dir)
      // never a file that is itself a descriptor, nor one a descriptor beside it uses
      if (used.has(join(dir, f)) || (await peek(join(dir, f)))?.extentOnly !== true) continue
      out.push(join(dir, f))
    }
  }
  return out
}

/** The extent files the descriptors in `dir` use. */
async function extentsUsedIn (dir: string): Promise<Set<string>> {
  return new Set((await peekDirs([dir])).flatMap(q => (q.descriptor?.extents ?? []).map(x => resolve(dir, x.file ?? ''))))
}

/**
 * Files in `dir` that should be descriptors but cannot be read as one. A large file without a
 * header counts unless a descriptor beside it uses it as an extent: a redo log whose header was
 * destroyed looks just like a flat extent, and skipping it would make its parent the top.
 */
export async function brokenIn (dir: string): Promise<Peek[]> {
  let names: string[]
  try { names = await readdir(dir) } catch { return [] }
  const out: Peek[] = []
  const good: Peek[] = []
  let used: Set<string> | undefined
  for (const n of names.sort()) {
    if (!/\.vmdk$/i.test(n) || n.startsWith('.') || EXTENT_NAME.test(n)) continue
    const p = await peek(join(dir, n))
    if (p?.descriptor !== undefined) good.push(p)
    if (p?.error !== undefined) out.push(p)
    // (an ESX 2.x raw base has no header either: its `<name>.REDO` files use it)
    else if (p?.unless !== undefined && !names.some(m => m.startsWith(`${n}.REDO`)) && !(used ??= await extentsUsedIn(dir)).has(join(dir, n))) {
      out.push({ ...p, extentOnly: false, error: `${p.unless}, and no descriptor beside it uses it as an extent (a raw disk image? redofs import makes it a disk)` })
    }
  }
  return [...out, ...await inLoops(good)]
}

/**
 * Descriptors among `peeks` whose parent links lead back to themselves. Nothing names such a
 * file's chain as a top (each file of the loop is another's parent), so without this its disk
 * would silently be served as whatever is left: the base alone, its redo logs hidden.
 */
async function inLoops (peeks: Peek[]): Promise<Peek[]> {
  const known = new Map<string, Peek | undefined>()
  for (const p of peeks) known.set(await realOrResolved(p.path), p)
  const out: Peek[] = []
  const ends = new Set<string>() // files whose chain ends (at a base or a missing parent)
  for (const p of peeks) {
    const start = await realOrResolved(p.path)
    const seen = new Set([start])
    const names = [basename(p.path)]
    let cur: Peek | undefined = p
    for (;;) {
      if (cur?.parent === undefined) { for (const s of seen) ends.add(s); break }
      const r = await realOrResolved(cur.parent)
      if (r === start) { out.push({ ...p, error: `${p.path}: parent loop: ${[...names, basename(p.path)].join(' -> ')}` }); break }
      if (ends.has(r)) { for (const s of seen) ends.add(s); break }
      if (seen.has(r) || seen.size > 256) break // a loop further down, which its own files report
      seen.add(r)
      if (!known.has(r)) known.set(r, await peek(r))
      cur = known.get(r)
      if (cur !== undefined) names.push(basename(cur.path))
    }
  }
  return out
}
