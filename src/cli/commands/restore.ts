import type { Argv } from 'yargs'
import { existsSync } from 'node:fs'
import { mkdir, open, readdir, readFile, rename, rm, stat } from 'node:fs/promises'
import { basename, dirname, join, resolve } from 'node:path'
import { Chain } from '../../chain/chain'
import { RedoError } from '../../errors'
import { createSparseLayer } from '../../formats/create'
import { readExact, syncDir } from '../../formats/extent'
import { action, progressBar } from '../common'
import { RawOutput } from '../rawout'
import { readManifest } from './backup'

export const command = 'restore <dest> <target>'
export const describe = 'rebuild the disk at the last backup from a backup directory into a raw file or a new .vmdk'
export const builder = (y: Argv): Argv => y
  .positional('dest', { type: 'string', describe: 'backup directory written by redofs backup' })
  .positional('target', { type: 'string', describe: 'raw file, or a .vmdk to create (monolithicSparse)' })

const CHUNK = 1 << 20

interface Sink {
  write: (buf: Buffer, len: number, pos: number) => Promise<void>
  /** Holes must be written (zeros) too. */
  dense: boolean
  /** Complete: make it durable and put it under the target's name. */
  finish: () => Promise<void>
  /** Failed: leave the target as it was. */
  abort: () => Promise<void>
}

/**
 * A new .vmdk is built in a hidden directory beside the target, under the target's own name
 * (a monolithicSparse file names itself inside), and moved out once complete, extents first:
 * a failed or killed restore leaves no disk that looks whole.
 */
async function openVmdkSink (target: string, size: number): Promise<Sink> {
  if (await stat(target).then(() => true, () => false)) throw new RedoError('EEXIST', `${target}: already exists`, target)
  const dir = dirname(target)
  const stage = join(dir, `.${basename(target)}.redofs-restore`)
  await mkdir(dir, { recursive: true })
  await rm(stage, { recursive: true, force: true }) // left by a killed restore
  await mkdir(stage)
  const drop = async (): Promise<void> => { await rm(stage, { recursive: true, force: true }) }
  let chain: Chain
  try {
    await createSparseLayer(join(stage, basename(target)), size)
    chain = await Chain.open(join(stage, basename(target)), { writable: true })
  } catch (e) {
    await drop()
    throw e
  }
  return {
    write: async (b, n, p) => await chain.write(b, 0, p, n),
    dense: false,
    finish: async () => {
      try {
        await chain.close()
        const files = (await readdir(stage)).sort((x, y) => Number(x === basename(target)) - Number(y === basename(target)))
        const taken = files.find(f => existsSync(join(dir, f)))
        if (taken !== undefined) throw new RedoError('EEXIST', `${join(dir, taken)}: already exists`, join(dir, taken))
        for (const f of files) await rename(join(stage, f), join(dir, f))
        await syncDir(dir)
      } finally {
        await drop()
      }
    },
    abort: async () => { await chain.close().catch(() => {}); await drop() }
  }
}

async function openSink (target: string, size: number, reading: string[]): Promise<Sink> {
  if (/\.vmdk$/i.test(target)) return await openVmdkSink(target, size)
  const out = await RawOutput.open(target, reading)
  return { write: async (b, n, p) => await out.write(b, 0, n, p), dense: out.dense, finish: async () => await out.finish(size), abort: async () => await out.abort() }
}

export const handler = action(async (a: { dest: string, target: string }) => {
  const dest = resolve(a.dest)
  const m = await readManifest(dest)
  if (m === undefined || m.backups.length === 0) throw new RedoError('ENOENT', `${dest}: no backups (manifest.json missing or empty)`)
  let first = -1
  for (let k = m.backups.length - 1; k >= 0; k--) if (m.backups[k].kind === 'full') { first = k; break }
  if (first < 0) throw new RedoError('EINVAL', `${dest}: no full backup to start from`)
  const reading = [join(dest, 'manifest.json'), ...m.backups.flatMap(b => [join(dest, b.data), ...(b.extents !== undefined ? [join(dest, b.extents)] : [])])]
  const sink = await openSink(resolve(a.target), m.capacity, reading)
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
              if (b.kind === 'incr' || sink.dense || !buf.subarray(0, n).equals(zero.subarray(0, n))) await sink.write(buf, n, p)
            }
            done += n
            bar.update(done, total)
          }
        }
      } finally {
        await fh.close()
      }
    }
    await sink.finish()
  } catch (e) {
    await sink.abort()
    throw e
  } finally {
    bar.end()
  }
})
