/**
 * E2E acceptance 4 (SPEC §3): `commit level=0` freezes the live file (writes issued during it
 * wait, then succeed; none fails), and `commit wait=0` returns at once with the job visible in
 * `status` until it completes.
 */
import test from 'ava'
import { readdir } from 'node:fs/promises'
import path from 'node:path'
import { e2e, requireFuse, sh, sleep, waitFor, type DiskStatus, type JobStatus, type Server } from './helpers/mount'
import { convertToRaw, describe, mustRun, qemuCheck, sameContent } from './helpers/qemu'
import { storeChain, type StoreChain } from './helpers/store'
import { Writer } from './helpers/writer'

requireFuse(test)
const ctx = e2e(test)

const M = 1024 * 1024
const SIZE = 256 * M

let root: string
let chain: StoreChain
let srv: Server
let shadow: string

test.before(async () => {
  root = await ctx.tmp()
  // two big redo logs (128 MiB of data each), so that each commit copies a lot
  chain = await storeChain(root, SIZE, [
    { writes: [{ pattern: 0x01, offset: 0, length: 8 * M }] },
    { writes: [{ pattern: 0x11, offset: 3 * M + 5, length: 128 * M }] },
    { writes: [{ pattern: 0x21, offset: 100 * M - 7, length: 128 * M }] }
  ])
  shadow = path.join(root, 'shadow.raw')
  await convertToRaw(chain.files[2], shadow)
  srv = await ctx.mount(chain.store, path.join(root, 'mnt'))
})

test.serial('commit level=0 freezes the live file: writes issued during it wait and then succeed, none fails', async t => {
  const before = await srv.status('vm1', 'disk')
  t.is(before.redoLogs, 2)
  // two writers on separate halves of the disk, both mirrored into the shadow raw file
  const common = { target: srv.img('vm1', 'disk'), shadow, size: SIZE, minLen: 512, maxLen: 64 * 1024 }
  const w1 = await Writer.start({ ...common, seed: 1, lo: 0, hi: SIZE / 2 })
  const w2 = await Writer.start({ ...common, seed: 2, lo: SIZE / 2, hi: SIZE })
  await Promise.all([w1.waitWrites(10), w2.waitWrites(10)])
  const tStart = Date.now()
  const r = await sh('echo level=0 > "$1"', [srv.ctl('vm1', 'disk', 'commit')])
  const tEnd = Date.now()
  const n1 = w1.writes.length
  const n2 = w2.writes.length
  await Promise.all([w1.waitWrites(n1 + 10), w2.waitWrites(n2 + 10)])
  t.is(await w1.stop(), 0, w1.stderr)
  t.is(await w2.stop(), 0, w2.stderr)
  t.is(r.code, 0, `${describe(r)}\nerror: ${await srv.errorText('vm1', 'disk')}`)
  t.deepEqual([...w1.errors, ...w2.errors], [], 'no write failed')
  // the writers kept issuing writes while the commit ran: those waited and then succeeded
  const during = [...w1.writes, ...w2.writes].filter(w => w.t0 >= tStart && w.t0 <= tEnd)
  t.true(during.length >= 1, `no write was issued while the commit ran (${tStart}..${tEnd}); the test proves nothing`)
  t.log(`${during.length} writes issued during the commit; writes in total: ${w1.writes.length + w2.writes.length}`)
  const st = await srv.status('vm1', 'disk')
  t.is(st.redoLogs, 1, 'the chain is one shorter')
  t.is(st.job, null)
  t.is(st.lastJob?.kind, 'commit')
  t.is(st.lastJob?.state, 'done')
  const c = await sameContent(srv.img('vm1', 'disk'), shadow)
  t.true(c.same, `live content vs the shadow copy that got the same writes: ${c.detail}`)
  // the merged redo log is renamed aside at the switch and deleted in the background after it;
  // the next change of the chain waits for that (no new file takes a name still being deleted)
  t.false((await readdir(chain.vmDir)).includes(path.basename(chain.files[2])), 'the merged redo log is gone')
  const dropped = async (): Promise<string[]> => (await readdir(chain.vmDir)).filter(f => f.includes('redofs-'))
  await srv.commandOk('vm1', 'disk', 'addredo')
  t.deepEqual(await dropped(), [], 'addredo returned while the merged redo log was still being deleted')
  await srv.commandOk('vm1', 'disk', 'discard')
  t.true(await waitFor(async () => (await dropped()).length === 0, 100, 100), `left behind: ${(await dropped()).join(', ')}`)
})

