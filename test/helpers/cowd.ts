/**
 * Builders for ESX-style disks that qemu cannot create (VMDK.md §4, §7.2): a COWD (vmfsSparse)
 * delta extent with its stand-alone descriptor, and a `vmfs` flat base.
 */
import { randomInt } from 'node:crypto'
import { open, writeFile } from 'node:fs/promises'
import path from 'node:path'

const SECTOR = 512
const GTES_PER_GT = 4096
const GT_SECTORS = (GTES_PER_GT * 4) / SECTOR // 32

export interface SectorWrite {
  /** First sector (grain-aligned). */
  sector: number
  /** Length a multiple of grain*512 bytes. */
  data: Buffer
}

const ceilDiv = (a: number, b: number): number => Math.floor((a + b - 1) / b)

/**
 * Port of VMDK.md §7.2 make_cowd: header (2048 bytes), GD at `gdOff`, one 32-sector GT per
 * touched 4096-grain range allocated on demand, data grains in write order, file truncated at
 * freeSector. Later writes to an already written grain get a new grain (last one wins), as in
 * the Python helper.
 */
export async function makeCowd (file: string, numSectors: number, writes: SectorWrite[], grain = 1, gdOff = 4): Promise<void> {
  const grainBytes = grain * SECTOR
  const cover = GTES_PER_GT * grain
  const ngd = ceilDiv(numSectors, cover)
  let free = gdOff + ceilDiv(ngd * 4, SECTOR)
  const gd = new Array<number>(ngd).fill(0)
  const gts = new Map<number, Uint32Array>()
  const data: Array<{ sector: number, buf: Buffer }> = []
  for (const w of writes) {
    if (w.sector % grain !== 0 || w.data.length % grainBytes !== 0) throw new Error('makeCowd: writes must be grain-aligned')
    for (let k = 0; k < w.data.length / grainBytes; k++) {
      const s = w.sector + k * grain
      if (s >= numSectors) throw new Error(`makeCowd: sector ${s} past capacity`)
      const gi = Math.floor(s / cover)
      const ti = Math.floor((s % cover) / grain)
      if (gd[gi] === 0) {
        gd[gi] = free
        gts.set(gi, new Uint32Array(GTES_PER_GT))
        free += GT_SECTORS
      }
      ;(gts.get(gi) as Uint32Array)[ti] = free
      data.push({ sector: free, buf: w.data.subarray(k * grainBytes, (k + 1) * grainBytes) })
      free += grain
    }
  }
  const hdr = Buffer.alloc(2048)
  hdr.write('COWD', 0, 'latin1')
  hdr.writeUInt32LE(1, 4) // version
  hdr.writeUInt32LE(3, 8) // flags
  hdr.writeUInt32LE(numSectors, 12)
  hdr.writeUInt32LE(grain, 16)
  hdr.writeUInt32LE(gdOff, 20)
  hdr.writeUInt32LE(ngd, 24)
  hdr.writeUInt32LE(free, 28)
  const fh = await open(file, 'w')
  try {
    await fh.write(hdr, 0, hdr.length, 0)
    const gdBuf = Buffer.alloc(ngd * 4)
    gd.forEach((v, i) => gdBuf.writeUInt32LE(v, i * 4))
    await fh.write(gdBuf, 0, gdBuf.length, gdOff * SECTOR)
    for (const [gi, t] of gts) {
      const b = Buffer.from(t.buffer, t.byteOffset, t.byteLength)
      await fh.write(b, 0, b.length, gd[gi] * SECTOR)
    }
    for (const d of data) await fh.write(d.buf, 0, d.buf.length, d.sector * SECTOR)
    await fh.truncate(free * SECTOR)
  } finally {
    await fh.close()
  }
}

/** A random CID that is neither ffffffff nor fffffffe. */
export function randomCid (): number {
  return randomInt(1, 0xfffffffe)
}

function hex8 (cid: number): string {
  return cid.toString(16).padStart(8, '0')
}

export interface VmfsBase {
  descriptor: string
  flat: string
  cid: number
}

/**
 * Write a `vmfs` base: `<name>.vmdk` (descriptor, `RW n VMFS "<name>-flat.vmdk"`) and
 * `<name>-flat.vmdk` (raw, `sectors*512` bytes, sparse, with `content` at offset 0 if given).
 */
export async function writeVmfsBase (dir: string, name: string, sectors: number, content?: Buffer): Promise<VmfsBase> {
  const cid = randomCid()
  const flat = path.join(dir, `${name}-flat.vmdk`)
  const fh = await open(flat, 'w')
  try {
    if (content) await fh.write(content, 0, content.length, 0)
    await fh.truncate(sectors * SECTOR)
  } finally {
    await fh.close()
  }
  const descriptor = path.join(dir, `${name}.vmdk`)
  await writeFile(descriptor, [
    '# Disk DescriptorFile',
    'version=1',
    'encoding="UTF-8"',
    `CID=${hex8(cid)}`,
    'parentCID=ffffffff',
    'isNativeSnapshot="no"',
    'createType="vmfs"',
    '',
    '# Extent description',
    `RW ${sectors} VMFS "${name}-flat.vmdk"`,
    '',
    '# The Disk Data Base',
    '#DDB',
    '',
    'ddb.adapterType = "lsilogic"',
    `ddb.geometry.cylinders = "${Math.max(1, Math.floor(sectors / (255 * 63)))}"`,
    'ddb.geometry.heads = "255"',
    'ddb.geometry.sectors = "63"',
    `ddb.longContentID = "0123456789abcdef01234567${hex8(cid)}"`,
    'ddb.virtualHWVersion = "7"',
    ''
  ].join('\n'))
  return { descriptor, flat, cid }
}

export interface VmfsSparseChild {
  descriptor: string
  delta: string
  cid: number
}

/**
 * Write an ESXi-style snapshot: `<name>.vmdk` (createType vmfsSparse, `RW n VMFSSPARSE
 * "<name>-delta.vmdk"`, parentCID, parentFileNameHint) and the COWD `<name>-delta.vmdk`.
 */
export async function writeVmfsSparseChild (dir: string, name: string, sectors: number, parentCID: number,
  parentHint: string, writes: SectorWrite[]): Promise<VmfsSparseChild> {
  const cid = randomCid()
  const delta = path.join(dir, `${name}-delta.vmdk`)
  await makeCowd(delta, sectors, writes)
  const descriptor = path.join(dir, `${name}.vmdk`)
  await writeDeltaDescriptor(descriptor, { cid, parentCID, parentHint, createType: 'vmfsSparse', sectors, extentType: 'VMFSSPARSE', extent: `${name}-delta.vmdk` })
  return { descriptor, delta, cid }
}

/** The stand-alone descriptor ESXi writes for a snapshot (delta) disk over one extent file. */
export async function writeDeltaDescriptor (file: string, d: { cid: number, parentCID: number, parentHint: string, createType: string, sectors: number, extentType: string, extent: string }): Promise<void> {
  await writeFile(file, [
    '# Disk DescriptorFile',
    'version=1',
    'encoding="UTF-8"',
    `CID=${hex8(d.cid)}`,
    `parentCID=${hex8(d.parentCID)}`,
    'isNativeSnapshot="no"',
    `createType="${d.createType}"`,
    `parentFileNameHint="${d.parentHint}"`,
    '# Extent description',
    `RW ${d.sectors} ${d.extentType} "${d.extent}"`,
    '',
    '# The Disk Data Base',
    '#DDB',
    '',
    `ddb.longContentID = "89abcdef0123456789abcdef${hex8(d.cid)}"`,
    ''
  ].join('\n'))
}
