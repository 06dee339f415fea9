/**
 * Acceptance 2: a redo log made by `redofs addredo` passes `qemu-img check`; after qemu-io
 * writes into it, qemu and redofs read identical bytes. Data redofs writes through the engine
 * (in-process API) reads identically in `qemu-img convert`, and every file passes `qemu-img check`.
 */
import test, { type ExecutionContext } from 'ava'
import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { openChain } from '../src/index'
import { requireEnv } from './helpers/env'
import { applyWrites, firstDifference, writePlan, type DataWrite } from './helpers/model'
import {
  convertToRaw, describe, qemuCheck, qemuWrite, run, sameContent, snapshotTree, virtualSize,
  type LayerSpec, type QWrite
} from './helpers/qemu'
import { exportGen, redofs } from './helpers/redofs'
import { storeChain as makeStoreChain, type StoreChain } from './helpers/store'
import { tmpDirs } from './helpers/tmp'
import { chainFiles, cidLinkProblems, layerInfo } from './helpers/vmdk'

requireEnv(test)
const tmp = tmpDirs(test)

const K = 1024
const M = 1024 * K
const G = 1024 * M

async function storeChain (size: number, layers: Array<Omit<LayerSpec, 'name'>>): Promise<StoreChain> {
  return await makeStoreChain(await tmp(), size, layers)
}

const baseWrites: QWrite[] = [
  { pattern: 0x11, offset: 0, length: 300 * K },
  { pattern: 0x12, offset: 8 * M - 1000, length: 5000 },
  { pattern: 0x13, offset: 16 * M - 512, length: 512 }
]
const redo1Writes: QWrite[] = [
  { pattern: 0x21, offset: 100 * K + 3, length: 70 * K },
  { pattern: 'zero', offset: 8 * M - 65536, length: 65536 }
]

async function assertQemuChecks (t: ExecutionContext, files: string[]): Promise<void> {
  for (const f of files) {
    const r = await qemuCheck(f)
    t.is(r.code, 0, `qemu-img check ${path.basename(f)}\n${describe(r)}`)
    const vi = await run('vmdkinfo', [f], { cwd: path.dirname(f) })
    t.is(vi.code, 0, `vmdkinfo ${path.basename(f)}\n${describe(vi)}`)
  }
}

async function assertCidLinks (t: ExecutionContext, top: string): Promise<void> {
  t.deepEqual(await cidLinkProblems(top), [], `CID links of the chain ending at ${path.basename(top)}`)
}

async function rawOf (vmdk: string, out: string): Promise<Buffer> {
  await convertToRaw(vmdk, out)
  return await readFile(out)
}

// ---------------------------------------------------------------------------------------------
// addredo

test('addredo <store>/<vm>/<disk> makes disk-000002.vmdk: qemu-img check passes, CID and hint link to the parent', async t => {
  const c = await storeChain(16 * M, [{ format: 'monolithicFlat', writes: baseWrites }, { writes: redo1Writes }])
  const before = path.join(c.root, 'before.raw')
  await convertToRaw(c.files[1], before)

  const r = await redofs(['addredo', path.join(c.vmDir, 'disk')])
  t.is(r.code, 0, describe(r))
  const made = path.join(c.vmDir, 'disk-000002.vmdk')
  t.true(existsSync(made), `expected ${made}\n${describe(r)}`)
  t.is(path.resolve(r.stdout.trim()), made, 'addredo prints the new file path')

  const check = await qemuCheck(made)
  t.is(check.code, 0, describe(check))
  const vi = await run('vmdkinfo', [made], { cwd: c.vmDir })
  t.is(vi.code, 0, describe(vi))

  const child = await layerInfo(made)
  const parent = await layerInfo(c.files[1])
  t.is(child.hint, 'disk-000001.vmdk')
  t.is(child.parentCID, parent.cid, 'parentCID = parent CID')
  t.is(child.createType, 'monolithicSparse')
  t.not(child.cid, 0xffffffff)
  t.not(child.cid, 0xfffffffe)
  t.is(await virtualSize(made), 16 * M, 'same capacity as the parent')
  await assertCidLinks(t, made)

  const after = path.join(c.root, 'after.raw')
  await convertToRaw(made, after)
  const cmp = await sameContent(after, before)
  t.true(cmp.same, `the new top shows the old top's content: ${cmp.detail}`)
})