test.serial('commit wait=0 returns at once; status shows the running job with its progress, then lastJob done', async t => {
  const before = await srv.status('vm1', 'disk')
  t.is(before.redoLogs, 1)
  // the status is read by the same shell right after the write returned: a write that waited
  // for the ~250 MiB merge would leave no running job to see
  const r = await sh('echo "level=0 wait=0" > "$1" && cat "$2"', [srv.ctl('vm1', 'disk', 'commit'), srv.ctl('vm1', 'disk', 'status')])
  t.is(r.code, 0, describe(r))
  const first = JSON.parse(r.stdout) as DiskStatus
  t.not(first.job, null, `status right after "commit wait=0" shows no running job:\n${r.stdout}`)
  t.is(first.job?.kind, 'commit')
  t.is(first.job?.state, 'running')
  const seen: JobStatus[] = []
  let st = first
  for (let i = 0; i < 3000 && st.job !== null; i++) {
    seen.push(st.job)
    t.true(st.job.done <= st.job.total || st.job.total === 0, `progress ${st.job.done}/${st.job.total}`)
    await sleep(20)
    st = await srv.status('vm1', 'disk')
  }
  t.is(st.job, null, 'the job finished')
  t.is(st.lastJob?.kind, 'commit')
  t.is(st.lastJob?.state, 'done', JSON.stringify(st.lastJob))
  t.true((st.lastJob?.total ?? 0) > 0, 'the finished job reports how much it copied')
  t.is(st.lastJob?.done, st.lastJob?.total)
  t.is(st.redoLogs, 0)
  t.is(st.error, '')
  const progressed = seen.filter(j => j.total > 0)
  t.log(`${seen.length} status reads while running, ${progressed.length} with progress (last ${JSON.stringify(progressed.at(-1) ?? null)})`)
  for (let i = 1; i < progressed.length; i++) t.true(progressed[i].done >= progressed[i - 1].done, 'progress never goes back')
  const c = await sameContent(srv.img('vm1', 'disk'), shadow)
  t.true(c.same, `content after the commit: ${c.detail}`)
})

test.serial('the merged redo log is deleted after the command answers, and the next change waits for that (deletion held open 1.5 s here)', async t => {
  const r = await ctx.tmp()
  const c = await storeChain(r, 16 * M, [
    { writes: [{ pattern: 0x31, offset: 0, length: 4 * M }] },
    { writes: [{ pattern: 0x32, offset: M, length: 4 * M }] }
  ])
  const s = await ctx.mount(c.store, path.join(r, 'mnt'), [], { REDOFS_DELAY: 'reap:1500' })
  try {
    const dropped = async (): Promise<string[]> => (await readdir(c.vmDir)).filter(f => f.includes('redofs-'))
    await s.commandOk('vm1', 'disk', 'commit', 'level=0')
    t.deepEqual(await dropped(), [`${path.basename(c.files[1])}.redofs-dropped`], 'the commit answered before deleting')
    await s.commandOk('vm1', 'disk', 'addredo')
    t.deepEqual(await dropped(), [], 'addredo went ahead while the merged redo log was still being deleted')
  } finally {
    await s.stopClean(t)
  }
})

test.serial('after unmount the base holds everything the mount served and passes qemu-img check', async t => {
  await srv.stopClean(t)
  const after = path.join(root, 'after.raw')
  await convertToRaw(chain.files[0], after)
  const c = await sameContent(after, shadow)
  t.true(c.same, c.detail)
  const chk = await qemuCheck(chain.files[0])
  t.is(chk.code, 0, describe(chk))
  const left = await mustRun('ls', [chain.vmDir])
  t.is(left.stdout.trim(), 'disk.vmdk', 'both redo logs are gone')
})
