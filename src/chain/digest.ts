/**
 * Content records of frozen generations, for `redofs relink`: one hash per 1 MiB block of the
 * generation, kept beside its top layer as `<layer>.redofs-digest`, written when addredo is
 * asked to (`record=1`: it reads every allocated byte of the generation, so it is not the
 * default). Unallocated blocks are not read (they hash as zeros). A record follows its content: a commit moves the merged child's
 * record to the parent, a layer that becomes live loses its record.
 */
import { createHash } from 'node:crypto'
import { rename, unlink } from 'node:fs/promises'
import { RedoError } from '../errors'
import { delayPoint } from '../fault'
import { readIfExists, writeFileDurable } from '../formats/extent'
import type { Chain } from './chain'

export const DIGEST_BLOCK = 1 << 20
const HASH_BYTES = 16
const MAGIC = 'redofs-digest-1'

export const digestPath = (layerPath: string): string => `${layerPath}.redofs-digest`

export interface Digest {
  capacity: number
  block: number
  hashes: Buffer
}

function hash (b: Buffer): Buffer {
  return createHash('sha256').update(b).digest().subarray(0, HASH_BYTES)
}

/** The hash of an all-zero block, computed on first use (~10 ms a command's start need not pay). */
let zeroHash: Buffer | undefined
const zeroBlockHash = (): Buffer => (zeroHash ??= hash(Buffer.alloc(DIGEST_BLOCK)))

/** Hash every block of generation g; blocks nothing provides are not read. */
export async function computeDigest (chain: Chain, g: number, cancelled?: () => boolean): Promise<Digest | undefined> {
  const size = chain.size
  const blocks = Math.ceil(size / DIGEST_BLOCK)
  const hashes = Buffer.alloc(blocks * HASH_BYTES)
  const map = chain.map(g)
  const holds = new Uint8Array(blocks)
  for (const e of map) {
    if (e.generation < 0) continue
    for (let b = Math.floor(e.start / DIGEST_BLOCK); b * DIGEST_BLOCK < e.start + e.length; b++) holds[b] = 1
  }
  const buf = Buffer.alloc(DIGEST_BLOCK)
  for (let b = 0; b < blocks; b++) {
    if (cancelled?.() === true) return undefined
    const len = Math.min(DIGEST_BLOCK, size - b * DIGEST_BLOCK)
    let h: Buffer
    if (holds[b] === 0 && len === DIGEST_BLOCK) h = zeroBlockHash()
    else {
      await chain.read(g, buf, 0, b * DIGEST_BLOCK, len)
      h = hash(buf.subarray(0, len))
    }
    h.copy(hashes, b * HASH_BYTES)
  }
  return { capacity: size, block: DIGEST_BLOCK, hashes }
}

export async function saveDigest (layerPath: string, d: Digest): Promise<void> {
  const head = Buffer.from(`${MAGIC} ${d.capacity} ${d.block}\n`)
  await writeFileDurable(digestPath(layerPath), Buffer.concat([head, d.hashes]))
}

export async function loadDigest (layerPath: string): Promise<Digest | undefined> {
  const raw = await readIfExists(digestPath(layerPath))
  if (raw === undefined) return undefined
  const nl = raw.indexOf(10)
  const m = nl > 0 ? new RegExp(`^${MAGIC} (\\d+) (\\d+)$`).exec(raw.subarray(0, nl).toString('latin1')) : null
  if (m === null) throw new RedoError('EINVAL', `${digestPath(layerPath)}: not a redofs content record`, digestPath(layerPath))
  const d = { capacity: Number(m[1]), block: Number(m[2]), hashes: raw.subarray(nl + 1) }
  if (d.hashes.length !== Math.ceil(d.capacity / d.block) * HASH_BYTES) throw new RedoError('EINVAL', `${digestPath(layerPath)}: truncated content record`, digestPath(layerPath))
  return d
}

/** Delete the record of a layer; true when there was one. */
export async function dropDigest (layerPath: string): Promise<boolean> {
  return await unlink(digestPath(layerPath)).then(() => true, e => { if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e; return false })
}

/**
 * The record of `from` now describes `to` (after a commit merged from into to). The commit
 * dropped `to`'s own record before it started (and a roll-forward may find the move done), so
 * without a record of `from` there is nothing to do.
 */
export async function moveDigest (from: string, to: string): Promise<void> {
  try {
    await rename(digestPath(from), digestPath(to))
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e
  }
}

/** Record generation g of the chain (the content of layer g as the top). */
export async function recordGeneration (chain: Chain, g: number, cancelled?: () => boolean): Promise<boolean> {
  await delayPoint('record')
  const layer = chain.layers[g].path
  const d = await computeDigest(chain, g, cancelled)
  if (d === undefined || cancelled?.() === true) return false
  await saveDigest(layer, d)
  return true
}

/** Blocks where `d` and the content read by `read` differ, skipping blocks `covered` says to. */
export async function differences (d: Digest, read: (buf: Buffer, pos: number, len: number) => Promise<void>, covered: (pos: number, len: number) => boolean, limit = 20): Promise<number[]> {
  const out: number[] = []
  const buf = Buffer.alloc(d.block)
  const blocks = Math.ceil(d.capacity / d.block)
  for (let b = 0; b < blocks && out.length < limit; b++) {
    const pos = b * d.block
    const len = Math.min(d.block, d.capacity - pos)
    if (covered(pos, len)) continue
    await read(buf, pos, len)
    if (!hash(buf.subarray(0, len)).equals(d.hashes.subarray(b * HASH_BYTES, (b + 1) * HASH_BYTES))) out.push(pos)
  }
  return out
}