test('qemu-io writes into a redofs-made redo log: qemu and redofs read identical bytes at every generation', async t => {
  const c = await storeChain(16 * M, [{ writes: baseWrites }, { writes: redo1Writes }])
  const r = await redofs(['addredo', path.join(c.vmDir, 'disk')])
  t.is(r.code, 0, describe(r))
  const top = path.join(c.vmDir, 'disk-000002.vmdk')
  await qemuWrite(top, [
    { pattern: 0x31, offset: 65536 - 33, length: 66 }, // across a grain boundary, COW from redo 1
    { pattern: 0x32, offset: 8 * M - 3000, length: 200 * K }, // over the zeroed grain and base data
    { pattern: 0x33, offset: 12 * M + 1, length: 1 },
    { pattern: 'zero', offset: 0, length: 4096 }
  ])
  t.is((await qemuCheck(top)).code, 0)
  const files = await chainFiles(top)
  t.is(files.length, 3)
  for (let g = 0; g < files.length; g++) {
    const ref = path.join(c.root, `ref${g}.raw`)
    const got = path.join(c.root, `got${g}.raw`)
    await convertToRaw(files[g], ref)
    const e = await exportGen(top, g, got)
    t.is(e.code, 0, describe(e))
    if (e.code !== 0) continue
    const cmp = await sameContent(got, ref)
    t.true(cmp.same, `generation ${g}: ${cmp.detail}`)
  }
})

test('addredo <top.vmdk> (a chain top file) adds the next redo log', async t => {
  const c = await storeChain(16 * M, [{ writes: baseWrites }, { writes: redo1Writes }])
  const r = await redofs(['addredo', c.files[1]])
  t.is(r.code, 0, describe(r))
  const made = path.join(c.vmDir, 'disk-000002.vmdk')
  t.true(existsSync(made), describe(r))
  t.is((await qemuCheck(made)).code, 0)
  t.is((await layerInfo(made)).hint, 'disk-000001.vmdk')
  await assertCidLinks(t, made)
  // and once more through the new top: disk-000003.vmdk
  const r2 = await redofs(['addredo', made])
  t.is(r2.code, 0, describe(r2))
  const made3 = path.join(c.vmDir, 'disk-000003.vmdk')
  t.true(existsSync(made3), describe(r2))
  t.is((await qemuCheck(made3)).code, 0)
  await assertCidLinks(t, made3)
})

test('addredo on a base-only disk makes disk-000001.vmdk over it', async t => {
  const c = await storeChain(16 * M, [{ format: 'monolithicSparse', writes: baseWrites }])
  const r = await redofs(['addredo', path.join(c.vmDir, 'disk')])
  t.is(r.code, 0, describe(r))
  const made = path.join(c.vmDir, 'disk-000001.vmdk')
  t.true(existsSync(made), describe(r))
  t.is((await qemuCheck(made)).code, 0)
  t.is((await layerInfo(made)).hint, 'disk.vmdk')
  await assertCidLinks(t, made)
})

// ---------------------------------------------------------------------------------------------
// writes through the engine

/**
 * Write `plan` through the in-process engine into the live generation of `top`, check a
 * read-back in the same session, close; return the expected image (old top content + writes).
 */
async function engineWrite (t: ExecutionContext, top: string, scratch: string, plan: DataWrite[]): Promise<Buffer> {
  const expected = await rawOf(top, scratch)
  applyWrites(expected, plan)
  const chain = await openChain(top, { writable: true })
  try {
    const v = chain.view(chain.generations - 1)
    t.is(v.size, expected.length, 'view size = capacity')
    for (const w of plan) await v.write(w.data, 0, w.pos, w.data.length)
    const back = Buffer.alloc(expected.length)
    for (let pos = 0; pos < back.length; pos += 4 * M) await v.read(back, pos, pos, Math.min(4 * M, back.length - pos))
    t.is(firstDifference(back, expected), -1, 'read-back in the same session')
  } finally {
    await chain.close()
  }
  return expected
}

async function assertAfterEngineWrite (t: ExecutionContext, top: string, scratch: string, expected: Buffer): Promise<void> {
  const got = await rawOf(top, scratch)
  const d = firstDifference(got, expected)
  t.is(d, -1, `qemu-img convert of ${path.basename(top)} differs from what redofs wrote, first at byte ${d}`)
  const files = await chainFiles(top)
  await assertQemuChecks(t, files)
  await assertCidLinks(t, top)
  const chk = await redofs(['check', top])
  t.is(chk.code, 0, describe(chk))
}

