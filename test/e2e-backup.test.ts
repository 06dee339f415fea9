/**
 * E2E acceptance 3 and 9 (SPEC §3): the ESX two-redo hot backup, run in shell on a disk under
 * continuous writes, and `cp` of a frozen generation while the live file is being written.
 */
import test from 'ava'
import { createHash } from 'node:crypto'
import { spawn } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { e2e, readRange, requireFuse, sh, sleep } from './helpers/mount'
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

  // writes up to 1 MiB: the kernel splits them into several FUSE requests, and the exact-prefix
  // check below holds only because an addredo never falls between two requests of one write(2)
  const w = await Writer.start({ target: srv.img('vm1', 'disk'), shadow, size: SIZE, seed: 31, minLen: 1, maxLen: M })
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

test('a write(2) bigger than one FUSE request is never split by addredo: each frozen generation holds all of it or none', async t => {
  const root = await ctx.tmp()
  // the base byte is one no write uses (writes fill with 1..250)
  const BASE = 0xff
  const c = await storeChain(root, SIZE, [{ writes: [{ pattern: BASE, offset: 0, length: 8 * M }] }])
  const srv = await ctx.mount(c.store, path.join(root, 'mnt'))
  // one unaligned region rewritten over and over, each write(2) a different byte value: the
  // kernel sends each as ~17 requests (a partial first page, then 128 KiB pieces)
  const POS = 3 * M + 777
  const LEN = 2 * M + 4321
  const writer = `
    const fs = require('fs'); const [file, ms] = process.argv.slice(1)
    const fd = fs.openSync(file, 'r+'); const b = Buffer.alloc(${LEN}); let i = 0
    const end = Date.now() + Number(ms)
    while (Date.now() < end) {
      b.fill(i % 250 + 1)
      const n = fs.writeSync(fd, b, 0, b.length, ${POS})
      if (n !== b.length) throw new Error('short write: ' + n)
      if (i++ === 0) console.log('started')
    }
    console.log(i)`
  const proc = spawn(process.execPath, ['-e', writer, srv.img('vm1', 'disk'), '4000'], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  proc.stdout.setEncoding('utf8').on('data', (d: string) => { out += d })
  proc.stderr.setEncoding('utf8').on('data', (d: string) => { err += d })
  const exited = new Promise<number | null>(resolve => proc.on('exit', code => resolve(code)))
  for (let i = 0; i < 100 && !out.includes('started'); i++) await sleep(20)
  t.true(out.includes('started'), `the writer did not start: ${err}`)
  const ADDS = 6
  for (let k = 0; k < ADDS; k++) {
    await srv.commandOk('vm1', 'disk', 'addredo')
    await sleep(150 + 97 * k)
  }
  t.is(await exited, 0, `writer: ${err}`)
  const writes = Number(out.trim().split('\n').pop())
  t.log(`${writes} writes of ${LEN} bytes, ${ADDS} addredos`)
  t.true(writes > ADDS, 'the writer kept writing across the addredos')

  const seen = new Set<number>()
  // generation g is what the disk held at addredo number g + 1 (the writer wrote into the base first)
  for (let g = 0; g < ADDS; g++) {
    const b = await readRange(srv.img('vm1', 'disk', g), POS, LEN)
    const uniform = b.equals(Buffer.alloc(LEN, b[0]))
    const mixed = uniform ? '' : [...new Set(b)].join(', ')
    t.true(uniform, `generation ${g} holds parts of different writes (byte values ${mixed})`)
    t.not(b[0], BASE, `generation ${g} holds none of the writes`)
    seen.add(b[0])
  }
  const live = await readRange(srv.img('vm1', 'disk'), POS, LEN)
  t.true(live.equals(Buffer.alloc(LEN, (writes - 1) % 250 + 1)), 'the live file holds the last write')
  t.true(seen.size > 1, 'the generations froze different writes')
  await srv.stopClean(t)
})
