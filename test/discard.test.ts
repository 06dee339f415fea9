/**
 * Acceptance 4: `redofs discard` and `redofs discard ... to=G` restore exactly the earlier
 * generation (compared with a raw export taken before), and leave the remaining files untouched.
 */
import test, { type ExecutionContext } from 'ava'
import { existsSync } from 'node:fs'
import path from 'node:path'
import { requireEnv } from './helpers/env'
import { convertToRaw, describe, qemuCheck, sameContent, snapshotTree } from './helpers/qemu'
import { exportGen, redofs } from './helpers/redofs'
import { FOUR_LEVELS, redoName, storeChain, type StoreChain } from './helpers/store'
import { tmpDirs } from './helpers/tmp'
import { chainFiles, cidLinkProblems, findTops } from './helpers/vmdk'

requireEnv(test)
const tmp = tmpDirs(test)

const M = 1024 * 1024

/** A 4-level chain and a redofs export of every generation taken before any change. */
async function prepared (): Promise<{ c: StoreChain, exports: string[] }> {
  const root = await tmp()
  const c = await storeChain(root, 16 * M, FOUR_LEVELS.map((writes, i) => i === 0 ? { format: 'monolithicFlat' as const, writes } : { writes }))
  const top = c.files[c.files.length - 1]
  const exports: string[] = []
  for (let g = 0; g < c.files.length; g++) {
    const out = path.join(root, `export-g${g}.raw`)
    const r = await exportGen(top, g, out)
    if (r.code !== 0) throw new Error(`export before discard failed\n${describe(r)}`)
    exports.push(out)
  }
  return { c, exports }
}

/** Files of generations 0..keep of the original chain plus their extents (what must stay untouched). */
async function keptSnapshot (c: StoreChain, keep: number): Promise<Record<string, string>> {
  const all = await snapshotTree(c.vmDir)
  const keepNames = c.files.slice(0, keep + 1).map(f => path.basename(f, '.vmdk'))
  const out: Record<string, string> = {}
  for (const [f, v] of Object.entries(all)) {
    const stem = f.replace(/\.vmdk$/, '').replace(/-(flat|s\d{3}|f\d{3}|delta)$/, '')
    if (keepNames.includes(stem)) out[f] = v
  }
  return out
}

async function assertRestored (t: ExecutionContext, c: StoreChain, exports: string[], gen: number, kept: Record<string, string>): Promise<void> {
  const tops = await findTops(c.vmDir)
  t.deepEqual(tops.map(f => path.basename(f)), [redoName('disk', gen)], 'the chain top is the file of the kept generation')
  for (let n = gen + 1; n < c.files.length; n++) t.false(existsSync(c.files[n]), `${path.basename(c.files[n])} should be deleted`)
  if (tops.length !== 1) return
  const top = tops[0]
  t.is((await chainFiles(top)).length, gen + 1)
  const raw = path.join(c.root, 'after.raw')
  await convertToRaw(top, raw)
  const cmp = await sameContent(raw, exports[gen])
  t.true(cmp.same, `qemu-img convert of the new top vs export @${gen} taken before: ${cmp.detail}`)
  const mine = path.join(c.root, 'after-redofs.raw')
  const e = await exportGen(top, undefined, mine)
  t.is(e.code, 0, describe(e))
  if (e.code === 0) {
    const cmp2 = await sameContent(mine, exports[gen])
    t.true(cmp2.same, `redofs export of the new top vs export @${gen} taken before: ${cmp2.detail}`)
  }
  t.deepEqual(await cidLinkProblems(top), [])
  for (const f of await chainFiles(top)) t.is((await qemuCheck(f)).code, 0, `qemu-img check ${path.basename(f)}`)
  const after = await keptSnapshot(c, gen)
  t.deepEqual(after, kept, 'the files of the remaining generations are untouched')
}

test('discard drops the top redo log and restores generation N-1', async t => {
  const { c, exports } = await prepared()
  const kept = await keptSnapshot(c, 2)
  const r = await redofs(['discard', c.disk])
  t.is(r.code, 0, describe(r))
  await assertRestored(t, c, exports, 2, kept)
})

test('discard <top.vmdk> to=1 drops every redo log above generation 1', async t => {
  const { c, exports } = await prepared()
  const kept = await keptSnapshot(c, 1)
  const r = await redofs(['discard', c.files[3], 'to=1'])
  t.is(r.code, 0, describe(r))
  await assertRestored(t, c, exports, 1, kept)
})

test('discard to=0 returns to the base alone', async t => {
  const { c, exports } = await prepared()
  const kept = await keptSnapshot(c, 0)
  const r = await redofs(['discard', c.disk, 'to=0'])
  t.is(r.code, 0, describe(r))
  await assertRestored(t, c, exports, 0, kept)
})

test('discard then addredo gives a fresh empty redo log over the restored generation', async t => {
  const { c, exports } = await prepared()
  t.is((await redofs(['discard', c.disk, 'to=1'])).code, 0)
  const r = await redofs(['addredo', c.disk])
  t.is(r.code, 0, describe(r))
  const tops = await findTops(c.vmDir)
  t.is(tops.length, 1)
  if (tops.length !== 1) return
  t.is((await qemuCheck(tops[0])).code, 0)
  t.deepEqual(await cidLinkProblems(tops[0]), [])
  const raw = path.join(c.root, 'after.raw')
  await convertToRaw(tops[0], raw)
  const cmp = await sameContent(raw, exports[1])
  t.true(cmp.same, cmp.detail)
})
