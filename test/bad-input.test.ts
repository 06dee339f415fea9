/**
 * Acceptance 6: each kind of bad input makes `redofs export` and `redofs info` exit non-zero with
 * a clear one-line error naming the file and the problem, no stack trace, and no file modified.
 */
import test from 'ava'
import { mkdir, open, readFile, symlink } from 'node:fs/promises'
import path from 'node:path'
import { damageCases } from './helpers/damage'
import { requireEnv } from './helpers/env'
import { firstDifference } from './helpers/model'
import { describe, mustRun, snapshotTree } from './helpers/qemu'
import { assertOneLineError, exportGen, redofs } from './helpers/redofs'
import { tmpDirs } from './helpers/tmp'

requireEnv(test)
const tmp = tmpDirs(test)

for (const dc of damageCases) {
  test(`${dc.title}: export${dc.infoRefuses ? ' and info' : ''} refuse with a one-line error, nothing modified`, async t => {
    const d = await dc.build(await tmp())
    const outDir = await tmp()
    const before = await snapshotTree(d.root)

    const ex = await exportGen(d.top, undefined, path.join(outDir, 'out.raw'))
    assertOneLineError(t, ex, d.error)
    if (dc.infoRefuses) {
      const info = await redofs(['info', d.top])
      assertOneLineError(t, info, d.error)
      const infoJ = await redofs(['info', '--json', d.top])
      t.not(infoJ.code, 0, describe(infoJ))
    }
    t.deepEqual(await snapshotTree(d.root), before, 'no file in the store was modified')
  })
}

test('CID mismatch: --ignore-cid overrides, then export returns the layers as they are', async t => {
  const dc = damageCases.find(c => c.title.startsWith('CID mismatch'))
  if (!dc) { t.fail('CID case missing'); return }
  const d = await dc.build(await tmp())
  const outDir = await tmp()
  const before = await snapshotTree(d.root)
  const out = path.join(outDir, 'out.raw')
  const r = await exportGen(d.top, undefined, out, ['--ignore-cid'])
  t.is(r.code, 0, describe(r))
  if (r.code === 0 && d.ignoreCidImage) {
    const got = await readFile(out)
    t.is(firstDifference(got, d.ignoreCidImage), -1, 'export with --ignore-cid = parent as it is now + child grains')
  }
  const info = await redofs(['info', '--ignore-cid', d.top])
  t.is(info.code, 0, describe(info))
  t.deepEqual(await snapshotTree(d.root), before, 'no file in the store was modified')
})

test('hint leaving the store is accepted when --store names a root that contains both files', async t => {
  const dc = damageCases.find(c => c.title.startsWith('parentFileNameHint leaving'))
  if (!dc) { t.fail('store-escape case missing'); return }
  const d = await dc.build(await tmp())
  const outDir = await tmp()
  const r = await exportGen(d.top, undefined, path.join(outDir, 'out.raw'), ['--store', d.root])
  t.is(r.code, 0, describe(r))
})

test('containment goes by where files really are: an absolute hint through a symlink to the store is inside; a relative one out of it, or a symlink out of it, is not', async t => {
  const root = await tmp()
  const real = path.join(root, 'real')
  await mkdir(path.join(real, 'vm'), { recursive: true })
  await mkdir(path.join(root, 'out'))
  await symlink(real, path.join(root, 'link'))
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', path.join(real, 'vm', 'base.vmdk'), '1M'])
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', path.join(root, 'out', 'x.vmdk'), '1M'])
  // qemu-img writes the hint as given: absolute, through the link
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', path.join(root, 'link', 'vm', 'base.vmdk'), '-F', 'vmdk', path.join(real, 'vm', 'a.vmdk')])
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', path.join(real, 'vm', 'base.vmdk'), '-F', 'vmdk', path.join(real, 'vm', 'b.vmdk')])
  for (const [store, file] of [[real, 'a.vmdk'], [path.join(root, 'link'), 'b.vmdk']]) {
    const r = await exportGen(path.join(store, 'vm', file), undefined, path.join(root, `${file}.raw`), ['--store', store])
    t.is(r.code, 0, describe(r))
  }
  await symlink('../../out', path.join(real, 'vm', 'outlink'))
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', '../../out/x.vmdk', '-F', 'vmdk', path.join(real, 'vm', 'c.vmdk')])
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'outlink/x.vmdk', '-F', 'vmdk', path.join(real, 'vm', 'd.vmdk')])
  for (const file of ['c.vmdk', 'd.vmdk']) {
    const r = await exportGen(path.join(real, 'vm', file), undefined, path.join(root, `${file}.raw`), ['--store', path.join(root, 'link')])
    assertOneLineError(t, r, { mustName: [file, 'out/x.vmdk'], keyword: /outside the store/ })
  }
})

test('a damaged redo log is not skipped: commands given the disk name refuse it (naming the file) instead of serving or writing its parent', async t => {
  const root = await tmp()
  const vm = path.join(root, 'vm')
  const disk = path.join(vm, 'd')
  t.is((await redofs(['create', disk, '--size', '4M'])).code, 0)
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0xaa 0 1M', path.join(vm, 'd.vmdk')])
  t.is((await redofs(['addredo', disk])).code, 0)
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0xbb 1M 1M', path.join(vm, 'd-000001.vmdk')])
  // the redo log's magic destroyed: it can no longer be read as a VMDK
  const fh = await open(path.join(vm, 'd-000001.vmdk'), 'r+')
  await fh.write(Buffer.from('XXXX'), 0, 4, 0)
  await fh.close()
  const before = await snapshotTree(root)
  const out = path.join(await tmp(), 'out.raw')
  const check = await redofs(['check', disk])
  t.is(check.code, 1, describe(check))
  t.regex(check.stdout, /d-000001\.vmdk: not a VMDK file/)
  for (const args of [['info', disk], ['export', disk, out], ['addredo', disk], ['commit', disk, 'level=0'], ['discard', disk], ['map', disk]]) {
    const r = await redofs(args)
    assertOneLineError(t, r, { mustName: ['d-000001.vmdk'], keyword: /not a VMDK/ })
  }
  // a file named explicitly fixes its own chain: reading the intact base stays possible
  const salvage = await redofs(['export', path.join(vm, 'd.vmdk'), out])
  t.is(salvage.code, 0, describe(salvage))
  const wr = await redofs(['addredo', path.join(vm, 'd.vmdk')])
  assertOneLineError(t, wr, { mustName: ['d-000001.vmdk'], keyword: /not a VMDK/ })
  t.deepEqual(await snapshotTree(root), before, 'a file in the store was modified')
})
