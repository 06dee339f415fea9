/** Creating new layers: hosted sparse (monolithic or split), monolithicFlat, and raw imports. */
import { link, open, rename, stat, unlink } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { RedoError } from '../errors'
import { SECTOR, ceilDiv } from '../units'
import { Descriptor, defaultDdb, newCid, type ExtentLine } from './descriptor'
import { realOrResolved, syncDir, writeFileDurable } from './extent'
import { createSparseFile, descriptorIntentPath } from './sparse'
import { createCowdFile } from './cowd'

/** VMware splits at 2047 MiB (VMDK.md §2.4). */
export const SPLIT_SECTORS = 4192256
const MONOLITHIC_MAX_SECTORS = 2 ** 32

export interface ParentLink {
  hint: string
  cid: number
}

/** Names a descriptor cannot hold: its values are quoted with no escapes, one per line. */
const UNQUOTABLE = /["\x00-\x1f]/

async function refuseExisting (path: string): Promise<void> {
  // a new layer's name goes into descriptors (its extents, its children's parent hints)
  if (UNQUOTABLE.test(basename(path))) throw new RedoError('EINVAL', `${path}: a name with '"' or a control character cannot be written in a VMDK descriptor`, path)
  try {
    await stat(path)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return
    throw e
  }
  throw new RedoError('EEXIST', `${path}: already exists`, path)
}

function sectorsOf (bytes: number, path: string): number {
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new RedoError('EINVAL', `${path}: bad capacity ${bytes}`, path)
  return ceilDiv(bytes, SECTOR)
}

/**
 * A new empty hosted sparse layer (a redo log when `parent` is given). Up to 2 TiB it is one
 * monolithicSparse file built under a temporary name and renamed into place; beyond, a
 * twoGbMaxExtentSparse set whose descriptor is written last.
 */
export async function createSparseLayer (path: string, capacity: number, parent?: ParentLink): Promise<void> {
  const sectors = sectorsOf(capacity, path)
  await refuseExisting(path)
  const cid = newCid()
  const name = basename(path)
  if (sectors <= MONOLITHIC_MAX_SECTORS) {
    const desc = Descriptor.create({
      createType: 'monolithicSparse', cid, parentCID: parent?.cid, parentFileNameHint: parent?.hint,
      extents: [{ access: 'RW', sectors, type: 'SPARSE', file: name }], ddb: defaultDdb(sectors, cid)
    })
    const tmp = join(dirname(path), `.${name}.redofs-new`)
    await unlink(tmp).catch(() => {})
    try {
      await createSparseFile(tmp, sectors, desc.toString())
      // an intent file a deleted file of this name left behind would be stale (sparse.ts)
      await unlink(descriptorIntentPath(path)).catch(() => {})
      await rename(tmp, path)
    } catch (e) {
      await unlink(tmp).catch(() => {})
      throw e
    }
    await syncDir(dirname(path))
    return
  }
  const stem = name.replace(/\.vmdk$/i, '')
  const extents: ExtentLine[] = []
  const made: string[] = []
  try {
    for (let i = 0, left = sectors; left > 0; i++) {
      const n = Math.min(SPLIT_SECTORS, left)
      const file = `${stem}-s${String(i + 1).padStart(3, '0')}.vmdk`
      const p = join(dirname(path), file)
      await refuseExisting(p)
      await createSparseFile(p, n)
      made.push(p)
      extents.push({ access: 'RW', sectors: n, type: 'SPARSE', file })
      left -= n
    }
    const desc = Descriptor.create({ createType: 'twoGbMaxExtentSparse', cid, parentCID: parent?.cid, parentFileNameHint: parent?.hint, extents, ddb: defaultDdb(sectors, cid) })
    await syncDir(dirname(path))
    await writeFileDurable(path, desc.toString())
  } catch (e) {
    for (const p of made) await unlink(p).catch(() => {})
    throw e
  }
}

/** A monolithicFlat base: `<disk>-flat.vmdk` (sparse on the host filesystem) and its descriptor. */
export async function createFlatLayer (path: string, capacity: number): Promise<void> {
  const sectors = sectorsOf(capacity, path)
  await refuseExisting(path)
  const flatName = basename(path).replace(/\.vmdk$/i, '') + '-flat.vmdk'
  const flat = join(dirname(path), flatName)
  await refuseExisting(flat)
  const fh = await open(flat, 'wx')
  try {
    await fh.truncate(sectors * SECTOR)
    await fh.sync()
  } finally {
    await fh.close()
  }
  const cid = newCid()
  const desc = Descriptor.create({ createType: 'monolithicFlat', cid, extents: [{ access: 'RW', sectors, type: 'FLAT', file: flatName, offset: 0 }], ddb: defaultDdb(sectors, cid) })
  try {
    await writeFileDurable(path, desc.toString())
  } catch (e) {
    await unlink(flat).catch(() => {})
    throw e
  }
}

/**
 * Import a raw image without copying: the raw file is referenced from a new monolithicFlat
 * descriptor. A raw file outside the VM directory is hard-linked into it as `<disk>-flat.vmdk`
 * (extents must stay inside the store). Its size must be a whole number of sectors.
 */
export async function importRaw (raw: string, path: string): Promise<void> {
  const st = await stat(raw).catch(() => { throw new RedoError('ENOENT', `${raw}: no such file`, raw) })
  if (!st.isFile()) throw new RedoError('EINVAL', `${raw}: not a regular file`, raw)
  if (st.size === 0 || st.size % SECTOR !== 0) throw new RedoError('EINVAL', `${raw}: size ${st.size} is not a positive multiple of 512 bytes`, raw)
  await refuseExisting(path)
  const dir = dirname(path)
  let file = basename(raw)
  // outside the VM directory, or under a name no descriptor can hold: linked in as <disk>-flat
  if (dirname(await realOrResolved(raw)) !== await realOrResolved(dir) || UNQUOTABLE.test(file)) {
    file = basename(path).replace(/\.vmdk$/i, '') + '-flat.vmdk'
    const target = join(dir, file)
    await refuseExisting(target)
    try {
      await link(raw, target)
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code
      if (code === 'EXDEV') throw new RedoError('EXDEV', `${raw}: on another filesystem than ${dir}; move it into the VM directory first (import copies nothing)`, raw)
      throw e
    }
  }
  const sectors = st.size / SECTOR
  const cid = newCid()
  const desc = Descriptor.create({ createType: 'monolithicFlat', cid, extents: [{ access: 'RW', sectors, type: 'FLAT', file, offset: 0 }], ddb: defaultDdb(sectors, cid) })
  await writeFileDurable(path, desc.toString())
}

/**
 * A new empty ESX-style redo log: a vmfsSparse descriptor `<name>.vmdk` and its COWD extent
 * `<name>-delta.vmdk`, extent first, descriptor last (VMDK.md §4, §9.1 rule 7).
 */
export async function createCowdLayer (path: string, capacity: number, parent: ParentLink): Promise<void> {
  const sectors = sectorsOf(capacity, path)
  if (sectors > 0xffffffff) throw new RedoError('EINVAL', `${path}: vmfsSparse redo logs are limited to 2 TiB`, path)
  await refuseExisting(path)
  const deltaName = basename(path).replace(/\.vmdk$/i, '') + '-delta.vmdk'
  const delta = join(dirname(path), deltaName)
  await refuseExisting(delta)
  await createCowdFile(delta, sectors)
  const cid = newCid()
  const desc = Descriptor.create({
    createType: 'vmfsSparse', cid, parentCID: parent.cid, parentFileNameHint: parent.hint,
    extents: [{ access: 'RW', sectors, type: 'VMFSSPARSE', file: deltaName }],
    ddb: { 'ddb.longContentID': defaultDdb(sectors, cid)['ddb.longContentID'] }
  })
  try {
    await syncDir(dirname(path))
    await writeFileDurable(path, desc.toString())
  } catch (e) {
    await unlink(delta).catch(() => {})
    throw e
  }
}
