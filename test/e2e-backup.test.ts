/**
 * E2E acceptance 3 and 9 (SPEC §3): the ESX two-redo hot backup, run in shell on a disk under
 * continuous writes, and `cp` of a frozen generation while the live file is being written.
 */
import test from 'ava'
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { e2e, requireFuse, sh } from './helpers/mount'
import { convertToRaw, describe, mustRun, qemuCheck, qemuWrite, sameContent } from './helpers/qemu'
import { storeChain } from './helpers/store'
import { Writer, blockData } from './helpers/writer'

requireFuse(test)
const ctx = e2e(test)

const M = 1024 * 1024
const SIZE = 64 * M

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

test('two-redo hot backup in shell under a continuous writer: live = shadow copy, backup = the generation the first addredo froze', async t => {
  const root = await ctx.tmp()
  const c = await storeChain(root, SIZE, [{
    writes: [
      { pattern: 0x71, offset: 0, length: 5 * M + 3 },
      { pattern: 0x72, offset: 30 * M - 1, length: 300000 },
      { pattern: 0x73, offset: SIZE - 65536, length: 65536 }
    ]
  }])
  const initial = path.join(root, 'initial.raw')
  await convertToRaw(c.files[0], initial)
  const shadow = path.join(root, 'shadow.raw')
  await mustRun('cp', ['--sparse=always', initial, shadow])
  const srv = await ctx.mount(c.store, path.join(root, 'mnt'))
  const backupDir = path.join(root, 'backup')
  await mustRun('mkdir', ['-p', backupDir])

  // writes of at most 64 KiB (17 pages) reach the server as ONE FUSE request each: a bigger write(2)
  // is split by the kernel (128 KiB requests) and, like a write in flight on a block device, may be
  // torn by a snapshot taken between its requests; the exact-prefix check below assumes no tearing
  const w = await Writer.start({ target: srv.img('vm1', 'disk'), shadow, size: SIZE, seed: 31, minLen: 1, maxLen: 64 * 1024 })
  await w.waitWrites(20)
  t.deepEqual(w.errors, [], 'writer errors before the backup')

  // step 1: generation 0 frozen (timestamps bound which writes it can hold)
  const tAddStart = Date.now()
  const add1 = await sh('cd "$1" && echo > .ctl/vm1/disk/addredo', [srv.mnt])
  const tAddEnd = Date.now()
  t.is(add1.code, 0, describe(add1))
  const nAfterAdd = w.writes.length
  // step 2: the backup agent copies a stable image
  const backup = path.join(backupDir, 'disk@0.img')
  const cp = await sh('cd "$1" && cp --sparse=always vm1/disk@0.img "$2"', [srv.mnt, backup])
  t.is(cp.code, 0, describe(cp))
  await w.waitWrites(nAfterAdd + 50) // the writer kept writing while the copy ran and after it
  // steps 3-5
  const rest = await sh(`cd "$1" &&
    echo > .ctl/vm1/disk/addredo &&
    echo 'level=1 freeze=0' > .ctl/vm1/disk/commit &&
    echo 'level=0' > .ctl/vm1/disk/commit`, [srv.mnt])
  t.is(rest.code, 0, `${describe(rest)}\nerror file: ${await srv.errorText('vm1', 'disk').catch(e => String(e))}`)
  const nAfterCommits = w.writes.length
  await w.waitWrites(nAfterCommits + 10)
  const code = await w.stop()
  t.is(code, 0, `writer exit\n${w.stderr}`)
  t.deepEqual(w.errors, [], 'no write failed during the backup')
  await w.saveLog(path.join(root, 'writes.json'))
  t.log(`writes: ${w.writes.length} (${nAfterAdd} by the end of the first addredo, ${nAfterCommits} by the end of the commits)`)

  const st = await srv.status('vm1', 'disk')
  t.is(st.redoLogs, 0, 'both redo logs are merged back into the base')
  t.is(st.job, null)

  // the live content equals the shadow raw copy that received the same writes
  const live = await sameContent(srv.img('vm1', 'disk'), shadow)
  t.true(live.same, `live disk.img vs shadow: ${live.detail}`)

  // the backup is the content at the moment of the first addredo: the initial content plus a
  // prefix of the writer's (sequential) writes; only writes overlapping the addredo are in doubt
  const kLo = w.writes.filter(x => x.t1 < tAddStart).length
  const kHi = w.writes.filter(x => x.t0 <= tAddEnd).length
  const backupSha = sha(await readFile(backup))
  const image = await readFile(initial)
  w.applyTo(image, kLo)
  let match = -1
  for (let k = kLo; k <= kHi; k++) {
    if (sha(image) === backupSha) { match = k; break }
    if (k < kHi) { const x = w.writes[k]; blockData(w.cfg.seed, x.i, x.len).copy(image, x.pos) }
  }
  t.not(match, -1, `the backup equals no state between write ${kLo} and ${kHi} (the writes around the first addredo)`)

  await srv.stopClean(t)
  const after = path.join(root, 'after.raw')
  await convertToRaw(path.join(c.vmDir, 'disk.vmdk'), after)
  t.true((await sameContent(after, shadow)).same, 'after unmount, the base file holds every write')
  t.is((await qemuCheck(path.join(c.vmDir, 'disk.vmdk'))).code, 0, 'qemu-img check disk.vmdk')
})

test('cp of a frozen generation while another process writes to the live file copies exactly the frozen content', async t => {
  const root = await ctx.tmp()
  const c = await storeChain(root, SIZE, [
    { writes: [{ pattern: 0x81, offset: 0, length: 20 * M + 1 }] },
    { writes: [{ pattern: 0x82, offset: 10 * M - 3, length: 20 * M }, { pattern: 'zero', offset: 2 * M, length: M }] }
  ])
  // generation 1 = base + redo 1 (qemu convert before mounting is the oracle); live = redo 2
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'disk-000001.vmdk', '-F', 'vmdk', 'disk-000002.vmdk'], { cwd: c.vmDir })
  await qemuWrite(path.join(c.vmDir, 'disk-000002.vmdk'), [{ pattern: 0x83, offset: M, length: 4 * M }])
  const want = path.join(root, 'gen1.raw')
  await convertToRaw(c.files[1], want)
  const srv = await ctx.mount(c.store, path.join(root, 'mnt'))

  // the writer overwrites the whole disk, including every region generation 1 holds
  const w = await Writer.start({ target: srv.img('vm1', 'disk'), size: SIZE, seed: 9, minLen: 4096, maxLen: 256 * 1024 })
  await w.waitWrites(10)
  const n0 = w.writes.length
  const copy = path.join(root, 'copy.raw')
  const cp = await sh('cp "$1" "$2"', [srv.img('vm1', 'disk', 1), copy])
  const n1 = w.writes.length
  await w.waitWrites(n1 + 5)
  t.is(await w.stop(), 0, w.stderr)
  t.is(cp.code, 0, describe(cp))
  t.deepEqual(w.errors, [])
  t.log(`writer: ${n1 - n0} writes completed while cp ran`)
  const same = await sameContent(copy, want)
  t.true(same.same, `copy of disk@1.img vs qemu-img convert of ${path.basename(c.files[1])}: ${same.detail}`)
  await srv.stopClean(t)
})
