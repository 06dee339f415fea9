/**
 * Builder for SEsparse delta disks (VMDK.md §5), which neither qemu nor any tool here creates:
 * a `<name>-sesparse.vmdk` extent laid out the way ESXi lays it out (headers, journal, grain
 * directory, preallocated grain tables, free bitmap, back-map, grains) and its stand-alone
 * `seSparse` descriptor. qemu reads the result (read-only), so it is the oracle for both.
 */
import { open } from 'node:fs/promises'
import path from 'node:path'
import { randomCid, writeDeltaDescriptor } from './cowd'

const SECTOR = 512
const GRAIN = 4096
const PER_GT = 4096
const GT_SECTORS = 64

export type SeGrain =
  | { grain: number, data: Buffer }
  | { grain: number, zero: true }
  | { grain: number, unmapped: true }

export interface SeSparseOptions {
  /** Grain slot of the first data grain (≥ 4096 puts bits in both halves of the entry's index). */
  firstSlot?: number
  /** Set the volatile header's replay_journal flag (a snapshot not closed cleanly). */
  dirty?: boolean
  /** Raw u64 grain table entries to store as they are (for damage tests), by grain number. */
  rawEntries?: Map<number, bigint>
}

export interface SeSparseDisk {
  descriptor: string
  extent: string
  cid: number
}

const ceilDiv = (a: number, b: number): number => Math.floor((a + b - 1) / b)

/** Write `<dir>/<name>.vmdk` (descriptor) and `<dir>/<name>-sesparse.vmdk` (extent). */
export async function makeSeSparse (dir: string, name: string, parent: { hint: string, cid: number }, sectors: number, grains: SeGrain[], opts: SeSparseOptions = {}): Promise<SeSparseDisk> {
  const numGTs = ceilDiv(sectors, PER_GT * GRAIN / SECTOR)
  const gdSectors = Math.max(1, ceilDiv(numGTs * 8, SECTOR))
  // sectors: const header 0, volatile header 1, journal header 2, journal 3..2050
  const journalOffset = 3
  const journalSize = 2048
  const gdOffset = journalOffset + journalSize
  const gtOffset = gdOffset + gdSectors
  const gtSize = numGTs * GT_SECTORS
  const bitmapOffset = gtOffset + gtSize
  const bitmapSize = 8
  const backmapOffset = bitmapOffset + bitmapSize
  const backmapSize = 64
  const grainsOffset = Math.ceil((backmapOffset + backmapSize) / 8) * 8
  let slot = opts.firstSlot ?? 4100
  const grainsSize = (slot + grains.length + 1) * 8

  const h = Buffer.alloc(SECTOR)
  h.writeBigUInt64LE(0xcafebaben, 0)
  h.writeBigUInt64LE(0x0000000200000001n, 8)
  h.writeBigUInt64LE(BigInt(sectors), 16)
  h.writeBigUInt64LE(8n, 24)
  h.writeBigUInt64LE(BigInt(GT_SECTORS), 32)
  const fields = [1, 1, 2, 1, journalOffset, journalSize, gdOffset, gdSectors, gtOffset, gtSize, bitmapOffset, bitmapSize, backmapOffset, backmapSize, grainsOffset, grainsSize]
  fields.forEach((v, i) => h.writeBigUInt64LE(BigInt(v), 80 + i * 8))
  const vh = Buffer.alloc(SECTOR)
  vh.writeBigUInt64LE(0xcafecafen, 0)
  vh.writeBigUInt64LE(1n, 16) // next_txn_seq_number
  vh.writeBigUInt64LE(opts.dirty === true ? 1n : 0n, 24)

  const gd = Buffer.alloc(gdSectors * SECTOR)
  const tables = new Map<number, Buffer>()
  let nextTable = 0
  const entry = (grain: number, value: bigint): void => {
    const i = Math.floor(grain / PER_GT)
    let t = tables.get(i)
    if (t === undefined) {
      t = Buffer.alloc(GT_SECTORS * SECTOR)
      tables.set(i, t)
      gd.writeBigUInt64LE(0x1000000000000000n | BigInt(nextTable++), i * 8)
    }
    t.writeBigUInt64LE(value, (grain % PER_GT) * 8)
  }
  const data: Array<{ at: number, buf: Buffer }> = []
  for (const g of grains) {
    if ('data' in g) {
      if (g.data.length !== GRAIN) throw new Error('makeSeSparse: data grains are 4096 bytes')
      const index = BigInt(slot)
      entry(g.grain, 0x3000000000000000n | ((index & 0xfffn) << 48n) | (index >> 12n))
      data.push({ at: (grainsOffset + slot * 8) * SECTOR, buf: g.data })
      slot++
    } else {
      entry(g.grain, 'zero' in g ? 0x2000000000000000n : 0x1000000000000000n)
    }
  }
  for (const [grain, v] of opts.rawEntries ?? []) entry(grain, v)

  const extent = path.join(dir, `${name}-sesparse.vmdk`)
  const fh = await open(extent, 'w')
  try {
    await fh.write(h, 0, SECTOR, 0)
    await fh.write(vh, 0, SECTOR, SECTOR)
    await fh.write(gd, 0, gd.length, gdOffset * SECTOR)
    // tables are numbered in the order they were first used, and stored by that number
    for (const [i, t] of tables) await fh.write(t, 0, t.length, (gtOffset + Number(gd.readBigUInt64LE(i * 8) & 0xffffffffn) * GT_SECTORS) * SECTOR)
    for (const d of data) await fh.write(d.buf, 0, d.buf.length, d.at)
    await fh.truncate((grainsOffset + grainsSize) * SECTOR)
  } finally {
    await fh.close()
  }
  const cid = randomCid()
  const descriptor = path.join(dir, `${name}.vmdk`)
  await writeDeltaDescriptor(descriptor, { cid, parentCID: parent.cid, parentHint: parent.hint, createType: 'seSparse', sectors, extentType: 'SESPARSE', extent: path.basename(extent) })
  return { descriptor, extent, cid }
}
