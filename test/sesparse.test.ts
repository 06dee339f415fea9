/**
 * SEsparse deltas (VMDK.md §5; ESXi snapshots on VMFS6): read as qemu reads them, through the
 * command line and the mount; read-only, so a redo log goes above them to write, and a commit
 * merges one into a writable parent. The files come from test/helpers/sesparse.ts; qemu-img
 * is the oracle for what they hold, next to the content the test wrote itself.
 */
import test from 'ava'
import { open, readdir, readFile } from 'node:fs/promises'
import path from 'node:path'
import { writeVmfsBase } from './helpers/cowd'
import { e2e, requireFuse, sh } from './helpers/mount'
import { firstDifference } from './helpers/model'
import { convertToRaw, describe, qemuCheck, run } from './helpers/qemu'
import { assertOneLineError, infoJson, redofs, redofsOk } from './helpers/redofs'
import { makeSeSparse, type SeGrain } from './helpers/sesparse'
import { openChain } from '../src/index'

requireFuse(test)
const ctx = e2e(test)

const M = 1024 * 1024
const SECTORS = 40 * M / 512 // three grain tables' worth (16 MiB each), the last one partial

function grain (fill: number): Buffer {
  const b = Buffer.alloc(4096, fill)
  b.writeUInt32LE((0xdeadbeef ^ fill) >>> 0, 100) // not one byte repeated: a shifted read shows
  return b
}

/** Apply grains to an image (unmapped grains read as zeros, as qemu reads them). */
function apply (img: Buffer, grains: SeGrain[]): Buffer {
  const out = Buffer.from(img)
  for (const g of grains) {
    if ('data' in g) g.data.copy(out, g.grain * 4096)
    else out.fill(0, g.grain * 4096, (g.grain + 1) * 4096)
  }
  return out
}

/** A vmfs base with content, and two SEsparse snapshots above it, ESXi style. */
async function esxiChain (): Promise<{ vm: string, store: string, root: string, images: Buffer[], files: string[] }> {
  const root = await ctx.tmp()
  const store = path.join(root, 'store')
  const vm = path.join(store, 'vm')
  await mkdirp(vm)
  const base = Buffer.alloc(SECTORS * 512)
  for (let i = 0; i < base.length; i += 4096) base.writeUInt32LE(i / 4096 + 1, i)
  base.fill(0x5a, 3 * M, 5 * M)
  const b = await writeVmfsBase(vm, 'disk', SECTORS, base)
  const g1: SeGrain[] = [
    { grain: 0, data: grain(0x11) }, { grain: 1, data: grain(0x12) }, // back to back in the file
    { grain: 3 * M / 4096, zero: true }, { grain: 3 * M / 4096 + 1, unmapped: true },
    { grain: 4095, data: grain(0x13) }, { grain: 4096, data: grain(0x14) }, // across two tables
    { grain: 33 * M / 4096, data: grain(0x15) } // the third table
  ]
  const s1 = await makeSeSparse(vm, 'disk-000001', { hint: 'disk.vmdk', cid: b.cid }, SECTORS, g1)
  const g2: SeGrain[] = [{ grain: 1, data: grain(0x21) }, { grain: 4096, zero: true }, { grain: 20 * M / 4096, data: grain(0x22) }]
  const s2 = await makeSeSparse(vm, 'disk-000002', { hint: 'disk-000001.vmdk', cid: s1.cid }, SECTORS, g2, { firstSlot: 9000 })
  const img1 = apply(base, g1)
  return { vm, store, root, images: [base, img1, apply(img1, g2)], files: [b.descriptor, s1.descriptor, s2.descriptor] }
}

async function mkdirp (dir: string): Promise<void> {
  await (await import('node:fs/promises')).mkdir(dir, { recursive: true })
}

async function rawOf (file: string, out: string): Promise<Buffer> {
  await convertToRaw(file, out)
  return await readFile(out)
}

