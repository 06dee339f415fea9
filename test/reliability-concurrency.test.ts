/**
 * Eight processes read and write at random offsets and sizes while addredo and commit run
 * between them; the disk ends equal to a model of the same writes, and nothing deadlocks.
 */
import test, { type ExecutionContext } from 'ava'
import { readFile, rm, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { REDOFS_BIN } from './helpers/env'
import { createDisk, e2e, fuseWorkers, requireFuse, type Server } from './helpers/mount'
import { describe, mustRun, run } from './helpers/qemu'
import { infoJson } from './helpers/redofs'

const ok = requireFuse(test)
const env = e2e(test)

/** A 16 MiB sparse disk vm/disk filled with 0x44 by qemu-io, its store mounted. */
async function mountedFilledDisk (): Promise<{ dir: string, store: string, server: Server }> {
  const dir = await env.tmp()
  const store = path.join(dir, 'store')
  await createDisk(store, 'vm', 'disk', '16M')
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x44 0 16M', path.join(store, 'vm', 'disk.vmdk')])
  return { dir, store, server: await env.mount(store, path.join(dir, 'mnt')) }
}

/** Unmount cleanly, then `redofs check` the disk. */
async function stopAndCheck (t: ExecutionContext, server: Server, store: string): Promise<void> {
  await server.stopClean(t)
  const c = await run(process.execPath, [REDOFS_BIN, 'check', path.join(store, 'vm', 'disk')])
  t.is(c.code, 0, describe(c))
}

const DISK = 64 << 20
const PROCS = 8
const STRIPE = DISK / PROCS

/**
 * Worker: owns stripe `id` of the disk; applies seeded random writes (1 byte .. 300 KiB, any
 * alignment) and reads back random ranges of its stripe, checking them against its own model.
 * Prints the sha256 of its final model. Other workers never touch the stripe, so the final
 * content is exact whatever the interleaving.
 */
const WORKER = `
const fs = require('fs'), crypto = require('crypto')
const [file, idS, opsS, stripeS] = process.argv.slice(1)
const id = Number(idS), ops = Number(opsS), stripe = Number(stripeS), base = id * stripe
let a = (id + 1) * 2654435761 >>> 0
const rnd = () => { a = (a + 0x6d2b79f5) >>> 0; let x = a; x = Math.imul(x ^ (x >>> 15), x | 1); x ^= x + Math.imul(x ^ (x >>> 7), x | 61); return ((x ^ (x >>> 14)) >>> 0) / 4294967296 }
const model = Buffer.alloc(stripe)
const fd = fs.openSync(file, 'r+')
fs.readSync(fd, model, 0, stripe, base) // what the disk holds now
for (let i = 0; i < ops; i++) {
  const len = 1 + Math.floor(rnd() ** 3 * 300 * 1024)
  const off = Math.floor(rnd() * (stripe - len))
  if (rnd() < 0.6) {
    const buf = crypto.randomBytes(len)
    fs.writeSync(fd, buf, 0, len, base + off)
    buf.copy(model, off)
  } else {
    const buf = Buffer.alloc(len)
    const n = fs.readSync(fd, buf, 0, len, base + off)
    if (n !== len || !buf.equals(model.subarray(off, off + len))) { console.log('MISMATCH at ' + (base + off) + ' len ' + len); process.exit(3) }
  }
}
fs.fsyncSync(fd)
console.log(crypto.createHash('sha256').update(model).digest('hex'))
`

if (ok) {
  test.serial('eight readers/writers with addredo and commit between them end equal to the model, without deadlock', async t => {
    t.timeout(240_000)
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '64M')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', `write -P 0x44 0 ${DISK}`, path.join(store, 'vm', 'disk.vmdk')])
    const server = await env.mount(store, path.join(dir, 'mnt'))
    const img = server.img('vm', 'disk')
    const workers = Array.from({ length: PROCS }, async (_, id) => await run(process.execPath, ['-e', WORKER, img, String(id), '400', String(STRIPE)], { timeoutMs: 200_000 }))
    // shape changes while they run: addredo, commit level=1 without freeze, commit level=0
    let cycles = 0
    let done = false
    const all = Promise.all(workers).finally(() => { done = true })
    const errors: string[] = []
    while (!done && cycles < 12) {
      for (const [cmd, line] of [['addredo', ''], ['addredo', ''], ['commit', 'level=1 freeze=0'], ['commit', 'level=0']]) {
        const r = await server.command('vm', 'disk', cmd, line)
        if (r.code !== 0) errors.push(`${cmd} ${line}: ${await server.errorText('vm', 'disk')}`)
      }
      cycles++
    }
    const results = await all
    t.deepEqual(errors, [], 'control commands failed under load')
    t.true(cycles >= 1)
    for (const [id, r] of results.entries()) t.is(r.code, 0, `worker ${id}\n${describe(r)}`)
    const image = await readFile(img)
    for (let id = 0; id < PROCS; id++) {
      const sha = (await import('node:crypto')).createHash('sha256').update(image.subarray(id * STRIPE, (id + 1) * STRIPE)).digest('hex')
      t.is(sha, results[id].stdout.trim(), `stripe ${id} differs from its model`)
    }
    await stopAndCheck(t, server, store)
  })

  test.serial('direct reads of the live file while commits and discards drop layers it reads from: none fails, every read is whole and right', async t => {
    t.timeout(240_000)
    const { dir, store, server } = await mountedFilledDisk()
    const live = server.img('vm', 'disk')
    const sha = async (f: string): Promise<string> => (await mustRun('sh', ['-c', 'dd if="$1" bs=1M iflag=direct status=none | sha256sum', 'sh', f])).stdout.split(' ')[0]
    // O_DIRECT readers: every byte is a request the server plans, until the stop file appears
    // (frozen generations cannot be read here: commit and discard refuse while they are open)
    const stop = path.join(dir, 'stop')
    // each line: start and end of one whole read (ms since the epoch), its hash
    const reader = async (): Promise<Array<{ start: number, end: number, hash: string }>> => {
      const r = await run('bash', ['-c', 'while [ ! -e "$2" ]; do s=$(date +%s%3N); h=$(dd if="$1" bs=64k iflag=direct status=none | sha256sum | cut -c1-64 || echo FAILED); echo "$s $(date +%s%3N) $h"; done', 'bash', live, stop], { timeoutMs: 200_000 })
      if (r.code !== 0) return [{ start: 0, end: 0, hash: `reader exited ${r.code}: ${r.stderr}` }]
      return r.stdout.trim().split('\n').map(l => { const [a, b, h] = l.split(' '); return { start: Number(a), end: Number(b), hash: h } })
    }
    await server.commandOk('vm', 'disk', 'addredo')
    const errors: string[] = []
    let reads = 0
    let overlapping = 0
    for (let cycle = 0; cycle < 6; cycle++) {
      // data of its own in the top, then a fresh top over it: the live file reads that data
      // from the layer below the top, which commit level=1 merges into the base and drops
      // (closing its descriptor) while the readers read; addredo and discard change the top
      // under them too. The live file reads the same throughout.
      await mustRun('dd', ['if=/dev/urandom', `of=${live}`, 'bs=64k', `seek=${cycle * 20 + 3}`, 'count=20', 'conv=notrunc,fsync', 'status=none'])
      await server.commandOk('vm', 'disk', 'addredo')
      const want = await sha(live)
      await rm(stop, { force: true })
      const readers = [reader(), reader()]
      await new Promise(resolve => setTimeout(resolve, 100))
      const windows: Array<[number, number]> = []
      for (const [cmd, line] of [['commit', 'level=1'], ['addredo', ''], ['discard', '']]) {
        const t0 = Date.now()
        const r = await server.command('vm', 'disk', cmd, line)
        windows.push([t0, Date.now()])
        if (r.code !== 0) errors.push(`cycle ${cycle} ${cmd} ${line}: ${await server.errorText('vm', 'disk')}`)
        await new Promise(resolve => setTimeout(resolve, 50))
      }
      await writeFile(stop, '')
      let during = 0
      for (const rs of await Promise.all(readers)) {
        reads += rs.length
        during += rs.filter(r => windows.some(([a, b]) => r.start <= b && r.end >= a)).length
        const bad = rs.filter(r => r.hash !== want)
        if (bad.length > 0) errors.push(`cycle ${cycle}: ${bad.length} of ${rs.length} reads of the live file differ (${bad[0].hash})`)
      }
      if (during === 0) errors.push(`cycle ${cycle}: no read was in flight while a command ran: the cycle proves nothing`)
      overlapping += during
      const st = await server.status('vm', 'disk')
      if (st.redoLogs !== 1) errors.push(`cycle ${cycle}: ${st.redoLogs} redo logs, not 1`)
    }
    t.deepEqual(errors, [])
    t.log(`${reads} whole reads of the live file, ${overlapping} of them while a commit, addredo or discard ran, during 6 x (commit, addredo, discard)`)
    await stopAndCheck(t, server, store)
  })

  test.serial('overwrites of the live file while commits and addredos switch its layers: no write is lost or lands in a dropped layer', async t => {
    t.timeout(240_000)
    const { dir, store, server } = await mountedFilledDisk()
    const K64 = 65536
    const BLOCKS = 32
    const BASE = 3 * 1024 * 1024 // the region the writer rewrites: 2 MiB from 3 MiB on
    const live = server.img('vm', 'disk')
    await server.commandOk('vm', 'disk', 'addredo')
    await server.commandOk('vm', 'disk', 'addredo')
    // write(2)s of 64 KiB, one at a time (each reaches the server before it returns): pass p
    // fills block i with the byte (32p + i) % 251 + 1, until the stop file appears; the last
    // write made is printed. Overwrites of grains the top holds are planned for the FUSE
    // workers; the first pass after an addredo allocates (JS).
    const stop = path.join(dir, 'stop')
    const writer = `
      const fs = require('fs')
      const [file, stop, base] = process.argv.slice(1)
      const fd = fs.openSync(file, 'r+')
      const buf = Buffer.alloc(${K64})
      let p = 0, i = 0, n = 0
      for (;; p++) {
        for (i = 0; i < ${BLOCKS}; i++) {
          buf.fill((p * ${BLOCKS} + i) % 251 + 1)
          fs.writeSync(fd, buf, 0, ${K64}, Number(base) + i * ${K64})
          n++
        }
        if (fs.existsSync(stop)) break
      }
      fs.closeSync(fd)
      process.stdout.write(JSON.stringify({ pass: p, writes: n }))`
    const errors: string[] = []
    const w0 = (await fuseWorkers(server.proc.pid as number)).wchar
    const started = run(process.execPath, ['-e', writer, live, stop, String(BASE)], { timeoutMs: 200_000 })
    for (let cycle = 0; cycle < 5; cycle++) {
      // three redo logs, back to two (level 1, I/O flowing), back to one (level 0, frozen), two
      for (const [cmd, line] of [['addredo', ''], ['commit', 'level=1 freeze=0'], ['commit', 'level=0'], ['addredo', '']]) {
        await new Promise(resolve => setTimeout(resolve, 60))
        const r = await server.command('vm', 'disk', cmd, line)
        if (r.code !== 0) errors.push(`cycle ${cycle} ${cmd} ${line}: ${await server.errorText('vm', 'disk')}`)
      }
    }
    await writeFile(stop, '')
    const w = await started
    t.is(w.code, 0, describe(w))
    const { pass, writes } = JSON.parse(w.stdout) as { pass: number, writes: number }
    const byWorkers = (await fuseWorkers(server.proc.pid as number)).wchar - w0
    // the last pass is whole (the writer stops between passes)
    const want = Buffer.alloc(16 << 20, 0x44)
    for (let i = 0; i < BLOCKS; i++) want.fill((pass * BLOCKS + i) % 251 + 1, BASE + i * K64, BASE + (i + 1) * K64)
    const wantSha = (await import('node:crypto')).createHash('sha256').update(want).digest('hex')
    const sha = async (f: string, direct: boolean): Promise<string> => (await mustRun('sh', ['-c', `dd if="$1" bs=1M ${direct ? 'iflag=direct ' : ''}status=none | sha256sum`, 'sh', f])).stdout.split(' ')[0]
    t.deepEqual(errors, [])
    t.is(await sha(live, true), wantSha, `the live file holds every block's last write (pass ${pass}) and the base elsewhere`)
    // sanity, not speed: the writer ran through the changes and the planned path was taken
    t.true(writes >= 2 * BLOCKS, `only ${writes} writes during 20 commands: the test proves little`)
    t.true(byWorkers >= 16 * K64, `the FUSE workers wrote ${byWorkers} bytes: none of the ${writes} writes was a planned overwrite`)
    t.log(`${writes} writes (${pass + 1} passes), ${Math.round(byWorkers / 1048576)} MiB of them by the FUSE workers, during 5 x (addredo, commit level=1, commit level=0, addredo)`)
    await stopAndCheck(t, server, store)
    const layers = (await infoJson(path.join(store, 'vm', 'disk'))).layers
    const top = path.resolve(path.join(store, 'vm'), layers[layers.length - 1].file)
    const raw = path.join(dir, 'top.raw')
    await mustRun('qemu-img', ['convert', '-f', 'vmdk', '-O', 'raw', top, raw])
    t.is(await sha(raw, false), wantSha, `qemu-img convert of the top (${path.basename(top)}, ${layers.length} layers) holds the same`)
  })

  test.serial('addredo on twenty disks at once completes: the write barriers do not exhaust the thread pool', async t => {
    t.timeout(120_000)
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    const N = 20
    for (let i = 0; i < N; i++) await createDisk(store, 'vm', `d${i}`, '8M')
    const server = await env.mount(store, path.join(dir, 'mnt'))
    // every barrier blocks a thread-pool thread (16) in fsync on the mount until it is answered
    const ctl = path.join(server.mnt, '.ctl', 'vm')
    const r = await run('bash', ['-c', `for i in $(seq 0 ${N - 1}); do echo > "$1/d$i/addredo" & done; wait`, 'bash', ctl], { timeoutMs: 60_000 })
    t.is(r.code, 0, describe(r))
    for (let i = 0; i < N; i++) {
      const st = JSON.parse(await readFile(path.join(ctl, `d${i}`, 'status'), 'utf8')) as { redoLogs: number }
      t.is(st.redoLogs, 1, `disk d${i}`)
    }
    await server.stopClean(t)
  })
}

