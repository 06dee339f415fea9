import type { Argv } from 'yargs'
import { mkdir, open, readFile, stat } from 'node:fs/promises'
import { dirname, join, resolve } from 'node:path'
import { Chain } from '../../chain/chain'
import { RedoError } from '../../errors'
import { createSparseLayer } from '../../formats/create'
import { readExact, writeExact } from '../../formats/extent'
import { action, progressBar } from '../common'
import { readManifest } from './backup'

export const command = 'restore <dest> <target>'
export const describe = 'rebuild the disk at the last backup from a backup directory into a raw file or a new .vmdk'
export const builder = (y: Argv): Argv => y
  .positional('dest', { type: 'string', describe: 'backup directory written by redofs backup' })
  .positional('target', { type: 'string', describe: 'raw file, or a .vmdk to create (monolithicSparse)' })

const CHUNK = 1 << 20

interface Sink {
  write: (buf: Buffer, len: number, pos: number) => Promise<void>
  close: () => Promise<void>
}

async function openSink (target: string, size: number): Promise<Sink> {
  if (/\.vmdk$/i.test(target)) {
    if (await stat(target).then(() => true, () => false)) throw new RedoError('EEXIST', `${target}: already exists`)
    await mkdir(dirname(target), { recursive: true })
    await createSparseLayer(target, size)
    const chain = await Chain.open(target, { writable: true })
    return { write: async (b, n, p) => await chain.write(b, 0, p, n), close: async () => await chain.close() }
  }
  const fh = await open(target, 'w')
  await fh.truncate(size)
  return { write: async (b, n, p) => await writeExact(fh, b, 0, n, p), close: async () => { await fh.sync(); await fh.close() } }
}

export const handler = action(async (a: { dest: string, target: string }) => {
  const dest = resolve(a.dest)
  const m = await readManifest(dest)
  if (m === undefined || m.backups.length === 0) throw new RedoError('ENOENT', `${dest}: no backups (manifest.json missing or empty)`)
  let first = -1
  for (let k = m.backups.length - 1; k >= 0; k--) if (m.backups[k].kind === 'full') { first = k; break }
  if (first < 0) throw new RedoError('EINVAL', `${dest}: no full backup to start from`)
  const sink = await openSink(resolve(a.target), m.capacity)
  const bar = progressBar('restore')
  const buf = Buffer.alloc(CHUNK)
  const zero = Buffer.alloc(CHUNK)
  try {
    for (let k = first; k < m.backups.length; k++) {
      const b = m.backups[k]
      if (k > first && b.since !== m.backups[k - 1].label) throw new RedoError('EINVAL', `${dest}: backup ${b.label} follows ${b.since ?? '?'}, not ${m.backups[k - 1].label}`)
      const data = join(dest, b.data)
      const fh = await open(data, 'r')
      try {
        const extents: Array<{ start: number, length: number, zero: boolean }> = b.kind === 'full'
          ? [{ start: 0, length: m.capacity, zero: false }]
          : JSON.parse(await readFile(join(dest, b.extents as string), 'utf8'))
        const total = extents.reduce((s, e) => s + e.length, 0)
        let done = 0
        for (const e of extents) {
          for (let p = e.start; p < e.start + e.length; p += CHUNK) {
            const n = Math.min(CHUNK, e.start + e.length - p)
            if (e.zero) await sink.write(zero, n, p)
            else {
              await readExact(fh, data, buf, 0, n, p)
              // a full backup is sparse: holes need no write on a fresh target
              if (b.kind === 'incr' || !buf.subarray(0, n).equals(zero.subarray(0, n))) await sink.write(buf, n, p)
            }
            done += n
            bar.update(done, total)
          }
        }
      } finally {
        await fh.close()
      }
    }
  } finally {
    bar.end()
    await sink.close()
  }
})
