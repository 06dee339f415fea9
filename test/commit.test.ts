/**
 * Acceptance 3: after `redofs commit ... level=0`, `level=1` (three redo logs) and `level=all`,
 * qemu-img convert of the top returns the same bytes as before, every file passes qemu-img
 * check, qemu reads through every parent, and every parentCID equals its parent's CID.
 */
import test, { type ExecutionContext } from 'ava'
import { mkdir, readdir } from 'node:fs/promises'
import path from 'node:path'
import { REDOFS_BIN, requireEnv } from './helpers/env'
import { convertToRaw, createChild, describe, qemuCheck, run, sameContent, snapshotTree, type BaseFormat } from './helpers/qemu'
import { infoJson, redofs } from './helpers/redofs'
import { convertAll, FOUR_LEVELS, storeChain, type StoreChain } from './helpers/store'
import { tmpDirs } from './helpers/tmp'
import { chainFiles, cidLinkProblems, findTops, layerInfo } from './helpers/vmdk'

requireEnv(test)
const tmp = tmpDirs(test)

const M = 1024 * 1024

async function fourLevels (format: BaseFormat): Promise<{ c: StoreChain, refs: string[] }> {
  const root = await tmp()
  const c = await storeChain(root, 16 * M, FOUR_LEVELS.map((writes, i) => i === 0 ? { format, writes } : { writes }))
  const refs = await convertAll(c.files, root, 'before')
  return { c, refs }
}

/**
 * After a commit: exactly one chain top in the VM dir, `expectGens` = which old generation each
 * new generation must equal; qemu reads every level (no CID error), every file passes qemu-img
 * check, CID links hold, redofs check is clean, info --json agrees on the length.
 */
async function assertChainAfter (t: ExecutionContext, c: StoreChain, refs: string[], expectGens: number[]): Promise<void> {
  const tops = await findTops(c.vmDir)
  t.is(tops.length, 1, `one chain top expected in ${c.vmDir}: ${tops.join(', ')}`)
  if (tops.length !== 1) return
  const top = tops[0]
  const files = await chainFiles(top)
  t.is(files.length, expectGens.length, `chain length after commit: ${files.map(f => path.basename(f)).join(' <- ')}`)
  for (const f of files) {
    const r = await qemuCheck(f)
    t.is(r.code, 0, describe(r))
    const vi = await run('vmdkinfo', [f], { cwd: c.vmDir })
    t.is(vi.code, 0, describe(vi))
  }
  t.deepEqual(await cidLinkProblems(top), [], 'every parentCID equals its parent\'s CID')
  const n = Math.min(files.length, expectGens.length)
  for (let g = 0; g < n; g++) {
    const out = path.join(c.root, `after-g${g}.raw`)
    await t.notThrowsAsync(convertToRaw(files[g], out), `qemu-img convert of ${path.basename(files[g])} (reads through every parent)`)
    const cmp = await sameContent(out, refs[expectGens[g]])
    t.true(cmp.same, `new generation ${g} (${path.basename(files[g])}) should equal old generation ${expectGens[g]}: ${cmp.detail}`)
  }
  const chk = await redofs(['check', top])
  t.is(chk.code, 0, describe(chk))
  const info = await infoJson(top)
  t.is(info.layers.length, expectGens.length, JSON.stringify(info))
}

test('commit level=0 merges the top redo log into its parent; content and links preserved', async t => {
  const { c, refs } = await fourLevels('monolithicSparse')
  const r = await redofs(['commit', c.disk, 'level=0'])
  t.is(r.code, 0, describe(r))
  await assertChainAfter(t, c, refs, [0, 1, 3])
})

test('commit level=1 with three redo logs merges the middle one; the top is relinked to the new CID', async t => {
  const { c, refs } = await fourLevels('monolithicFlat')
  const top = c.files[3]
  const r = await redofs(['commit', top, 'level=1'])
  t.is(r.code, 0, describe(r))
  await assertChainAfter(t, c, refs, [0, 2, 3])
  // the top redo log still exists and still holds the same data
  const tops = await findTops(c.vmDir)
  t.deepEqual(tops.map(f => path.basename(f)), ['disk-000003.vmdk'], 'the top redo log stays the top')
})