test('export of every generation of an SEsparse chain equals what was written and what qemu-img reads; info and map describe it', async t => {
  const c = await esxiChain()
  for (let g = 0; g < 3; g++) {
    const q = await rawOf(c.files[g], path.join(c.root, `q${g}.raw`))
    t.is(firstDifference(q, c.images[g]), -1, `qemu-img reads generation ${g} differently from what the test wrote`)
    const out = path.join(c.root, `e${g}.raw`)
    await redofsOk(['export', `${path.join(c.vm, 'disk')}@${g}`, out])
    t.is(firstDifference(await readFile(out), c.images[g]), -1, `export of generation ${g} differs at that byte`)
  }
  const info = await infoJson(c.files[2])
  t.deepEqual(info.layers.map(l => l.format), ['vmfs', 'seSparse', 'seSparse'])
  t.is(info.layers[1].allocated, 5 * 4096, 'allocated bytes of the first snapshot (its data grains)')
  const map = JSON.parse((await redofsOk(['map', path.join(c.vm, 'disk')])).stdout) as Array<{ start: number, length: number, generation: number, data: boolean }>
  const at = (pos: number): { generation: number, data: boolean } | undefined => map.find(e => e.start <= pos && pos < e.start + e.length)
  t.like(at(4096), { generation: 2, data: true })
  t.like(at(0), { generation: 1, data: true })
  t.like(at(3 * M), { generation: 1, data: false })
  t.like(at(16 * M), { generation: 2, data: false })
  t.is((await redofs(['check', c.files[2]])).code, 0)
})

test('grains more than 2 TiB into an SEsparse file (a sparse file here) read as qemu reads them', async t => {
  const root = await ctx.tmp()
  const vm = path.join(root, 'store', 'vm')
  await mkdirp(vm)
  const b = await writeVmfsBase(vm, 'disk', 2048, Buffer.alloc(M, 0x41))
  // grain slots 2^29 - 1 and 2^29: bytes 2 TiB - 4 KiB and 2 TiB into the grain area
  const grains: SeGrain[] = [{ grain: 3, data: grain(0x51) }, { grain: 200, data: grain(0x52) }]
  const s1 = await makeSeSparse(vm, 'disk-000001', { hint: 'disk.vmdk', cid: b.cid }, 2048, grains, { firstSlot: 2 ** 29 - 1 })
  const want = apply(Buffer.alloc(M, 0x41), grains)
  t.is(firstDifference(await rawOf(s1.descriptor, path.join(root, 'q.raw')), want), -1, 'qemu-img reads the test file differently from what it holds')
  await redofsOk(['export', s1.descriptor, path.join(root, 'e.raw')])
  t.is(firstDifference(await readFile(path.join(root, 'e.raw')), want), -1)
  t.is((await redofs(['check', s1.descriptor])).code, 0)
})

test('a mounted SEsparse chain: every generation reads as written; the live file is read-only until a redo log goes above it, and qemu reads that redo log too', async t => {
  const c = await esxiChain()
  const s = await ctx.mount(c.store, path.join(c.root, 'mnt'))
  for (let g = 0; g < 3; g++) {
    const file = g === 2 ? s.img('vm', 'disk') : s.img('vm', 'disk', g)
    t.is(firstDifference(await readFile(file), c.images[g]), -1, `generation ${g} through the mount differs at that byte`)
  }
  const st = await s.status('vm', 'disk')
  t.false((st as unknown as { writable: boolean }).writable, 'an SEsparse top was served writable')
  const w = await sh('printf x | dd of="$1" bs=1 seek=10 conv=notrunc status=none', [s.img('vm', 'disk')])
  t.not(w.code, 0, 'a write to the SEsparse top succeeded')
  t.regex(await readFile(s.ctl('vm', 'disk', 'error'), 'utf8'), /disk-000002\.vmdk is an SEsparse redo log, which redofs reads but never writes; addredo first/)
  await s.commandOk('vm', 'disk', 'addredo')
  const model = Buffer.from(c.images[2])
  const fh = await open(s.img('vm', 'disk'), 'r+')
  const data = Buffer.alloc(100000, 0x77)
  await fh.write(data, 0, data.length, 4000)
  await fh.close()
  data.copy(model, 4000)
  t.is(firstDifference(await readFile(s.img('vm', 'disk')), model), -1)
  t.is(firstDifference(await readFile(s.img('vm', 'disk', 2)), c.images[2]), -1, 'the frozen SEsparse generation changed')
  await s.stopClean(t)
  const top = path.join(c.vm, 'disk-000003.vmdk')
  t.is(firstDifference(await rawOf(top, path.join(c.root, 'q-top.raw')), model), -1, 'qemu-img reads the new redo log over the SEsparse chain differently')
  t.is((await qemuCheck(top)).code, 0)
})

