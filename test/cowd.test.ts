/**
 * Acceptance 5: a COWD (vmfsSparse) redo log built by our own helper (VMDK.md §4, §7.2) over a
 * `vmfs` flat base reads back through `redofs export` with the content it was built with;
 * `qemu-img convert` agrees and `vmdkinfo` (libvmdk) accepts the file.
 */
import test, { type ExecutionContext } from 'ava'
import { mkdir, readFile, rm } from 'node:fs/promises'
import path from 'node:path'
import { makeCowd, writeVmfsBase, writeVmfsSparseChild, type SectorWrite } from './helpers/cowd'
import { requireEnv } from './helpers/env'
import { firstDifference, prng, randomBytes } from './helpers/model'
import { convertToRaw, createBase, describe, qemuWrite, run } from './helpers/qemu'
import { exportGen, infoJson, redofs } from './helpers/redofs'
import { tmpDirs } from './helpers/tmp'
import { cidLinkProblems, findTops, layerInfo, magicOf, writeU32 } from './helpers/vmdk'
import { openChain } from '../src/index'

requireEnv(test)
const tmp = tmpDirs(test)

const SECTOR = 512
// 17 MiB: 8.5 GTs of 2 MiB, the last one partial
const SECTORS = 17 * 2048

function sectorWrites (seed: number, specs: Array<[number, number]>): SectorWrite[] {
  const rnd = prng(seed)
  return specs.map(([sector, count]) => ({ sector, data: randomBytes(rnd, count * SECTOR) }))
}

function apply (image: Buffer, writes: SectorWrite[]): void {
  for (const w of writes) w.data.copy(image, w.sector * SECTOR)
}

const child1Writes = sectorWrites(11, [
  [0, 1], // first sector
  [4095, 3], // across the first GT boundary (4096 sectors per GT)
  [1000, 130], // more than one 64 KiB hosted grain's worth
  [SECTORS - 1, 1], // last sector, in the partial last GT
  [20000, 1],
  [1001, 2] // rewrites sectors written above: last one wins
])
const child2Writes = sectorWrites(12, [
  [1000, 1],
  [8192 + 100, 50],
  [SECTORS - 4, 2]
])

async function assertExport (t: ExecutionContext, top: string, gen: number | undefined, expected: Buffer, scratch: string): Promise<void> {
  const r = await exportGen(top, gen, scratch)
  t.is(r.code, 0, describe(r))
  if (r.code !== 0) return
  const got = await readFile(scratch)
  t.is(got.length, expected.length, 'export is exactly the capacity')
  t.is(firstDifference(got, expected), -1, `redofs export @${gen ?? 'top'} differs from the built content at byte ${firstDifference(got, expected)}`)
}

async function assertQemu (t: ExecutionContext, vmdk: string, expected: Buffer, scratch: string): Promise<void> {
  await convertToRaw(vmdk, scratch)
  const got = await readFile(scratch)
  t.is(firstDifference(got, expected), -1, `qemu-img convert of ${path.basename(vmdk)} differs from the built content`)
}

test('vmfsSparse (COWD) redo logs over a vmfs flat base: redofs export, qemu-img convert and vmdkinfo agree', async t => {
  const root = await tmp()
  const dir = path.join(root, 'store', 'vm1')
  await mkdir(dir, { recursive: true })
  const baseContent = randomBytes(prng(10), 3 * 1024 * 1024) // data in the first 3 MiB, rest a hole
  const base = await writeVmfsBase(dir, 'disk', SECTORS, baseContent)
  const c1 = await writeVmfsSparseChild(dir, 'disk-000001', SECTORS, base.cid, 'disk.vmdk', child1Writes)
  const c2 = await writeVmfsSparseChild(dir, 'disk-000002', SECTORS, c1.cid, 'disk-000001.vmdk', child2Writes)
  t.is(await magicOf(c1.delta), 'COWD')

  const gen0 = Buffer.alloc(SECTORS * SECTOR)
  baseContent.copy(gen0)
  const gen1 = Buffer.from(gen0)
  apply(gen1, child1Writes)
  const gen2 = Buffer.from(gen1)
  apply(gen2, child2Writes)

  const scratch = path.join(root, 'x.raw')
  await assertExport(t, c2.descriptor, 2, gen2, scratch)
  await assertExport(t, c2.descriptor, undefined, gen2, scratch)
  await assertExport(t, c2.descriptor, 1, gen1, scratch)
  await assertExport(t, c2.descriptor, 0, gen0, scratch)
  await assertExport(t, c1.descriptor, undefined, gen1, scratch)

  await assertQemu(t, c2.descriptor, gen2, scratch)
  await assertQemu(t, c1.descriptor, gen1, scratch)
  await assertQemu(t, base.descriptor, gen0, scratch)

  for (const f of [c1.descriptor, c2.descriptor, base.descriptor]) {
    const vi = await run('vmdkinfo', [f], { cwd: dir })
    t.is(vi.code, 0, describe(vi))
  }

  const info = await infoJson(c2.descriptor)
  t.is(info.layers.length, 3)
  const chk = await redofs(['check', c2.descriptor])
  t.is(chk.code, 0, describe(chk))
  t.regex(chk.stdout, /\bclean\b/)
})

