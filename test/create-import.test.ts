/**
 * CLI contract: `redofs create` (sparse default, flat) and `redofs import` make disks that qemu
 * and libvmdk open, that pass `qemu-img check`, and that redofs reads back.
 */
import test from 'ava'
import { existsSync } from 'node:fs'
import { mkdir, stat, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { requireEnv } from './helpers/env'
import { prng, randomBytes } from './helpers/model'
import { convertToRaw, describe, qemuCheck, run, sameContent, virtualSize } from './helpers/qemu'
import { exportGen, redofs } from './helpers/redofs'
import { tmpDirs } from './helpers/tmp'
import { layerInfo } from './helpers/vmdk'

requireEnv(test)
const tmp = tmpDirs(test)

const M = 1024 * 1024

for (const format of [undefined, 'sparse', 'flat'] as const) {
  test(`create --size 16M${format ? ` --format ${format}` : ''} makes a disk qemu, libvmdk and redofs accept`, async t => {
    const root = await tmp()
    const disk = path.join(root, 'store', 'vm1', 'disk')
    const r = await redofs(['create', disk, '--size', '16M', ...(format ? ['--format', format] : [])])
    t.is(r.code, 0, describe(r))
    const vmdk = `${disk}.vmdk`
    t.true(existsSync(vmdk), describe(r))
    if (!existsSync(vmdk)) return
    const info = await layerInfo(vmdk)
    t.is(info.createType, format === 'flat' ? 'monolithicFlat' : 'monolithicSparse')
    t.is(info.parentCID, 0xffffffff)
    if (format === 'flat') t.is((await stat(`${disk}-flat.vmdk`)).size, 16 * M)
    t.is(await virtualSize(vmdk), 16 * M)
    t.is((await qemuCheck(vmdk)).code, 0)
    const vi = await run('vmdkinfo', [vmdk])
    t.is(vi.code, 0, describe(vi))
    const chk = await redofs(['check', vmdk])
    t.is(chk.code, 0, describe(chk))
    const out = path.join(root, 'out.raw')
    const e = await exportGen(vmdk, undefined, out)
    t.is(e.code, 0, describe(e))
    const zeros = path.join(root, 'zeros.raw')
    await writeFile(zeros, Buffer.alloc(0))
    await run('truncate', ['-s', String(16 * M), zeros])
    t.true((await sameContent(out, zeros)).same, 'a new disk reads as zeros')
  })
}

test('import <raw> writes a monolithicFlat descriptor over the hard-linked raw file', async t => {
  const root = await tmp()
  const raw = path.join(root, 'image.raw')
  const content = randomBytes(prng(99), 4 * M)
  await writeFile(raw, content)
  await run('truncate', ['-s', String(16 * M), raw])
  await mkdir(path.join(root, 'store', 'vm1'), { recursive: true })
  const disk = path.join(root, 'store', 'vm1', 'disk')
  const r = await redofs(['import', raw, disk])
  t.is(r.code, 0, describe(r))
  const vmdk = `${disk}.vmdk`
  t.true(existsSync(vmdk), describe(r))
  if (!existsSync(vmdk)) return
  t.is((await layerInfo(vmdk)).createType, 'monolithicFlat')
  const flat = `${disk}-flat.vmdk`
  t.true(existsSync(flat), 'raw file linked into the VM dir as disk-flat.vmdk')
  if (existsSync(flat)) t.is((await stat(flat)).ino, (await stat(raw)).ino, 'hard link, nothing copied')
  t.is((await qemuCheck(vmdk)).code, 0)
  const q = path.join(root, 'q.raw')
  await convertToRaw(vmdk, q)
  t.true((await sameContent(q, raw)).same, 'qemu reads the imported image')
  const out = path.join(root, 'out.raw')
  const e = await exportGen(vmdk, undefined, out)
  t.is(e.code, 0, describe(e))
  if (e.code === 0) t.true((await sameContent(out, raw)).same, 'redofs reads the imported image')
})

test('names a descriptor cannot quote: an imported raw file inside the VM directory is linked in as <disk>-flat.vmdk, a new disk with \'"\' is refused', async t => {
  const root = await tmp()
  const vm = path.join(root, 'store', 'vm1')
  await mkdir(vm, { recursive: true })
  const raw = path.join(vm, 'we"ird.img')
  await writeFile(raw, randomBytes(prng(7), 2 * M))
  const r = await redofs(['import', raw, path.join(vm, 'disk')])
  t.is(r.code, 0, describe(r))
  t.is((await stat(path.join(vm, 'disk-flat.vmdk'))).ino, (await stat(raw)).ino, 'not linked in under a quotable name')
  t.is((await qemuCheck(path.join(vm, 'disk.vmdk'))).code, 0)
  const q = path.join(root, 'q.raw')
  await convertToRaw(path.join(vm, 'disk.vmdk'), q)
  t.true((await sameContent(q, raw)).same, 'qemu does not read the imported image')
  const bad = await redofs(['create', path.join(vm, 'a"b'), '--size', '1M'])
  t.is(bad.code, 1, describe(bad))
  t.regex(bad.stderr, /cannot be written in a VMDK descriptor/)
  t.false(existsSync(path.join(vm, 'a"b.vmdk')))
})