test('commit merges an SEsparse snapshot into a writable parent and deletes both of its files; a commit into an SEsparse parent is refused', async t => {
  const c = await esxiChain()
  const into = await redofs(['commit', path.join(c.vm, 'disk'), 'level=0'])
  assertOneLineError(t, into, { mustName: ['disk-000001.vmdk'], keyword: /read-only/ })
  // the top one first: discard it, then merge the first snapshot into the vmfs base
  await redofsOk(['discard', path.join(c.vm, 'disk')])
  await redofsOk(['commit', path.join(c.vm, 'disk'), 'level=0'])
  t.deepEqual((await readdir(c.vm)).sort(), ['disk-flat.vmdk', 'disk.vmdk'])
  t.is(firstDifference(await rawOf(c.files[0], path.join(c.root, 'after.raw')), c.images[1]), -1)
  const chk = await run('qemu-img', ['check', c.files[0]])
  t.true(chk.code === 0 || /does not support checks/.test(chk.stderr), describe(chk))
})

test('damaged SEsparse files: a journal that needs replaying, an unknown version and a grain outside the file are named; the rest of the chain still reads', async t => {
  const root = await ctx.tmp()
  const vm = path.join(root, 'store', 'vm')
  await mkdirp(vm)
  const b = await writeVmfsBase(vm, 'disk', SECTORS, Buffer.alloc(M, 0x31))
  const dirty = await makeSeSparse(vm, 'dirty', { hint: 'disk.vmdk', cid: b.cid }, SECTORS, [{ grain: 0, data: grain(1) }], { dirty: true })
  assertOneLineError(t, await redofs(['export', dirty.descriptor, path.join(root, 'x.raw')]), { mustName: ['dirty-sesparse.vmdk'], keyword: /journal needs replaying/ })
  const q = await run('qemu-img', ['info', dirty.descriptor])
  t.not(q.code, 0, 'qemu-img opened a dirty SEsparse file: the test file is not what it claims')
  const v = await makeSeSparse(vm, 'version', { hint: 'disk.vmdk', cid: b.cid }, SECTORS, [])
  const fh = await open(v.extent, 'r+')
  await fh.write(Buffer.from([2]), 0, 1, 8) // version 2.2
  await fh.close()
  assertOneLineError(t, await redofs(['info', v.descriptor]), { mustName: ['version-sesparse.vmdk'], keyword: /SEsparse version 0x200000002 is not supported/ })
  // qemu refuses a volatile header whose padding is not zero, and so does redofs
  const pad = await makeSeSparse(vm, 'pad', { hint: 'disk.vmdk', cid: b.cid }, SECTORS, [])
  const ph = await open(pad.extent, 'r+')
  await ph.write(Buffer.from([1]), 0, 1, 512 + 100)
  await ph.close()
  t.not((await run('qemu-img', ['info', pad.descriptor])).code, 0, 'qemu-img opened it: the test file is not what it claims')
  assertOneLineError(t, await redofs(['info', pad.descriptor]), { mustName: ['pad-sesparse.vmdk'], keyword: /volatile header padding is not zero/ })
  // grain 5 names grain slot 1 000 000, far past the end of the file; grain 0 is fine
  const far = await makeSeSparse(vm, 'far', { hint: 'disk.vmdk', cid: b.cid }, SECTORS, [{ grain: 0, data: grain(9) }], { rawEntries: new Map([[5, 0x3000000000000000n | (1000000n >> 12n) | ((1000000n & 0xfffn) << 48n)]]) })
  const chk = await redofs(['check', far.descriptor])
  t.is(chk.code, 1, describe(chk))
  t.regex(chk.stdout, /far-sesparse\.vmdk: grain 5 lies outside the file's grain area/)
  const out = path.join(root, 'far.raw')
  const exp = await redofs(['export', far.descriptor, out])
  assertOneLineError(t, exp, { mustName: ['far-sesparse.vmdk'], keyword: /grain 5 lies outside the file's grain area/ })
  // opened leniently (as check does), the damage is that grain's alone: the rest reads
  const chain = await openChain(far.descriptor, { lenient: true })
  try {
    const view = chain.view(chain.redoCount)
    const b = Buffer.alloc(8192)
    await view.read(b, 0, 0, 8192)
    t.is(firstDifference(b, Buffer.concat([grain(9), Buffer.alloc(4096, 0x31)])), -1)
    await t.throwsAsync(view.read(Buffer.alloc(4096), 0, 5 * 4096, 4096), { message: /far\.vmdk: damaged grain at byte 20480 of the disk/ })
  } finally {
    await chain.close()
  }
})