test('a vmfsSparse (COWD) redo log over a qemu-made monolithicSparse base', async t => {
  const root = await tmp()
  const dir = path.join(root, 'store', 'vm1')
  await mkdir(dir, { recursive: true })
  await createBase('disk.vmdk', SECTORS * SECTOR, 'monolithicSparse', dir)
  await qemuWrite('disk.vmdk', [{ pattern: 0x5a, offset: 0, length: 1024 * 1024 + 333 }, { pattern: 0x5b, offset: 16 * 1024 * 1024, length: 65536 }], dir)
  const baseFile = path.join(dir, 'disk.vmdk')
  const baseCid = (await layerInfo(baseFile)).cid
  const c1 = await writeVmfsSparseChild(dir, 'disk-000001', SECTORS, baseCid, 'disk.vmdk', child1Writes)
  const expected = Buffer.alloc(SECTORS * SECTOR)
  await convertToRaw(baseFile, path.join(root, 'base.raw'))
  ;(await readFile(path.join(root, 'base.raw'))).copy(expected)
  apply(expected, child1Writes)
  const scratch = path.join(root, 'x.raw')
  await assertExport(t, c1.descriptor, undefined, expected, scratch)
  await assertQemu(t, c1.descriptor, expected, scratch)
  const vi = await run('vmdkinfo', [c1.descriptor], { cwd: dir })
  t.is(vi.code, 0, describe(vi))
})

test('the COWD helper itself: header fields follow VMDK.md §4.1', async t => {
  // guards the oracle: if the helper drifted, every COWD test above would prove nothing
  const root = await tmp()
  const f = path.join(root, 'x-delta.vmdk')
  await makeCowd(f, SECTORS, [{ sector: 4097, data: Buffer.alloc(512, 7) }])
  const b = await readFile(f)
  t.is(b.toString('latin1', 0, 4), 'COWD')
  t.is(b.readUInt32LE(4), 1)
  t.is(b.readUInt32LE(8), 3)
  t.is(b.readUInt32LE(12), SECTORS)
  t.is(b.readUInt32LE(16), 1)
  t.is(b.readUInt32LE(20), 4)
  const ngd = Math.ceil(SECTORS / 4096)
  t.is(b.readUInt32LE(24), ngd)
  const gdSectors = Math.ceil(ngd * 4 / 512)
  const gt = 4 + gdSectors
  t.is(b.readUInt32LE(4 * 512 + 4), gt, 'GD[1] points at the first GT')
  t.is(b.readUInt32LE(gt * 512 + 4), gt + 32, 'GTE[1] points after the GT')
  t.is(b.readUInt32LE(28), gt + 33, 'freeSector')
  t.is(b.length, (gt + 33) * 512)
  t.is(b[(gt + 32) * 512], 7)
})

test('engine writes into a helper-built COWD top read back identically in qemu-img convert and redofs export', async t => {
  const root = await tmp()
  const dir = path.join(root, 'store', 'vm1')
  await mkdir(dir, { recursive: true })
  const baseContent = randomBytes(prng(20), 2 * 1024 * 1024)
  const base = await writeVmfsBase(dir, 'disk', SECTORS, baseContent)
  const c1 = await writeVmfsSparseChild(dir, 'disk-000001', SECTORS, base.cid, 'disk.vmdk', child1Writes)
  const expected = Buffer.alloc(SECTORS * SECTOR)
  baseContent.copy(expected)
  apply(expected, child1Writes)
  const rnd = prng(21)
  const plan: Array<{ pos: number, data: Buffer }> = [
    { pos: 0, data: randomBytes(rnd, 1) }, // inside an allocated grain: partial-sector overwrite
    { pos: 4096 * SECTOR - 700, data: randomBytes(rnd, 1400) }, // across a GT boundary, unaligned
    { pos: 7 * 4096 * SECTOR + 3, data: randomBytes(rnd, 70000) }, // GT 7 does not exist yet
    { pos: SECTORS * SECTOR - 10, data: randomBytes(rnd, 10) } // last bytes
  ]
  for (const w of plan) w.data.copy(expected, w.pos)
  const chain = await openChain(c1.descriptor, { writable: true })
  try {
    const v = chain.view(chain.generations - 1)
    for (const w of plan) await v.write(w.data, 0, w.pos, w.data.length)
  } finally {
    await chain.close()
  }
  const scratch = path.join(root, 'x.raw')
  await assertQemu(t, c1.descriptor, expected, scratch)
  await assertExport(t, c1.descriptor, undefined, expected, scratch)
  t.is(await magicOf(c1.delta), 'COWD')
  const vi = await run('vmdkinfo', [c1.descriptor], { cwd: dir })
  t.is(vi.code, 0, describe(vi))
  const chk = await redofs(['check', c1.descriptor])
  t.is(chk.code, 0, describe(chk))
  t.deepEqual(await cidLinkProblems(c1.descriptor), [])
})

