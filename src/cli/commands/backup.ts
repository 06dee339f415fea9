import type { Argv } from 'yargs'
import { mkdir, open, readFile, rename, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { RedoError } from '../../errors'
import { writeExact } from '../../formats/extent'
import type { MapEntry } from '../../chain/view'
import { action, progressBar } from '../common'

export const command = 'backup <mnt> <disk> <dest>'
export const describe = 'hot backup of a mounted disk (<vm>/<disk>) into <dest>: full the first time, then only what changed'
export const builder = (y: Argv): Argv => y
  .positional('mnt', { type: 'string', describe: 'redofs mountpoint' })
  .positional('disk', { type: 'string', describe: '<vm>/<disk>' })
  .positional('dest', { type: 'string', describe: 'backup directory (manifest.json and the copies)' })

export interface BackupEntry {
  seq: number
  label: string
  kind: 'full' | 'incr'
  data: string
  /** incremental: the extents it holds (zero extents are zeros to write) */
  extents?: string
  since?: string
  time: string
  bytes: number
}

export interface Manifest {
  disk: string
  capacity: number
  backups: BackupEntry[]
}

interface GenStatus { generation: number, label: string | null, live: boolean }
interface DiskStatus { capacity: number, redoLogs: number, generations: GenStatus[] }

const CHUNK = 1 << 20
const ZERO = Buffer.alloc(CHUNK)

async function ctl (dir: string, file: string, text: string): Promise<void> {
  try {
    await writeFile(join(dir, file), text + '\n')
  } catch (e) {
    const why = await readFile(join(dir, 'error'), 'utf8').catch(() => '')
    throw new RedoError('EIO', `${file} ${text}: ${why.trim() !== '' ? why.trim() : (e as Error).message}`)
  }
}

async function status (dir: string): Promise<DiskStatus> {
  return JSON.parse(await readFile(join(dir, 'status'), 'utf8')) as DiskStatus
}

export async function readManifest (dest: string): Promise<Manifest | undefined> {
  const file = join(dest, 'manifest.json')
  let m: Manifest
  try {
    m = JSON.parse(await readFile(file, 'utf8')) as Manifest
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw new RedoError('EINVAL', `${file}: unreadable (${(e as Error).message})`, file)
  }
  // a file name must stay inside the backup directory
  const name = (x: unknown): boolean => typeof x === 'string' && x !== '' && !x.includes('/') && !x.startsWith('.')
  const bad = typeof m !== 'object' || m === null ? 'not an object'
    : !(Number.isSafeInteger(m.capacity) && m.capacity > 0) ? 'no valid capacity'
      : !Array.isArray(m.backups) ? 'no backups list'
        : m.backups.findIndex(b => typeof b !== 'object' || b === null || typeof b.label !== 'string' || (b.kind !== 'full' && b.kind !== 'incr') ||
          !name(b.data) || (b.kind === 'incr' && !name(b.extents))) >= 0 ? 'a backup entry lacks its label, kind or file names' : undefined
  if (bad !== undefined) throw new RedoError('EINVAL', `${file}: not a redofs backup manifest (${bad})`, file)
  return m
}

/** Copy `extents` of `src` into a sparse file of `size` bytes; returns the bytes of data copied. */
async function copyExtents (src: string, out: string, size: number, extents: MapEntry[], label: string): Promise<number> {
  const total = extents.reduce((s, e) => s + (e.data ? e.length : 0), 0)
  const bar = progressBar(label)
  const i = await open(src, 'r')
  const o = await open(out, 'w')
  const buf = Buffer.alloc(CHUNK)
  let done = 0
  try {
    for (const e of extents) {
      if (!e.data) continue
      for (let p = e.start; p < e.start + e.length; p += CHUNK) {
        const n = Math.min(CHUNK, e.start + e.length - p)
        const { bytesRead } = await i.read(buf, 0, n, p)
        if (bytesRead !== n) throw new RedoError('EIO', `${src}: short read at ${p}`)
        if (!buf.subarray(0, n).equals(ZERO.subarray(0, n))) await writeExact(o, buf, 0, n, p)
        done += n
        bar.update(done, total)
      }
    }
    await o.truncate(size)
    await o.sync()
  } finally {
    bar.end()
    await i.close()
    await o.close()
  }
  return done
}

export const handler = action(async (a: { mnt: string, disk: string, dest: string }) => {
  const [vm, disk] = a.disk.split('/')
  if (vm === undefined || disk === undefined || vm === '' || disk === '') throw new RedoError('EINVAL', `${a.disk}: expected <vm>/<disk>`)
  const mnt = resolve(a.mnt)
  const dest = resolve(a.dest)
  const cdir = join(mnt, '.ctl', vm, disk)
  await mkdir(dest, { recursive: true })
  const manifest: Manifest = await readManifest(dest) ?? { disk: a.disk, capacity: 0, backups: [] }
  if (manifest.backups.length > 0 && manifest.disk !== a.disk) throw new RedoError('EINVAL', `${dest} holds backups of ${manifest.disk}, not ${a.disk}`)
  const seq = (manifest.backups[manifest.backups.length - 1]?.seq ?? 0) + 1
  const label = `backup-${String(seq).padStart(4, '0')}`
  const prev = manifest.backups[manifest.backups.length - 1]?.label

  // 1. freeze the live generation under a new label
  await ctl(cdir, 'addredo', `label=${label}`)
  let st = await status(cdir)
  const F = st.generations.find(g => g.label === label)?.generation
  if (F === undefined) throw new RedoError('EIO', `${a.disk}: the new generation did not get its label`)
  const since = prev !== undefined ? st.generations.find(g => g.label === prev)?.generation : undefined

  // 2. copy it: everything, or what generations above the last backup hold
  const map = JSON.parse(await readFile(join(cdir, `map@${F}`), 'utf8')) as MapEntry[]
  const image = join(mnt, vm, `${disk}@${F}.img`)
  const entry: BackupEntry = { seq, label, kind: 'full', data: '', time: new Date().toISOString(), bytes: 0 }
  if (since === undefined) {
    entry.data = `${String(seq).padStart(4, '0')}-full.raw`
    entry.bytes = await copyExtents(image, join(dest, entry.data), st.capacity, map.filter(e => e.data), 'backup (full)')
  } else {
    const changed = map.filter(e => e.generation > since)
    entry.kind = 'incr'
    entry.since = prev
    entry.data = `${String(seq).padStart(4, '0')}-incr.raw`
    entry.extents = `${String(seq).padStart(4, '0')}-incr.json`
    entry.bytes = await copyExtents(image, join(dest, entry.data), st.capacity, changed, 'backup (incremental)')
    await writeFile(join(dest, entry.extents), JSON.stringify(changed.map(e => ({ start: e.start, length: e.length, zero: !e.data }))) + '\n')
  }
  manifest.capacity = st.capacity
  manifest.backups.push(entry)
  await writeFile(join(dest, 'manifest.json.tmp'), JSON.stringify(manifest, null, 2) + '\n')
  await rename(join(dest, 'manifest.json.tmp'), join(dest, 'manifest.json'))

  // 3. the two-redo merge: fold the generations since the last backup into its layer without
  // freezing, then the small redo of the copy period with a brief freeze. The chain ends as
  // <backup point, labelled> <- live.
  if (since !== undefined) {
    await ctl(cdir, 'addredo', '')
    st = await status(cdir)
    // merge every layer above `since` up to F into `since`: its label moves up with the content
    for (let g = F; g > since; g--) {
      st = await status(cdir)
      await ctl(cdir, 'commit', `level=${st.redoLogs - (since + 1)} freeze=0`)
    }
    await ctl(cdir, 'commit', 'level=0')
  }
  process.stdout.write(`${label}: ${entry.kind} backup of ${a.disk} in ${join(dest, entry.data)} (${entry.bytes} bytes)\n`)
})