for (const format of ['monolithicSparse', 'monolithicFlat'] as const) {
  test(`commit level=all merges every redo log into a ${format} base`, async t => {
    const { c, refs } = await fourLevels(format)
    const r = await redofs(['commit', c.disk, 'level=all'])
    t.is(r.code, 0, describe(r))
    await assertChainAfter(t, c, refs, [3])
    const tops = await findTops(c.vmDir)
    if (tops.length === 1) {
      t.is(path.basename(tops[0]), 'disk.vmdk', 'only the base is left')
      t.is((await layerInfo(tops[0])).parentCID, 0xffffffff)
    }
  })
}

test('commit level=0 of a redo log with zeroed-grain entries (GTE=1) writes zeros into the parent', async t => {
  const root = await tmp()
  const c = await storeChain(root, 16 * M, [
    { writes: [{ pattern: 0xee, offset: 0, length: 512 * 1024 }] },
    { writes: [{ pattern: 0xdd, offset: 256 * 1024, length: 128 * 1024 }] },
    { options: 'zeroed_grain=on', writes: [{ pattern: 'zero', offset: 64 * 1024, length: 384 * 1024 }, { pattern: 0xcc, offset: 8 * M, length: 100 }] }
  ])
  const refs = await convertAll(c.files, root, 'before')
  const r = await redofs(['commit', c.disk, 'level=0'])
  t.is(r.code, 0, describe(r))
  await assertChainAfter(t, c, refs, [0, 2])
})

test('a commit that fails (an I/O error while copying) leaves no journal: the chain opens as before and a later commit finishes', async t => {
  const { c, refs } = await fourLevels('monolithicSparse')
  const top = c.files[3]
  const env: NodeJS.ProcessEnv = { ...process.env, REDOFS_FAIL_ONCE: 'commit.copy' }
  delete env.DEBUG
  const r = await run(process.execPath, [REDOFS_BIN, 'commit', top, 'level=1'], { env })
  t.is(r.code, 1, describe(r))
  t.regex(r.stderr, /commit of .*disk-000002\.vmdk failed: .*injected I\/O error.*generations 2 and up are unchanged/)
  t.deepEqual((await readdir(c.vmDir)).filter(f => f.includes('redofs-commit')), [], 'the failed commit left its journal')
  // no commit is finished behind the user's back: the chain is as long as before and reads the same
  const info = await infoJson(top)
  t.is(info.layers.length, 4)
  t.deepEqual(await cidLinkProblems(top), [])
  for (const g of [0, 2, 3]) {
    const out = path.join(c.root, `failed-g${g}.raw`)
    await convertToRaw(c.files[g], out)
    const cmp = await sameContent(out, refs[g])
    t.true(cmp.same, `generation ${g} changed: ${cmp.detail}`)
  }
  const chk = await redofs(['check', top])
  t.is(chk.code, 0, describe(chk))
  // the same commit, without the fault, ends as any commit does
  const again = await redofs(['commit', top, 'level=1'])
  t.is(again.code, 0, describe(again))
  await assertChainAfter(t, c, refs, [0, 2, 3])
})

test('commit into a parent that another chain shares is refused without force=1 and changes nothing', async t => {
  const root = await tmp()
  const c = await storeChain(root, 16 * M, [{ writes: FOUR_LEVELS[0] }, { writes: FOUR_LEVELS[1] }])
  // a linked clone in vm2 sharing vm1/disk.vmdk as its parent
  const vm2 = path.join(c.store, 'vm2')
  await mkdir(vm2)
  await createChild('clone-000001.vmdk', '../vm1/disk.vmdk', 'monolithicSparse', vm2)
  const before = await snapshotTree(c.store)
  const r = await redofs(['commit', c.disk, 'level=0'])
  t.is(r.code, 1, describe(r))
  t.regex(r.stderr, /^redofs: /, describe(r))
  t.false(r.stderr.trim().includes('\n'), describe(r))
  t.deepEqual(await snapshotTree(c.store), before, 'no file changed')
  const forced = await redofs(['commit', c.disk, 'level=0', 'force=1'])
  t.is(forced.code, 0, describe(forced))
})