test('engine writes into the top redo log (COW from a parent with data) read identically in qemu-img convert', async t => {
  const c = await storeChain(16 * M, [{ format: 'monolithicFlat', writes: baseWrites }, { writes: redo1Writes }, { writes: [{ pattern: 0x41, offset: 4 * M, length: 64 * K }] }])
  const lowerBefore = path.join(c.root, 'lower-before.raw')
  await convertToRaw(c.files[1], lowerBefore)
  const cidBefore = (await layerInfo(c.files[2])).cid
  const expected = await engineWrite(t, c.files[2], path.join(c.root, 'x.raw'), writePlan(1, 16 * M))
  await assertAfterEngineWrite(t, c.files[2], path.join(c.root, 'y.raw'), expected)
  t.not((await layerInfo(c.files[2])).cid, cidBefore, 'the top got a new CID when its content changed')
  const lowerAfter = path.join(c.root, 'lower-after.raw')
  await convertToRaw(c.files[1], lowerAfter)
  const cmp = await sameContent(lowerAfter, lowerBefore)
  t.true(cmp.same, `frozen generation 1 changed: ${cmp.detail}`)
})

test('engine writes into a redo log made by redofs addredo read identically in qemu-img convert', async t => {
  const c = await storeChain(16 * M, [{ writes: baseWrites }])
  const r = await redofs(['addredo', path.join(c.vmDir, 'disk')])
  t.is(r.code, 0, describe(r))
  const top = path.join(c.vmDir, 'disk-000001.vmdk')
  const expected = await engineWrite(t, top, path.join(c.root, 'x.raw'), writePlan(2, 16 * M))
  await assertAfterEngineWrite(t, top, path.join(c.root, 'y.raw'), expected)
  const vi = await run('vmdkinfo', [top], { cwd: c.vmDir })
  t.is(vi.code, 0, describe(vi))
})

for (const format of ['monolithicSparse', 'monolithicFlat'] as const) {
  test(`engine writes into a persistent ${format} base (no redo log) read identically in qemu-img convert`, async t => {
    // capacity not a multiple of the grain size: the last grain is partial
    const size = 16 * M + 3 * 512
    const c = await storeChain(size, [{ format, writes: [{ pattern: 0x55, offset: 1 * M, length: 100 * K }] }])
    const expected = await engineWrite(t, c.files[0], path.join(c.root, 'x.raw'), writePlan(3, size))
    await assertAfterEngineWrite(t, c.files[0], path.join(c.root, 'y.raw'), expected)
  })
}

test('concurrent engine writes into one unallocated grain all land (one grain allocated)', async t => {
  const c = await storeChain(16 * M, [{ writes: baseWrites }, {}])
  const top = c.files[1]
  const scratch = path.join(c.root, 'x.raw')
  const expected = await rawOf(top, scratch)
  const grain = 5 * M // unallocated in every layer
  const plan: DataWrite[] = []
  for (let i = 0; i < 16; i++) plan.push({ pos: grain + i * 4096 + 7, data: Buffer.alloc(1000, 0x60 + i) })
  applyWrites(expected, plan)
  const chain = await openChain(top, { writable: true })
  try {
    const v = chain.view(chain.generations - 1)
    await Promise.all(plan.map(async w => { await v.write(w.data, 0, w.pos, w.data.length) }))
  } finally {
    await chain.close()
  }
  await assertAfterEngineWrite(t, top, path.join(c.root, 'y.raw'), expected)
  const info = await run('qemu-img', ['map', '--output=json', '-f', 'vmdk', top], { cwd: c.vmDir })
  const runs = JSON.parse(info.stdout) as Array<{ start: number, length: number, depth: number, data: boolean }>
  const mine = runs.filter(x => x.depth === 0 && x.data)
  t.deepEqual(mine.map(x => [x.start, x.length]), [[grain, 65536]], 'exactly one grain allocated in the top')
})

