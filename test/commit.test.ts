/**
 * Acceptance 3: after `redofs commit ... level=0`, `level=1` (three redo logs) and `level=all`,
 * qemu-img convert of the top returns the same bytes as before, every file passes qemu-img
 * check, qemu reads through every parent, and every parentCID equals its parent's CID.
 */
import test, { type ExecutionContext } from 'ava'
import { spawn } from 'node:child_process'
import { mkdir, open, readdir, readFile, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { Chain } from '../src/chain/chain'
import { ParentIndex, peekDirs } from '../src/chain/peek'
import { REDOFS_BIN, requireEnv } from './helpers/env'
import { convertToRaw, createChild, describe, qemuCheck, run, sameContent, snapshotTree, type BaseFormat, type RunResult } from './helpers/qemu'
import { assertOneLineError, exportGen, infoJson, redofs, redofsOk, stoppedReader } from './helpers/redofs'
import { convertAll, FOUR_LEVELS, storeChain, type StoreChain } from './helpers/store'
import { makeCowd } from './helpers/cowd'
import { tmpDirs } from './helpers/tmp'
import { chainFiles, cidLinkProblems, findTops, layerInfo } from './helpers/vmdk'

requireEnv(test)
const tmp = tmpDirs(test)

const M = 1024 * 1024

/** `redofs commit <file> level=<level>` with an I/O error injected at the nth chunk it copies: it fails. */
async function failingCommit (t: ExecutionContext, file: string, level: number, nth: number): Promise<RunResult> {
  const env: NodeJS.ProcessEnv = { ...process.env, REDOFS_FAIL_ONCE: `commit.copy#${nth}` }
  delete env.DEBUG
  const r = await run(process.execPath, [REDOFS_BIN, 'commit', file, `level=${level}`], { env })
  t.is(r.code, 1, describe(r))
  return r
}

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

test('a commit that fails while copying leaves no journal; the generation it merged into is marked, refused for reading, and whole again once the commit is run again', async t => {
  const { c, refs } = await fourLevels('monolithicSparse')
  const top = c.files[3]
  // the second chunk fails: the first one was written into generation 1's layer
  const r = await failingCommit(t, top, 1, 2)
  t.regex(r.stderr, /commit of .*disk-000002\.vmdk failed: .*injected I\/O error.*generations 2 and up are unchanged; generation 1 holds part of generation 2's changes/)
  t.deepEqual((await readdir(c.vmDir)).filter(f => f.includes('redofs-commit')), [], 'the failed commit left its journal')
  // no commit is finished behind the user's back: the chain is as long as before and reads the same
  const info = await infoJson(top)
  t.is(info.layers.length, 4)
  t.deepEqual(info.layers.map(l => l.inFlux !== null), [false, true, false, false], JSON.stringify(info.layers))
  t.regex(info.layers[1].inFlux ?? '', /holds part of generation 2's changes: a commit of .*disk-000002\.vmdk/)
  t.deepEqual(await cidLinkProblems(top), [])
  for (const g of [0, 2, 3]) {
    const out = path.join(c.root, `failed-g${g}.raw`)
    await convertToRaw(c.files[g], out)
    const cmp = await sameContent(out, refs[g])
    t.true(cmp.same, `generation ${g} changed: ${cmp.detail}`)
  }
  const chk = await redofs(['check', top])
  t.is(chk.code, 0, describe(chk))
  // generation 1 is neither what it was nor generation 2: nothing reads it as either
  const before = await snapshotTree(c.store)
  const exp = await exportGen(c.disk, 1, path.join(c.root, 'mixed.raw'))
  assertOneLineError(t, exp, { mustName: ['disk-000002.vmdk'], keyword: /holds part of generation 2's changes.*commit that redo log again/ })
  const mp = await redofs(['map', `${c.disk}@1`])
  t.is(mp.code, 1, describe(mp))
  const cl = await redofs(['clone', `${c.disk}@1`, 'vm9'])
  assertOneLineError(t, cl, { mustName: ['disk-000002.vmdk'], keyword: /holds part of generation 2's changes/ })
  // nor does a discard make it live, unless forced
  const dis = await redofs(['discard', c.disk, 'to=1'])
  assertOneLineError(t, dis, { mustName: ['disk-000002.vmdk'], keyword: /would make that mix live \(use force=1\)/ })
  t.deepEqual(await snapshotTree(c.store), before, 'a refused command changed a file')
  // the generations around it still export
  await redofsOk(['export', `${c.disk}@2`, path.join(c.root, 'g2.raw')])
  t.true((await sameContent(path.join(c.root, 'g2.raw'), refs[2])).same)
  // the same commit, without the fault, ends as any commit does and leaves no mark
  const again = await redofs(['commit', top, 'level=1'])
  t.is(again.code, 0, describe(again))
  await assertChainAfter(t, c, refs, [0, 2, 3])
  t.deepEqual((await infoJson(top)).layers.map(l => l.inFlux), [null, null, null])
  t.notRegex(await readFile(c.files[1], 'latin1').then(s => s.slice(0, 1 << 16)), /ddb\.redofs\.partOf/, 'the mark stayed after the commit completed it')
})

test('a commit that fails before it writes anything marks nothing; a forced discard to a marked generation warns and clears the mark', async t => {
  const { c } = await fourLevels('monolithicSparse')
  const top = c.files[3]
  // a top of one chunk: its copy fails before it writes (with more chunks, the other copy
  // workers would write theirs before they see the failure)
  const one = await storeChain(await tmp(), 16 * M, [{ writes: FOUR_LEVELS[0] }, { writes: [{ pattern: 0x55, offset: 0, length: 4096 }] }])
  const r0 = await failingCommit(t, one.disk, 0, 1)
  t.regex(r0.stderr, /nothing was copied, every generation is unchanged/)
  t.deepEqual((await infoJson(one.files[1])).layers.map(l => l.inFlux), [null, null])
  await redofsOk(['export', `${one.disk}@0`, path.join(one.root, 'g0.raw')])
  // a mark, then discard to=1 with force=1: a warning, and the generation is live without a mark
  await failingCommit(t, top, 1, 2)
  const forced = await redofs(['discard', c.disk, 'to=1', 'force=1'])
  t.is(forced.code, 0, describe(forced))
  t.regex(forced.stderr, /^redofs: warning: generation 1 is live now, holding part of the discarded .*disk-000002\.vmdk's changes/)
  const info = await infoJson(c.files[1])
  t.deepEqual(info.layers.map(l => l.inFlux), [null, null])
  t.notRegex(await readFile(c.files[1], 'latin1').then(s => s.slice(0, 1 << 16)), /ddb\.redofs\.partOf/)
  // a redo log added later under the discarded file's free name is not taken for the marked child
  const added = (await redofsOk(['addredo', c.disk])).stdout.trim()
  t.is(path.basename(added), 'disk-000002.vmdk')
  t.deepEqual((await infoJson(added)).layers.map(l => l.inFlux), [null, null, null])
})

test('committing a layer that holds part of the redo log above it passes that mark down: the merged generation stays refused until the redo log above is committed', async t => {
  const { c, refs } = await fourLevels('monolithicSparse')
  const top = c.files[3]
  await failingCommit(t, top, 0, 2)
  t.deepEqual((await infoJson(top)).layers.map(l => l.inFlux !== null), [false, false, true, false])
  // disk-000002 (part of disk-000003 in it) merged into disk-000001: that layer holds the mix now
  await redofsOk(['commit', top, 'level=1'])
  const info = await infoJson(top)
  t.deepEqual(info.layers.map(l => path.basename(l.file)), ['disk.vmdk', 'disk-000001.vmdk', 'disk-000003.vmdk'])
  t.regex(info.layers[1].inFlux ?? '', /generation 1 holds part of generation 2's changes: a commit of .*disk-000003\.vmdk/)
  t.is((await exportGen(c.disk, 1, path.join(c.root, 'mixed.raw'))).code, 1)
  await redofsOk(['commit', top, 'level=0'])
  t.deepEqual((await infoJson(c.files[1])).layers.map(l => l.inFlux), [null, null])
  await redofsOk(['export', c.disk, path.join(c.root, 'live.raw')])
  t.true((await sameContent(path.join(c.root, 'live.raw'), refs[3])).same)
})

for (const cmd of ['export', 'map'] as const) {
  test(`${cmd === 'export' ? 'an export' : 'a map'} of a generation that a commit changes while it is read fails${cmd === 'export' ? ' and keeps no output; the same export afterwards is whole' : ''}`, async t => {
    const { c, refs } = await fourLevels('monolithicSparse')
    const out = path.join(c.root, 'g2.raw')
    // generation 2 (disk-000002.vmdk) is read; `commit level=0` merges disk-000003.vmdk into
    // that file while the reader, its chain open, is stopped
    const args = cmd === 'export' ? ['export', `${c.disk}@2`, out] : ['map', `${c.disk}@2`]
    const r = await stoppedReader(t, args, 'reader', '', async () => { await redofsOk(['commit', c.disk, 'level=0']) })
    t.is(r.code, 1, r.stderr)
    t.regex(r.stderr, /^redofs: .*@2: generation 2 changed while it was read \(.*disk-000002\.vmdk: written/m, r.stderr)
    t.is(r.stdout, '')
    t.deepEqual((await readdir(c.root)).filter(f => f === 'g2.raw' || f.startsWith('.g2.raw.')), [], 'the export left a file')
    if (cmd === 'export') {
      // the generation 2 it meant is gone: the same command now exports the merged one, whole
      await redofsOk(['export', `${c.disk}@2`, out])
      t.true((await sameContent(out, refs[3])).same)
    }
  })
}

test('labelling the generation an export reads, meanwhile, changes nothing it reads: the export succeeds (named by number and by its file)', async t => {
  const { c, refs } = await fourLevels('monolithicSparse')
  for (const [source, name] of [[`${c.disk}@1`, 'nightly'], [c.files[1], 'weekly']]) {
    const out = path.join(c.root, `g1-${name}.raw`)
    const r = await stoppedReader(t, ['export', source, out], 'reader', '', async () => { await redofsOk(['label', c.disk, 'gen=1', `name=${name}`]) })
    t.is(r.code, 0, `${source}: ${r.stderr}`)
    t.true((await sameContent(out, refs[1])).same)
  }
})

test('a commit into a layer of several extents that runs while a reader opens that layer, and ends before the reader looks for its journal, is seen', async t => {
  const G = 1024 * M
  const c = await storeChain(await tmp(), 3 * G, [
    { format: 'twoGbMaxExtentSparse', writes: [{ pattern: 0x11, offset: 0, length: M }] },
    { writes: [{ pattern: 0x22, offset: 0, length: M }, { pattern: 0x23, offset: 4 * M, length: 8 * M }] }, // all in the first extent
    { writes: [{ pattern: 0x33, offset: 5 * M, length: 4096 }] }
  ])
  // the commit of level 1 (disk-000001 into the base) stops at its first chunk: its journal is
  // written and the base's new CID stamped
  const commit = spawn(process.execPath, [REDOFS_BIN, 'commit', c.disk, 'level=1'], { env: { ...process.env, REDOFS_DELAY: 'commit.chunk:3000', DEBUG: 'redofs:fault' }, stdio: ['ignore', 'ignore', 'pipe'] })
  let cerr = ''
  commit.stderr.on('data', (b: Buffer) => { cerr += b.toString() })
  const committed = new Promise<number | null>(resolve => commit.on('close', code => resolve(code)))
  while (!cerr.includes('commit.chunk: waiting')) await new Promise(resolve => setTimeout(resolve, 10))
  commit.kill('SIGSTOP')
  // the export of generation 0 reads the base's descriptor and first extent, then stops before
  // its second: the commit runs to its end meanwhile (--ignore-cid: the stamped CID no longer
  // matches what disk-000001 names)
  const out = path.join(c.root, 'g0.raw')
  const r = await stoppedReader(t, ['export', '--ignore-cid', `${c.disk}@0`, out], 'extent.open', path.join(c.vmDir, 'disk-s002.vmdk'), async () => {
    commit.kill('SIGCONT')
    t.is(await committed, 0, cerr)
  })
  t.is(r.code, 1, r.stderr)
  t.regex(r.stderr, /^redofs: .*@0: generation 0 changed while it was read \(.*disk-000001\.vmdk: merged or removed since it was opened\)/m, r.stderr)
})

test('an export of a raw ESX 2.x base that a commit of its .REDO file changes meanwhile fails (no CID to tell)', async t => {
  const dir = await tmp()
  const vm = path.join(dir, 'store', 'vm')
  await mkdir(vm, { recursive: true })
  await writeFile(path.join(vm, 'disk.vmdk'), Buffer.alloc(4096 * 512, 0x61))
  const redo = path.join(vm, 'disk.vmdk.REDO')
  await makeCowd(redo, 4096, [{ sector: 8, data: Buffer.alloc(4096, 0x62) }])
  const fh = await open(redo, 'r+')
  await fh.write(Buffer.from('disk.vmdk\0'), 0, 10, 32) // the parent, named in the COWD header
  await fh.close()
  const r = await stoppedReader(t, ['export', `${redo}@0`, path.join(dir, 'g0.raw')], 'reader', '', async () => { await redofsOk(['commit', redo, 'level=0']) })
  t.is(r.code, 1, r.stderr)
  t.regex(r.stderr, /^redofs: .*@0: generation 0 changed while it was read \(.*disk\.vmdk: written since it was opened\)/m, r.stderr)
})

test('a journal an interrupted commit left is no change: the generations above the one it merges into still export', async t => {
  const { c, refs } = await fourLevels('monolithicSparse')
  // killed while merging disk-000002.vmdk into disk-000001.vmdk: generation 1 is in flux
  const k = await run(process.execPath, [REDOFS_BIN, 'commit', c.files[3], 'level=1'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.copy' } })
  t.not(k.code, 0, describe(k))
  for (const g of [2, 3]) {
    const out = path.join(c.root, `after-crash-g${g}.raw`)
    await redofsOk(['export', `${c.files[3]}@${g}`, out])
    t.true((await sameContent(out, refs[g])).same, `generation ${g}`)
  }
  t.is((await redofs(['export', `${c.files[3]}@1`, path.join(c.root, 'g1.raw')])).code, 1)
})

test('a reader whose open reads a layer while a commit writes it opens once more, and reads the generation whole', async t => {
  const { c, refs } = await fourLevels('monolithicSparse')
  const out = path.join(c.root, 'g1.raw')
  // the export stops after it sized disk-000002.vmdk and before it reads its tables; the commit
  // of level 0 meanwhile grows that file, re-stamps its CID and drops disk-000003.vmdk
  const r = await stoppedReader(t, ['export', `${c.disk}@1`, out], 'extent.open', c.files[2], async () => { await redofsOk(['commit', c.disk, 'level=0']) })
  t.is(r.code, 0, r.stderr)
  t.true((await sameContent(out, refs[1])).same)
})

test('a reader that fails to open twice beside a commit journal says a commit is at work', async t => {
  const { c } = await fourLevels('monolithicSparse')
  // a commit of level 0 killed in its copy leaves disk-000002.vmdk's journal; then disk-000001's
  // header is damaged for good
  const k = await run(process.execPath, [REDOFS_BIN, 'commit', c.disk, 'level=0'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.copy' } })
  t.not(k.code, 0, describe(k))
  const fh = await open(c.files[1], 'r+')
  await fh.write(Buffer.alloc(4), 0, 4, 0)
  await fh.close()
  const r = await exportGen(c.files[3], 1, path.join(c.root, 'g1.raw'))
  assertOneLineError(t, r, { mustName: ['disk-000001.vmdk', 'disk-000002.vmdk.redofs-commit'], keyword: /a commit is at work in .*: run the command again once it has ended/ })
})

test('a mount\'s scan answers the top\'s children from its index; an open that finishes a crashed commit reads the store again', async t => {
  const { c } = await fourLevels('monolithicSparse')
  // the index is what the open uses: a child only it knows of is the top's
  const fake = path.join(c.vmDir, 'only-in-the-index.vmdk')
  const told = await ParentIndex.of([{ path: fake, parent: c.files[3], extentOnly: false }])
  const a = await Chain.open(c.files[3], { writable: true, root: c.store, parents: told })
  t.deepEqual(a.topChildren, [fake])
  await a.close()
  // a commit of level 0 killed in its copy: the open finishes it, dropping disk-000003.vmdk, so
  // an index read before names a child of the new top that is gone
  const k = await run(process.execPath, [REDOFS_BIN, 'commit', c.disk, 'level=0'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.copy' } })
  t.not(k.code, 0, describe(k))
  const before = await ParentIndex.of(await peekDirs([c.vmDir]))
  t.deepEqual(await before.childrenOf(c.files[2]), [c.files[3]])
  const b = await Chain.open(c.files[3], { writable: true, root: c.store, parents: before })
  t.is(b.recovered.length, 1)
  t.is(b.top.path, c.files[2])
  t.deepEqual(b.topChildren, [], 'the stale index made the new top another chain\'s parent')
  t.is(await before.childrenOf(c.files[2]), undefined)
  await b.close()
})

test('a commit that fails before it copies anything keeps the parent\'s label; one killed after its journal ends with the child\'s label on the parent', async t => {
  // a redo log of one chunk under the top: its copy fails before it writes (see above)
  const c = await storeChain(await tmp(), 16 * M, [{ writes: FOUR_LEVELS[0] }, { writes: [{ pattern: 0x55, offset: 0, length: 4096 }] }, {}])
  for (const [g, name] of [[0, 'L0'], [1, 'L1']] as const) await redofsOk(['label', c.disk, `gen=${g}`, `name=${name}`])
  const labels = async (): Promise<Array<string | null>> => (await infoJson(c.disk)).layers.map(x => x.label)
  t.deepEqual(await labels(), ['L0', 'L1', null])
  const r = await failingCommit(t, c.disk, 1, 1)
  t.regex(r.stderr, /nothing was copied, every generation is unchanged/)
  t.deepEqual(await labels(), ['L0', 'L1', null])
  // killed right after its journal: the next writable open finishes it, and generation 0 (now
  // the old generation 1) carries L1
  const k = await run(process.execPath, [REDOFS_BIN, 'commit', c.disk, 'level=1'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.journal' } })
  t.not(k.code, 0, describe(k))
  const f = await redofs(['label', c.disk, 'gen=0', 'name=L1'])
  t.regex(f.stderr, /finished the interrupted commit of .*disk-000001\.vmdk/, describe(f))
  t.deepEqual(await labels(), ['L1', null])
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