test('addredo --redo-format cowd makes a vmfsSparse redo log that qemu and libvmdk read, and commit merges it back', async t => {
  const root = await tmp()
  const dir = path.join(root, 'store', 'vm1')
  await mkdir(dir, { recursive: true })
  const base = await writeVmfsBase(dir, 'disk', SECTORS, randomBytes(prng(30), 1024 * 1024))
  const r = await redofs(['addredo', '--redo-format', 'cowd', path.join(dir, 'disk')])
  t.is(r.code, 0, describe(r))
  const top = path.join(dir, 'disk-000001.vmdk')
  const li = await layerInfo(top)
  t.is(li.createType, 'vmfsSparse')
  t.is(li.parentCID, base.cid)
  t.is(li.hint, 'disk.vmdk')
  const expected = Buffer.alloc(SECTORS * SECTOR)
  await convertToRaw(base.descriptor, path.join(root, 'base.raw'))
  ;(await readFile(path.join(root, 'base.raw'))).copy(expected)
  const w = { pos: 777, data: randomBytes(prng(31), 300000) }
  w.data.copy(expected, w.pos)
  const chain = await openChain(top, { writable: true })
  try {
    const v = chain.view(chain.generations - 1)
    await v.write(w.data, 0, w.pos, w.data.length)
  } finally {
    await chain.close()
  }
  const scratch = path.join(root, 'x.raw')
  await assertQemu(t, top, expected, scratch)
  const vi = await run('vmdkinfo', [top], { cwd: dir })
  t.is(vi.code, 0, describe(vi))
  const c = await redofs(['commit', path.join(dir, 'disk'), 'level=0'])
  t.is(c.code, 0, describe(c))
  const tops = await findTops(dir)
  t.deepEqual(tops.map(f => path.basename(f)), ['disk.vmdk'])
  await assertQemu(t, base.descriptor, expected, scratch)
})

test('a COWD file with a grain over its own grain table: writes are refused, naming the file and the overlap, and the file is left as it was; a full one refuses new grains (ENOSPC) instead of wrapping its 32-bit entries', async t => {
  const root = await tmp()
  const dir = path.join(root, 'store', 'vm1')
  await mkdir(dir, { recursive: true })
  const base = await writeVmfsBase(dir, 'disk', SECTORS, Buffer.alloc(0))
  const write = async (top: string, pos: number): Promise<{ code?: string, message?: string } | undefined> => {
    let chain
    try {
      chain = await openChain(top, { writable: true })
      await chain.view(chain.generations - 1).write(Buffer.alloc(4096, 9), 0, pos, 4096)
      return undefined
    } catch (e) {
      return e as { code?: string, message?: string }
    } finally {
      await chain?.close()
    }
  }
  // a grain entry over its grain table
  const c1 = await writeVmfsSparseChild(dir, 'disk-000001', SECTORS, base.cid, 'disk.vmdk', child1Writes)
  const b = await readFile(c1.delta)
  const gt = b.readUInt32LE(b.readUInt32LE(20) * SECTOR)
  await writeU32(c1.delta, gt * SECTOR, gt + 1) // sector 0's grain now lies inside table 0
  const damaged = await readFile(c1.delta)
  const chk = await redofs(['check', c1.descriptor])
  t.is(chk.code, 1, describe(chk))
  t.regex(chk.stdout + chk.stderr, /-delta\.vmdk: a grain at sector \d+ overlaps/)
  const refused = await write(c1.descriptor, 3 * 1024 * 1024)
  t.regex(String(refused?.message), /-delta\.vmdk: a grain at sector \d+ overlaps/, 'the write is refused, naming the file and the problem')
  t.true((await readFile(c1.delta)).equals(damaged), 'the damaged file is left as it was')
  // freeSector at the last sector a 32-bit entry can name
  await rm(path.join(dir, 'disk-000001.vmdk'))
  await rm(c1.delta)
  const c2 = await writeVmfsSparseChild(dir, 'disk-000001', SECTORS, base.cid, 'disk.vmdk', child1Writes)
  await writeU32(c2.delta, 28, 0xfffffff0)
  const before = await readFile(c2.delta)
  const e = await write(c2.descriptor, 3 * 1024 * 1024)
  t.is(e?.code, 'ENOSPC', String(e?.message))
  const after = await readFile(c2.delta)
  t.is(after.length, before.length, 'nothing was appended')
  t.true(after.subarray(2048).equals(before.subarray(2048)), 'no table or directory entry changed')
})