test('engine writes across the 2 GiB extent boundary of split sparse layers equal the same writes made by qemu-io', async t => {
  const size = 3 * G
  const layers: Array<Omit<LayerSpec, 'name'>> = [
    { format: 'twoGbMaxExtentSparse', writes: [{ pattern: 0x71, offset: 2 * G - 65536, length: 131072 }] },
    { format: 'twoGbMaxExtentSparse', writes: [{ pattern: 0x72, offset: 2 * G - 100, length: 50 }] }
  ]
  const writes: QWrite[] = [
    { pattern: 0x81, offset: 2 * G - 70000, length: 140000 }, // across the extent boundary
    { pattern: 0x82, offset: 2 * G - 1, length: 2 },
    { pattern: 0x83, offset: 3 * G - 512, length: 512 },
    { pattern: 0x84, offset: 1 * G + 12345, length: 99 }
  ]
  const mine = await storeChain(size, layers) // written by redofs
  const twin = await storeChain(size, layers) // written by qemu-io
  await qemuWrite(twin.files[1], writes)
  const chain = await openChain(mine.files[1], { writable: true })
  try {
    const v = chain.view(chain.generations - 1)
    for (const w of writes) {
      const buf = Buffer.alloc(w.length, w.pattern === 'zero' ? 0 : w.pattern)
      await v.write(buf, 0, w.offset, w.length)
    }
  } finally {
    await chain.close()
  }
  const a = path.join(mine.root, 'a.raw')
  const b = path.join(twin.root, 'b.raw')
  await convertToRaw(mine.files[1], a)
  await convertToRaw(twin.files[1], b)
  const cmp = await sameContent(a, b)
  t.true(cmp.same, cmp.detail)
  await assertQemuChecks(t, mine.files)
  await assertCidLinks(t, mine.files[1])
})

test('engine writes survive close and reopen (read back through a new read-only open)', async t => {
  const c = await storeChain(16 * M, [{ writes: baseWrites }, {}])
  const expected = await engineWrite(t, c.files[1], path.join(c.root, 'x.raw'), writePlan(4, 16 * M))
  const chain = await openChain(c.files[1], {})
  try {
    const v = chain.view(chain.generations - 1)
    const back = Buffer.alloc(expected.length)
    await v.read(back, 0, 0, back.length)
    t.is(firstDifference(back, expected), -1)
  } finally {
    await chain.close()
  }
})

// ---------------------------------------------------------------------------------------------
// what must NOT be writable (VMDK.md §2.8 rule 1, §9.2; SPEC §2)

test('addredo on a file that already has a child is refused and changes nothing', async t => {
  const c = await storeChain(16 * M, [{ writes: baseWrites }, { writes: redo1Writes }, {}])
  const before = await snapshotTree(c.store)
  const r = await redofs(['addredo', c.files[1]]) // disk-000001.vmdk is not the top: disk-000002.vmdk is
  t.is(r.code, 1, describe(r))
  t.regex(r.stderr, /^redofs: [^\n]+\n?$/, describe(r))
  t.deepEqual(await snapshotTree(c.store), before, 'no file created or changed')
})

test('the engine refuses to write a layer that has children (its CID would break them)', async t => {
  const c = await storeChain(16 * M, [{ writes: baseWrites }, { writes: redo1Writes }, {}])
  const before = await snapshotTree(c.store)
  let refused = false
  try {
    const chain = await openChain(c.files[1], { writable: true })
    try {
      const v = chain.view(chain.generations - 1)
      await v.write(Buffer.alloc(100, 0x66), 0, 0, 100)
    } catch { refused = true } finally { await chain.close() }
  } catch { refused = true }
  t.true(refused, 'opening disk-000001.vmdk (parent of disk-000002.vmdk) writable and writing must fail')
  t.deepEqual(await snapshotTree(c.store), before, 'no file changed')
  await t.notThrowsAsync(convertToRaw(c.files[2], path.join(c.root, 'top.raw')), 'the child still reads in qemu (no CID break)')
})

test('writes to a frozen generation fail with EROFS, past the capacity with ENOSPC, and change nothing', async t => {
  const c = await storeChain(16 * M, [{ writes: baseWrites }, {}])
  const before = await snapshotTree(c.store)
  const chain = await openChain(c.files[1], { writable: true })
  try {
    const frozen = chain.view(0)
    const e1 = await t.throwsAsync(frozen.write(Buffer.alloc(10, 1), 0, 0, 10))
    t.is((e1 as NodeJS.ErrnoException | undefined)?.code, 'EROFS')
    const live = chain.view(chain.generations - 1)
    const e2 = await t.throwsAsync(live.write(Buffer.alloc(10, 1), 0, live.size - 5, 10))
    t.is((e2 as NodeJS.ErrnoException | undefined)?.code, 'ENOSPC')
  } finally {
    await chain.close()
  }
  const after = await snapshotTree(c.store)
  t.is(after['vm1/disk.vmdk'], before['vm1/disk.vmdk'], 'the frozen base is untouched')
  const raw = path.join(c.root, 'x.raw')
  await convertToRaw(c.files[1], raw)
  const ref = path.join(c.root, 'ref.raw')
  await convertToRaw(c.files[0], ref)
  t.true((await sameContent(raw, ref)).same, 'nothing was written into the top either')
})
