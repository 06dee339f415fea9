/**
 * Crashes lose nothing acknowledged: the server (or an offline commit) is killed with SIGKILL
 * at chosen metadata-write points (REDOFS_CRASH_AFTER, see src/fault.ts); after a remount every
 * byte acknowledged by a completed fsync is there and every file passes qemu-img check and
 * redofs check. An interrupted commit is finished at the next open and no surviving
 * generation ever reads differently.
 */
import test from 'ava'
import { copyFile, mkdir, open, readdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { Layer } from '../src/formats/layer'
import { REDOFS_BIN } from './helpers/env'
import { infoJson } from './helpers/redofs'
import { createDisk, e2e, isMounted, requireFuse, sh, Server, storeWithRedo } from './helpers/mount'
import { prng } from './helpers/model'
import { mustRun, qemuCheck, run, sha256File, describe } from './helpers/qemu'
import { storeChain } from './helpers/store'
import { gtePosition, readU32, writeAt, writeU32 } from './helpers/vmdk'

const ok = requireFuse(test)
const env = e2e(test)

const BLOCK = 65536
const DISK = 32 << 20

/**
 * A writer in a child process: writes distinct blocks (each once) of seeded random data, fsyncs
 * after every `batch` writes and prints the blocks the fsync covered. It stops at the first error.
 */
const WRITER = `
const fs = require('fs')
const [file, seedS, countS, batchS, blockS, diskS] = process.argv.slice(1)
let a = Number(seedS) >>> 0
const rnd = () => { a = (a + 0x6d2b79f5) >>> 0; let x = a; x = Math.imul(x ^ (x >>> 15), x | 1); x ^= x + Math.imul(x ^ (x >>> 7), x | 61); return ((x ^ (x >>> 14)) >>> 0) / 4294967296 }
const block = Number(blockS), blocks = Number(diskS) / block, count = Number(countS), batch = Number(batchS)
const order = Array.from({ length: blocks }, (_, i) => i)
for (let i = blocks - 1; i > 0; i--) { const j = Math.floor(rnd() * (i + 1)); [order[i], order[j]] = [order[j], order[i]] }
const fd = fs.openSync(file, 'r+')
let pending = []
try {
  for (let k = 0; k < count; k++) {
    const b = order[k]
    const len = k % 3 === 0 ? 4096 : block // some partial-grain writes (copy-on-write)
    const buf = Buffer.alloc(len, (b * 7 + 1) & 255)
    buf.writeUInt32LE(b, 0)
    fs.writeSync(fd, buf, 0, len, b * block)
    pending.push(b + ':' + len)
    if (pending.length >= batch) { fs.fsyncSync(fd); console.log('acked ' + pending.join(' ')); pending = [] }
  }
  fs.fsyncSync(fd); console.log('acked ' + pending.join(' '))
  console.log('done')
} catch (e) { console.log('error ' + e.code) }
`

function expectedBlock (b: number, len: number): Buffer {
  const buf = Buffer.alloc(len, (b * 7 + 1) & 255)
  buf.writeUInt32LE(b, 0)
  return buf
}

async function makeStore (dir: string): Promise<string> {
  const store = path.join(dir, 'store')
  await createDisk(store, 'vm', 'disk', '32M')
  // a base with data so copy-on-write has something to copy
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', `write -P 0x5a 0 ${DISK}`, path.join(store, 'vm', 'disk.vmdk')])
  await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm', 'disk')])
  return store
}

async function mountWithFault (store: string, mnt: string, after: number, only: string): Promise<Server> {
  process.env.REDOFS_CRASH_AFTER = String(after)
  process.env.REDOFS_CRASH_ONLY = only
  try {
    return await env.mount(store, mnt)
  } finally {
    delete process.env.REDOFS_CRASH_AFTER
    delete process.env.REDOFS_CRASH_ONLY
  }
}

async function checkFiles (t: import('ava').ExecutionContext, store: string): Promise<void> {
  const dir = path.join(store, 'vm')
  for (const f of (await readdir(dir)).filter(f => /^disk(-\d{6})?\.vmdk$/.test(f))) {
    const q = await qemuCheck(path.join(dir, f))
    t.is(q.code, 0, `qemu-img check ${f}\n${describe(q)}`)
  }
  const c = await run(process.execPath, [REDOFS_BIN, 'check', path.join(dir, 'disk')])
  t.is(c.code, 0, `redofs check\n${describe(c)}`)
}

/** qemu-io reads `file` and checks each `pattern offset length` ("0x33 64k 64k"). */
async function qemuReadsBack (t: import('ava').ExecutionContext, file: string, ...reads: string[]): Promise<void> {
  const q = await run('qemu-io', ['-r', '-f', 'vmdk', ...reads.flatMap(r => ['-c', `read -P ${r}`]), file])
  t.is(q.code, 0, describe(q))
  t.notRegex(q.stdout + q.stderr, /Pattern verification failed/)
}

/** addredo on <vm>/disk, then qemu-io fills `range` ("1M 3M") of the new top with `pattern`. */
async function addRedoFilled (vm: string, pattern: number, range: string): Promise<void> {
  await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'disk')])
  const top = (await readdir(vm)).filter(f => /-\d{6}\.vmdk$/.test(f)).sort().pop() as string
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', `write -P ${pattern} ${range}`, path.join(vm, top)])
}

/**
 * <store>/vm/disk, 8M: a base filled with 1 over `base`, redo log 1 with 2 over 0-5M (two
 * copy chunks of 4 MiB), redo log 2 with 3 over `top`. Returns the VM directory.
 */
async function twoRedoChain (store: string, base: string, top: string): Promise<string> {
  await createDisk(store, 'vm', 'disk', '8M')
  const vm = path.join(store, 'vm')
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', `write -P 1 ${base}`, path.join(vm, 'disk.vmdk')])
  await addRedoFilled(vm, 2, '0 5M')
  await addRedoFilled(vm, 3, top)
  return vm
}

/** The primary and redundant grain table entries of `grain`. */
async function gteCopies (file: string, grain: number): Promise<number[]> {
  return [await readU32(file, await gtePosition(file, grain)), await readU32(file, await gtePosition(file, grain, true))]
}

if (ok) {
  test.serial('crash during writes: every fsync-acknowledged byte survives a SIGKILL at any metadata write', async t => {
    t.timeout(300_000)
    const rnd = prng(4242)
    const seeds = 10
    let crashed = 0
    for (let i = 0; i < seeds; i++) {
      const dir = await env.tmp()
      const store = await makeStore(dir)
      const mnt = path.join(dir, 'mnt')
      const after = 1 + Math.floor(rnd() * 40)
      const server = await mountWithFault(store, mnt, after, 'sparse,layer')
      const img = server.img('vm', 'disk')
      const w = await run(process.execPath, ['-e', WRITER, img, String(i + 1), '200', String(1 + (i % 4)), String(BLOCK), String(DISK)], { timeoutMs: 120_000 })
      const acked = w.stdout.split('\n').filter(l => l.startsWith('acked ')).flatMap(l => l.slice(6).split(' ').filter(x => x !== '')).map(x => x.split(':').map(Number))
      const exit = await Promise.race([server.exited, new Promise(resolve => setTimeout(resolve, 15_000))])
      if (exit !== undefined && server.exit?.signal === 'SIGKILL') crashed++
      await server.kill()
      t.false(isMounted(mnt), 'dead mount left behind')
      // remount without faults: recovery runs; every acknowledged block must read back
      const again = await env.mount(store, mnt)
      const bad: string[] = []
      for (const [b, len] of acked) {
        const got = await readFile(again.img('vm', 'disk')).then(buf => buf.subarray(b * BLOCK, b * BLOCK + len))
        if (!got.equals(expectedBlock(b, len))) bad.push(`block ${b}`)
        if (bad.length > 3) break
      }
      t.deepEqual(bad, [], `seed ${i} (crash after ${after} fault points): acknowledged blocks lost; writer said:\n${w.stdout.slice(-500)}`)
      await again.stopClean(t)
      await checkFiles(t, store)
    }
    t.true(crashed >= seeds / 2, `only ${crashed} of ${seeds} runs crashed at their fault point: the points are not reached`)
  })

  test.serial('crash during commit: finished at the next open, surviving generations never change', async t => {
    t.timeout(600_000)
    const dir = await env.tmp()
    const pristine = path.join(dir, 'pristine')
    await createDisk(pristine, 'vm', 'disk', '16M')
    const vm = path.join(pristine, 'vm')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 1 0 16M', path.join(vm, 'disk.vmdk')])
    for (const [p, range] of [[2, '1M 3M'], [3, '2M 4M'], [4, '5M 2M']] as const) await addRedoFilled(vm, p, range)
    // generations 0..3; commit level=1 merges redo 2 into redo 1: generations 0, 2, 3 survive
    // `merging`: the generation an interrupted commit is merging into, whose export is refused
    const exportAll = async (store: string, n: number, merging?: number): Promise<string[]> => {
      const out: string[] = []
      for (let g = 0; g < n; g++) {
        const raw = path.join(dir, `g${g}.raw`)
        const r = await run(process.execPath, [REDOFS_BIN, 'export', `${path.join(store, 'vm', 'disk')}@${g}`, raw])
        if (g === merging) {
          t.regex(r.stderr, /generation 1 is being merged with the one above by an interrupted commit/, `export @${g} of a generation in flux\n${describe(r)}`)
          out.push('')
          continue
        }
        if (r.code !== 0) throw new Error(`export @${g}\n${describe(r)}`)
        out.push(await sha256File(raw))
      }
      return out
    }
    const generations = async (store: string): Promise<number> => {
      const r = await run(process.execPath, [REDOFS_BIN, 'info', '--json', path.join(store, 'vm', 'disk')])
      if (r.code !== 0) throw new Error(`info\n${describe(r)}`)
      return (JSON.parse(r.stdout) as { layers: unknown[] }).layers.length
    }
    const before = await exportAll(pristine, 4)
    const survivors = [before[0], before[2], before[3]]
    let finished = false
    let points = 0
    for (let n = 1; n < 200 && !finished; n++) {
      const store = path.join(dir, `s${n}`)
      await mkdir(path.join(store, 'vm'), { recursive: true })
      for (const f of await readdir(vm)) await copyFile(path.join(vm, f), path.join(store, 'vm', f))
      const r = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vm', 'disk'), 'level=1'], {
        env: { ...process.env, REDOFS_CRASH_AFTER: String(n), REDOFS_CRASH_ONLY: 'commit,sparse,layer' }
      })
      if (r.code === 0) { finished = true; break }
      t.true(r.code === -1 && r.stderr.includes('fault injection'), `commit with crash point ${n} did not die at it\n${describe(r)}`)
      points++
      // during: a read-only open sees the survivors unchanged (4 or 3 generations)
      const gens = await generations(store)
      const journaled = (await readdir(path.join(store, 'vm'))).includes('disk-000001.vmdk.redofs-commit')
      const during = await exportAll(store, gens, gens === 4 && journaled ? 1 : undefined)
      if (gens === 4) t.deepEqual([during[0], during[2], during[3]], survivors, `crash point ${n}: read-only view during recovery`)
      else t.deepEqual(during, survivors, `crash point ${n}: read-only view after relink`)
      // after: a writable open (mount) finishes the commit
      const mnt = path.join(store, 'mnt')
      const server = await env.mount(store, mnt)
      await server.stopClean(t)
      t.is(await generations(store), 3, `crash point ${n}: commit not finished at the next open`)
      t.deepEqual(await exportAll(store, 3), survivors, `crash point ${n}: surviving generations changed`)
      t.deepEqual((await readdir(path.join(store, 'vm'))).filter(f => f.includes('redofs-commit')), [], 'journal left behind')
      t.deepEqual((await readdir(path.join(store, 'vm'))).filter(f => f.includes('redofs-dropped')), [], `crash point ${n}: a dropped file was not deleted at the next open`)
      const top = (await readdir(path.join(store, 'vm'))).filter(f => /-\d{6}\.vmdk$/.test(f)).sort().pop() as string
      const q = await sh('qemu-img convert -O raw "$1" "$2" && sha256sum "$2"', [path.join(store, 'vm', top), path.join(dir, 'q.raw')])
      t.is(q.code, 0, `qemu reads through every parent after recovery (crash point ${n})\n${describe(q)}`)
      t.is(q.stdout.split(' ')[0], survivors[2])
      await checkFiles(t, store)
    }
    t.true(finished, 'the commit never completed without a crash')
    t.true(points >= 8, `only ${points} crash points were exercised`)
    await writeFile(path.join(dir, 'points.txt'), String(points))
  })

  test.serial('crash between dropping and deleting a discarded redo log: the chain is already short, the file goes at the next open', async t => {
    const dir = await env.tmp()
    const { store, vmDir: vm } = await storeChain(dir, 8 << 20, [
      { writes: [{ pattern: 7, offset: 0, length: 8 << 20 }] },
      { writes: [{ pattern: 9, offset: 1 << 20, length: 2 << 20 }] }
    ], 'vm')
    const r = await run(process.execPath, [REDOFS_BIN, 'discard', path.join(vm, 'disk')], {
      env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'layer.dropped' }
    })
    t.true(r.code === -1 && r.stderr.includes('crashing at layer.dropped'), `discard did not die between drop and delete\n${describe(r)}`)
    t.deepEqual((await readdir(vm)).filter(f => f.endsWith('.redofs-dropped')), ['disk-000001.vmdk.redofs-dropped'], 'the crash left the dropped file')
    const info = await run(process.execPath, [REDOFS_BIN, 'info', '--json', path.join(vm, 'disk')])
    t.is(info.code, 0, describe(info))
    t.is((JSON.parse(info.stdout) as { layers: unknown[] }).layers.length, 1, 'the discarded redo log is no longer part of the chain')
    const server = await env.mount(store, path.join(dir, 'mnt'))
    const head = await readFile(server.img('vm', 'disk')).then(b => b.subarray(0, 4 << 20))
    t.true(head.equals(Buffer.alloc(4 << 20, 7)), 'the live file reads as the base')
    await server.stopClean(t)
    t.deepEqual((await readdir(vm)).filter(f => f.endsWith('.redofs-dropped')), [], 'the writable open deleted the dropped file')
    await checkFiles(t, store)
  })

  test.serial('crash in the middle of rewriting an embedded descriptor: the intent file holds the whole new text, every open reads it, a writable one finishes the write', async t => {
    const { dir, store, vm } = await storeWithRedo(env.tmp, '8M')
    const base = path.join(vm, 'disk.vmdk')
    const areaText = async (): Promise<string> => {
      const b = await readFile(base)
      const off = Number(b.readBigUInt64LE(28)) * 512
      const area = b.subarray(off, off + Number(b.readBigUInt64LE(36)) * 512)
      return area.subarray(0, area.indexOf(0)).toString('latin1')
    }
    // a long label takes the descriptor past its first sector, so the crash tears it
    const name = 'L' + 'x'.repeat(59)
    const r = await run(process.execPath, [REDOFS_BIN, 'label', path.join(vm, 'disk'), 'gen=0', `name=${name}`], {
      env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'sparse.descriptor.torn' }
    })
    t.true(r.code === -1 && r.stderr.includes('crashing at sparse.descriptor.torn'), `label did not die inside the rewrite\n${describe(r)}`)
    const torn = await areaText()
    t.false(torn.includes(`"${name}"`), 'the crash did not tear the descriptor (the test needs a text past 512 bytes)')
    t.true((await readdir(vm)).includes('disk.vmdk.redofs-desc'), 'no intent file')

    const info = await run(process.execPath, [REDOFS_BIN, 'info', '--json', path.join(vm, 'disk')])
    t.is(info.code, 0, describe(info))
    const layer0 = (JSON.parse(info.stdout) as { layers: Array<{ label: string | null, descriptorPending: boolean }> }).layers[0]
    t.is(layer0.label, name, 'a read-only open reads the intent')
    t.true(layer0.descriptorPending, 'info --json does not say a rewrite is pending')
    const infoText = await run(process.execPath, [REDOFS_BIN, 'info', path.join(vm, 'disk')])
    t.regex(infoText.stdout, /descriptor rewrite pending/, describe(infoText))
    t.is(await areaText(), torn, 'a read-only open wrote the file')
    const check = await run(process.execPath, [REDOFS_BIN, 'check', path.join(vm, 'disk')])
    t.is(check.code, 1, describe(check))
    t.regex(check.stdout + check.stderr, /rewrite of the embedded descriptor was interrupted/, 'check does not say a rewrite is pending')

    const server = await env.mount(store, path.join(dir, 'mnt'))
    t.true((await readdir(path.join(server.mnt, 'vm'))).includes(`disk@${name}.img`), 'the label is served')
    await server.stopClean(t)
    t.true((await areaText()).includes(`ddb.redofs.label = "${name}"`), 'the writable open finished the rewrite')
    t.false((await readdir(vm)).includes('disk.vmdk.redofs-desc'), 'the intent file is gone')
    await checkFiles(t, store)
  })

  test.serial('an intent file left by a crash does not undo a descriptor another tool wrote afterwards', async t => {
    const { dir, store, vm } = await storeWithRedo(env.tmp, '8M')
    const base = path.join(vm, 'disk.vmdk')
    const r = await run(process.execPath, [REDOFS_BIN, 'label', path.join(vm, 'disk'), 'gen=0', `name=L${'y'.repeat(59)}`], {
      env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'sparse.descriptor.torn' }
    })
    t.true(r.code === -1, `label did not die inside the rewrite\n${describe(r)}`)
    // another tool now writes a whole descriptor of its own (here: the original one, adapter changed)
    const b = await readFile(base)
    const off = Number(b.readBigUInt64LE(28)) * 512
    const size = Number(b.readBigUInt64LE(36)) * 512
    const intent = await readFile(`${base}.redofs-desc`)
    const old = intent.subarray(intent.indexOf(10) + 1 + size) // the area the rewrite replaced
    const theirs = Buffer.alloc(size)
    theirs.write(old.subarray(0, old.indexOf(0)).toString('latin1').replace(/ddb\.adapterType = "[^"]*"/, 'ddb.adapterType = "ide"'), 'latin1')
    t.false(theirs.equals(old), 'the other tool changed something')
    const fh = await open(base, 'r+')
    try { await fh.write(theirs, 0, size, off) } finally { await fh.close() }

    const info = await run(process.execPath, [REDOFS_BIN, 'info', '--json', path.join(vm, 'disk')])
    t.is(info.code, 0, describe(info))
    t.is((JSON.parse(info.stdout) as { layers: Array<{ label: string | null }> }).layers[0].label, null, 'the stale intent was read')
    const server = await env.mount(store, path.join(dir, 'mnt'))
    await server.stopClean(t)
    const after = (await readFile(base)).subarray(off, off + size)
    t.true(after.equals(theirs), 'a writable open wrote the stale intent over the newer descriptor')
    t.false((await readdir(vm)).includes('disk.vmdk.redofs-desc'), 'the stale intent file is still there')
    await checkFiles(t, store)
  })

  test.serial('an unclean file whose grain table copies disagree (an entry lost from either one): the next writable open restores it from the other', async t => {
    // redofs' own crashes can leave the redundant copy behind the primary only (it is written
    // after the primary is durable); damage or another tool can also cost the primary an entry.
    const { vm } = await storeWithRedo(env.tmp, '8M')
    const top = path.join(vm, 'disk-000001.vmdk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x33 64k 64k', '-c', 'write -P 0x44 192k 64k', top])
    const [g1, g3] = [(await gteCopies(top, 1))[0], (await gteCopies(top, 3))[0]]
    t.deepEqual([await gteCopies(top, 1), await gteCopies(top, 3)], [[g1, g1], [g3, g3]], 'qemu-io wrote both copies')
    await writeU32(top, await gtePosition(top, 1), 0) // the primary lost its entry
    await writeU32(top, await gtePosition(top, 3, true), 0) // the redundant copy lost its
    await writeAt(top, 72, Buffer.from([1])) // uncleanShutdown
    const r = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'disk')])
    t.is(r.code, 0, describe(r))
    t.deepEqual([await gteCopies(top, 1), await gteCopies(top, 3)], [[g1, g1], [g3, g3]], 'both copies hold both entries again')
    await qemuReadsBack(t, top, '0x33 64k 64k', '0x44 192k 64k')
    await checkFiles(t, path.dirname(vm))
  })

  test.serial('an unclean file whose redundant table names another grain\'s sectors or the metadata area: the next writable open does not take that entry', async t => {
    // recovery prefers the primary and falls back to the redundant copy; a redundant entry that
    // points onto another grain (or into the tables) is damage, and taking it would make two
    // grains share sectors: a write to one would overwrite the other
    const { vm } = await storeWithRedo(env.tmp, '8M')
    const top = path.join(vm, 'disk-000001.vmdk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x33 64k 64k', '-c', 'write -P 0x44 192k 64k', top])
    const g3 = (await gteCopies(top, 3))[0]
    const gdOffset = Number((await readFile(top)).readBigUInt64LE(56))
    await writeU32(top, await gtePosition(top, 1), 0) // the primary lost grain 1 ...
    await writeU32(top, await gtePosition(top, 1, true), g3) // ... and the redundant copy names grain 3's sectors
    await writeU32(top, await gtePosition(top, 5, true), gdOffset) // grain 5's redundant entry points at the grain directory
    // grains 6 and 7: both redundant entries name the same free grain at the end of the file
    const free = (await stat(top)).size / 512
    await truncate(top, (free + 128) * 512)
    await writeU32(top, await gtePosition(top, 6, true), free)
    await writeU32(top, await gtePosition(top, 7, true), free)
    await writeAt(top, 72, Buffer.from([1])) // uncleanShutdown
    const r = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'disk')])
    t.is(r.code, 0, describe(r))
    t.deepEqual([await gteCopies(top, 1), await gteCopies(top, 3), await gteCopies(top, 5)], [[0, 0], [g3, g3], [0, 0]], 'grain 1 and 5 dropped from both copies, grain 3 kept')
    t.deepEqual([await gteCopies(top, 6), await gteCopies(top, 7)], [[free, free], [0, 0]], 'the first entry naming the free grain is taken, the second is not')
    await qemuReadsBack(t, top, '0 64k 64k', '0x44 192k 64k', '0 320k 64k')
    await checkFiles(t, path.dirname(vm))
  })

  test.serial('a clean file with a grain entry past its end (a truncated copy) opens read-only, says why, and is left as it was', async t => {
    // new grains are appended: they would land where that entry points (or leave a hole it
    // reads as zeros) instead of the read failing; such a file is served read-only
    const { vm } = await storeWithRedo(env.tmp, '8M')
    const top = path.join(vm, 'disk-000001.vmdk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x33 0 64k', top])
    const end = Math.ceil((await stat(top)).size / BLOCK) * BLOCK / 512
    await writeU32(top, await gtePosition(top, 2), end)
    await writeU32(top, await gtePosition(top, 2, true), end)
    const before = await readFile(top)
    const layer = await Layer.open(top, { writable: true })
    try {
      t.false(layer.writable, 'the layer opened writable')
      t.true(layer.problems.some(p => /opened read-only: entries point past the end/.test(p)), layer.problems.join('\n'))
      await t.throwsAsync(layer.write(Buffer.alloc(BLOCK, 0x55), 0, 4 * BLOCK, BLOCK, async (b, o, _p, l) => { b.fill(0, o, o + l) }), { code: 'EROFS' })
      const b = Buffer.alloc(BLOCK)
      await layer.read(b, 0, 0, BLOCK)
      t.true(b.every(x => x === 0x33), 'the rest still reads')
    } finally {
      await layer.close()
    }
    t.true((await readFile(top)).equals(before), 'the file is unchanged')
    // the CLI names the file and the problem
    const r = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'disk')])
    t.not(r.code, 0, describe(r))
    t.regex(r.stderr, /disk-000001\.vmdk/, describe(r))
  })

  test.serial('a redundant directory entry naming a primary grain table: flushes never write over that table, and check reports it', async t => {
    const { vm } = await storeWithRedo(env.tmp, '64M') // two grain tables of 32 MiB each
    const top = path.join(vm, 'disk-000001.vmdk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x33 0 64k', '-c', 'write -P 0x44 40M 64k', top])
    const hdr = await readFile(top)
    const [rgdOffset, gdOffset] = [Number(hdr.readBigUInt64LE(48)), Number(hdr.readBigUInt64LE(56))]
    const table1 = await readU32(top, gdOffset * 512 + 4)
    await writeU32(top, rgdOffset * 512, table1) // the redundant copy of table 0 "lies" on primary table 1
    const table1Bytes = (await readFile(top)).subarray(table1 * 512, table1 * 512 + 2048)
    const layer = await Layer.open(top, { writable: true })
    try {
      await layer.beginSession()
      await layer.write(Buffer.alloc(BLOCK, 0x55), 0, BLOCK, BLOCK, async (b, o, _p, l) => { b.fill(0, o, o + l) })
      await layer.endSession()
    } finally {
      await layer.close()
    }
    t.true((await readFile(top)).subarray(table1 * 512, table1 * 512 + 2048).equals(table1Bytes), 'primary table 1 was overwritten')
    await qemuReadsBack(t, top, '0x33 0 64k', '0x55 64k 64k', '0x44 40M 64k')
    const c = await run(process.execPath, [REDOFS_BIN, 'check', top])
    t.is(c.code, 1, describe(c))
    t.regex(c.stdout, /redundant grain directory entry 0 points to sector/, describe(c))
  })

  test.serial('a commit killed after moving the merged generation\'s content record keeps that record when the next open finishes it', async t => {
    const { vm } = await storeWithRedo(env.tmp, '8M')
    const disk = path.join(vm, 'disk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x21 0 1M', path.join(vm, 'disk-000001.vmdk')])
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', disk, 'record=1']) // records generation 1
    const record = await readFile(path.join(vm, 'disk-000001.vmdk.redofs-digest'))
    const killed = await run(process.execPath, [REDOFS_BIN, 'commit', disk, 'level=1'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.unjournal' } })
    t.regex(killed.stderr, /crashing at commit\.unjournal/, describe(killed))
    t.true((await readdir(vm)).includes('disk.vmdk.redofs-commit'), 'no journal left to finish')
    const r = await run(process.execPath, [REDOFS_BIN, 'commit', disk, 'level=1']) // its repeat: finishes it
    t.is(r.code, 0, describe(r))
    t.false((await readdir(vm)).includes('disk.vmdk.redofs-commit'), 'the commit was not finished')
    t.deepEqual((await readdir(vm)).filter(f => f.endsWith('.vmdk')).sort(), ['disk-000002.vmdk', 'disk.vmdk'], 'the repeat merged more')
    t.deepEqual(await readFile(path.join(vm, 'disk.vmdk.redofs-digest')).catch(() => undefined), record, 'the base lost the record of the content it now holds')
    await checkFiles(t, path.dirname(vm))
  })

  test.serial('an interrupted commit whose redo log was damaged since is not finished: the open fails naming the file, nothing is merged away', async t => {
    const { vm } = await storeWithRedo(env.tmp, '8M')
    const disk = path.join(vm, 'disk')
    const child = path.join(vm, 'disk-000001.vmdk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x21 0 1M', child])
    const killed = await run(process.execPath, [REDOFS_BIN, 'commit', disk, 'level=0'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.copy' } })
    t.regex(killed.stderr, /crashing at commit\.copy/, describe(killed))
    await writeU32(child, await gtePosition(child, 3), 0x00fffff0) // grain 3 now points past the end
    // the CLI refuses a damaged chain outright; the mount opens damaged chains leniently
    const r = await run(process.execPath, [REDOFS_BIN, 'addredo', disk])
    t.not(r.code, 0, describe(r))
    t.regex(r.stderr, /disk-000001\.vmdk: grain table 0 entry 3 points to sector/, describe(r))
    const server = await env.mount(path.dirname(vm), path.join(path.dirname(path.dirname(vm)), 'mnt'))
    const status = JSON.parse(await readFile(path.join(server.mnt, '.ctl', 'status'), 'utf8')) as { vms: Array<{ name: string, disks: unknown[], errors: Array<{ message: string }> }> }
    const v = status.vms.find(x => x.name === 'vm')
    t.is(v?.disks.length, 0, 'the disk is served')
    t.true(v?.errors.some(e => /disk-000001\.vmdk: damaged grains at byte 196608; the interrupted commit/.test(e.message)), JSON.stringify(v?.errors))
    await server.stop()
    t.true((await readdir(vm)).includes('disk-000001.vmdk'), 'the damaged redo log was merged away')
    t.true((await readdir(vm)).includes('disk.vmdk.redofs-commit'), 'the journal is gone')
  })

  test.serial('a store copied or moved after a crash in a commit finishes its own commit, never the one at the old path; a journal naming a file outside the store or not the parent\'s child is refused', async t => {
    const dir = await env.tmp()
    const orig = path.join(dir, 'orig')
    const ovm = await twoRedoChain(orig, '0 8M', '2M 3M')
    // killed after the journal and the first copied chunk: the base holds part of redo log 1
    const killed = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(ovm, 'disk'), 'level=1'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.copy' } })
    t.regex(killed.stderr, /crashing at commit\.copy/, describe(killed))
    const journal = JSON.parse(await readFile(path.join(ovm, 'disk.vmdk.redofs-commit'), 'utf8')) as Record<string, unknown>
    t.like(journal, { parent: 'disk.vmdk', child: 'disk-000001.vmdk', above: 'disk-000002.vmdk' }, 'the journal names its files relative to the parent')
    const files = (await readdir(ovm)).sort()
    const sums = async (d: string): Promise<string[]> => await Promise.all(files.map(async f => await sha256File(path.join(d, f))))
    const before = await sums(ovm)
    const copyOf = async (name: string, j: unknown): Promise<string> => {
      const vm = path.join(dir, name, 'vm')
      await mkdir(vm, { recursive: true })
      for (const f of files) await copyFile(path.join(ovm, f), path.join(vm, f))
      await writeFile(path.join(vm, 'disk.vmdk.redofs-commit'), JSON.stringify(j))
      return vm
    }
    // a copy with this journal, and one with the absolute paths older versions wrote (naming
    // the original store): each reads and finishes the commit in itself
    const copies = { copied: journal, older: { ...journal, parent: path.join(ovm, 'disk.vmdk'), child: path.join(ovm, 'disk-000001.vmdk'), above: path.join(ovm, 'disk-000002.vmdk') } }
    for (const [name, j] of Object.entries(copies)) {
      const vm = await copyOf(name, j)
      // read-only: generation 1 through the journal (qemu refuses the child's parentCID here)
      const raw = path.join(dir, `${name}.raw`)
      const exp = await run(process.execPath, [REDOFS_BIN, 'export', `${path.join(vm, 'disk')}@1`, raw])
      t.is(exp.code, 0, `${name}: the read-only open of the copy failed\n${describe(exp)}`)
      t.true((await readFile(raw)).equals(Buffer.concat([Buffer.alloc(5 << 20, 2), Buffer.alloc(3 << 20, 1)])), `${name}: generation 1 read wrong before the commit was finished`)
      const r = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'disk')])
      t.is(r.code, 0, `${name}: the writable open did not finish the commit\n${describe(r)}`)
      t.deepEqual((await readdir(vm)).sort(), ['disk-000002.vmdk', 'disk-000003.vmdk', 'disk.vmdk'], `${name}: files after the finished commit`)
      await qemuReadsBack(t, path.join(vm, 'disk.vmdk'), '2 0 5M', '1 5M 3M')
      await qemuReadsBack(t, path.join(vm, 'disk-000003.vmdk'), '2 0 2M', '3 2M 3M', '1 5M 3M')
      await checkFiles(t, path.join(dir, name))
    }
    t.deepEqual(await sums(ovm), before, 'a copy\'s open changed the original store')
    // journals that name a file outside the store (absolute, or climbing out), or a file that is
    // not the parent's child: refused, naming the journal; the commit is neither finished nor
    // undone (the open may still repair the unclean parent's own tables: it reads as it did)
    const state = async (vm: string): Promise<string[]> => {
      const q = await sh('qemu-img convert -O raw "$1" "$2" && sha256sum "$2"', [path.join(vm, 'disk.vmdk'), path.join(dir, 'parent.raw')])
      if (q.code !== 0) throw new Error(describe(q))
      return [q.stdout.split(' ')[0], ...(await sums(vm)).filter((_, k) => files[k] !== 'disk.vmdk')]
    }
    const outside = /disk\.vmdk\.redofs-commit: file named by the commit journal ".*disk-00000[12]\.vmdk" resolves to .*\/orig\/vm\/disk-00000[12]\.vmdk, outside the store/
    const bad: Array<[Record<string, unknown>, RegExp, string[]]> = [
      [{ child: path.join(ovm, 'disk-000001.vmdk') }, outside, []],
      [{ above: '../../orig/vm/disk-000002.vmdk' }, outside, []],
      // a file of the store whose parent is another layer: never merged into this parent, even
      // when the user excuses the CID mismatch it leaves in the chain
      [{ child: 'disk-000002.vmdk', above: null }, /disk\.vmdk\.redofs-commit: names .*disk-000002\.vmdk as the redo log to merge, but that file's parent is not .*disk\.vmdk/, ['--ignore-cid']],
      // a redo log missing before the journal says its copy was complete: not taken as merged
      [{ child: 'disk-000009.vmdk' }, /disk\.vmdk\.redofs-commit: the redo log it merges \(.*disk-000009\.vmdk\) is missing, and nothing shows the commit got past its copy/, ['--ignore-cid']]
    ]
    for (const [k, [fields, why, opts]] of bad.entries()) {
      const vm = await copyOf(`bad${k}`, { ...journal, ...fields })
      const copied = await state(vm)
      const r = await run(process.execPath, [REDOFS_BIN, ...opts, 'addredo', path.join(vm, 'disk')])
      t.not(r.code, 0, describe(r))
      t.regex(r.stderr, why, describe(r))
      t.deepEqual((await readdir(vm)).sort(), files, `bad${k}: the refused open added or removed files`)
      t.deepEqual(await state(vm), copied, `bad${k}: the refused open changed the journal, a redo log or what the parent reads`)
    }
    t.deepEqual(await sums(ovm), before, 'a refused open changed the original store')
  })

  test.serial('a crash that leaves a label on content about to change (addredo before its redo log exists, discard after its drops, commit into a labelled parent): the label names nothing, and a writable open clears it from the live layer', async t => {
    const labels = async (vm: string): Promise<Array<string | null>> => (await infoJson(path.join(vm, 'disk'))).layers.map(l => l.label)
    const exportFails = async (vm: string, label: string): Promise<void> => {
      const r = await run(process.execPath, [REDOFS_BIN, 'export', `${path.join(vm, 'disk')}@${label}`, path.join(vm, '..', 'x.raw')])
      t.not(r.code, 0, `${label} still names a generation after the crash\n${describe(r)}`)
      t.regex(r.stderr, new RegExp(`no generation is labelled "${label}"`), describe(r))
    }
    // addredo killed after marking the top frozen under its label, before the redo log exists
    const a = await storeWithRedo(env.tmp, '8M') // base <- redo 1 (live)
    const cmd = async (vm: string, ...args: string[]): Promise<void> => { await mustRun(process.execPath, [REDOFS_BIN, args[0], path.join(vm, 'disk'), ...args.slice(1)]) }
    const killed = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(a.vm, 'disk'), 'label=snap'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'addredo.frozen' } })
    t.regex(killed.stderr, /crashing at addredo\.frozen/, describe(killed))
    t.deepEqual(await labels(a.vm), [null, null], 'the live layer shows a label')
    await exportFails(a.vm, 'snap')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 9 0 1M', path.join(a.vm, 'disk-000001.vmdk')]) // new writes
    await cmd(a.vm, 'addredo')
    t.deepEqual(await labels(a.vm), [null, null, null], 'the next addredo froze the changed layer under the label of the killed one')
    // discard killed after dropping the layers above, before the new live layer was unmarked
    const d = await storeWithRedo(env.tmp, '8M')
    await cmd(d.vm, 'addredo', 'label=keep')
    const dk = await run(process.execPath, [REDOFS_BIN, 'discard', path.join(d.vm, 'disk'), 'to=keep'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'layer.dropped' } })
    t.regex(dk.stderr, /crashing at layer\.dropped/, describe(dk))
    t.deepEqual(await labels(d.vm), [null, null], 'the live layer shows a label')
    await exportFails(d.vm, 'keep')
    await cmd(d.vm, 'addredo')
    t.deepEqual(await labels(d.vm), [null, null, null], 'the next addredo froze the live layer under the discarded generation\'s label')
    // commit killed after its journal: the parent's label went first, with its content record
    const c = await storeWithRedo(env.tmp, '8M')
    await cmd(c.vm, 'label', 'gen=0', 'name=base')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 7 0 2M', path.join(c.vm, 'disk-000001.vmdk')])
    await cmd(c.vm, 'addredo')
    const ck = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(c.vm, 'disk'), 'level=1'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.journal' } })
    t.regex(ck.stderr, /crashing at commit\.journal/, describe(ck))
    t.deepEqual(await labels(c.vm), [null, null, null], 'the parent kept its label over the content the commit changes')
    await exportFails(c.vm, 'base')
    await cmd(c.vm, 'addredo')
    t.deepEqual(await labels(c.vm), [null, null, null])
    for (const s of [a, d, c]) await checkFiles(t, s.store)
  })

  test.serial('a redo log name another tool reused after a commit was killed past its drop: the journal is finished without merging or deleting the new file; without the dropped file too', async t => {
    const { vm } = await storeWithRedo(env.tmp, '8M') // base <- disk-000001.vmdk
    const disk = path.join(vm, 'disk')
    const child = path.join(vm, 'disk-000001.vmdk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 4 0 2M', child])
    const killed = await run(process.execPath, [REDOFS_BIN, 'commit', disk, 'level=0'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.unjournal' } })
    t.regex(killed.stderr, /crashing at commit\.unjournal/, describe(killed))
    t.true((await readdir(vm)).includes('disk.vmdk.redofs-commit'), 'no journal left to finish')
    // a snapshot taken by another tool under the freed name, before redofs opens the disk again
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'disk.vmdk', '-F', 'vmdk', child])
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 5 4M 1M', child])
    const r = await run(process.execPath, [REDOFS_BIN, 'addredo', disk])
    t.is(r.code, 0, describe(r))
    t.deepEqual((await readdir(vm)).sort(), ['disk-000001.vmdk', 'disk-000002.vmdk', 'disk.vmdk'], 'the new snapshot was merged away, or the journal was left')
    await qemuReadsBack(t, path.join(vm, 'disk.vmdk'), '4 0 2M', '0 2M 6M')
    await qemuReadsBack(t, path.join(vm, 'disk-000002.vmdk'), '4 0 2M', '0 2M 2M', '5 4M 1M', '0 5M 3M')
    await checkFiles(t, path.dirname(vm))
    // killed right after the drop (the journal says only that the copy was complete), the
    // dropped file deleted since (another disk's open of this directory reaps it), and the
    // name taken again: still another's file
    const top = path.join(vm, 'disk-000002.vmdk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 6 6M 1M', top])
    const k2 = await run(process.execPath, [REDOFS_BIN, 'commit', disk, 'level=0'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'layer.dropped' } })
    t.regex(k2.stderr, /crashing at layer\.dropped/, describe(k2))
    for (const f of (await readdir(vm)).filter(f => f.endsWith('.redofs-dropped'))) await rm(path.join(vm, f))
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'disk-000001.vmdk', '-F', 'vmdk', top])
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 8 7M 1M', top])
    const r2 = await run(process.execPath, [REDOFS_BIN, 'addredo', disk])
    t.is(r2.code, 0, `the commit was not finished without its dropped file\n${describe(r2)}`)
    t.deepEqual((await readdir(vm)).sort(), ['disk-000001.vmdk', 'disk-000002.vmdk', 'disk-000003.vmdk', 'disk.vmdk'], 'the new snapshot was merged away, or the journal was left')
    await qemuReadsBack(t, path.join(vm, 'disk-000001.vmdk'), '4 0 2M', '0 2M 2M', '5 4M 1M', '0 5M 1M', '6 6M 1M', '0 7M 1M')
    await qemuReadsBack(t, path.join(vm, 'disk-000003.vmdk'), '4 0 2M', '0 2M 2M', '5 4M 1M', '0 5M 1M', '6 6M 1M', '8 7M 1M')
    await checkFiles(t, path.dirname(vm))
  })

  test.serial('a discard killed between the renames of a dropped layer\'s files: the next writable open deletes the extent left under its name', async t => {
    const { vm } = await storeWithRedo(env.tmp, '8M') // base <- disk-000001.vmdk
    const disk = path.join(vm, 'disk')
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', '--redo-format', 'cowd', disk]) // disk-000002.vmdk + -delta
    const killed = await run(process.execPath, [REDOFS_BIN, 'discard', disk], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'layer.drop.renamed' } })
    t.regex(killed.stderr, /crashing at layer\.drop\.renamed/, describe(killed))
    t.deepEqual((await readdir(vm)).sort(), ['disk-000001.vmdk', 'disk-000002-delta.vmdk', 'disk-000002.vmdk.redofs-dropped', 'disk.vmdk'], 'the kill did not fall between the renames')
    const r = await run(process.execPath, [REDOFS_BIN, 'addredo', disk])
    t.is(r.code, 0, describe(r))
    t.deepEqual((await readdir(vm)).sort(), ['disk-000001.vmdk', 'disk-000002.vmdk', 'disk.vmdk'], 'the dropped layer\'s extent was left behind')
    await checkFiles(t, path.dirname(vm))
  })

  test.serial('an offline commit run again after a crash finishes the interrupted one and stops there; numbers that moved are refused', async t => {
    const build = async (): Promise<string> => {
      const { vm } = await storeWithRedo(env.tmp, '8M') // base <- disk-000001.vmdk
      await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 1 0 1M', path.join(vm, 'disk-000001.vmdk')])
      await addRedoFilled(vm, 2, '1M 1M') // disk-000002.vmdk
      return vm
    }
    const crashCommit = async (vm: string, level: number, at: string): Promise<void> => {
      const k = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'disk'), `level=${level}`], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: at } })
      t.regex(k.stderr, new RegExp(`crashing at ${at.replace('.', '\\.')}`), describe(k))
    }
    // the same command again: the open finishes it, and nothing else is merged
    for (const [level, at, left] of [[0, 'commit.drop', 'disk-000001.vmdk'], [0, 'commit.copy', 'disk-000001.vmdk'], [1, 'commit.relink', 'disk-000002.vmdk']] as const) {
      const vm = await build()
      await crashCommit(vm, level, at)
      const again = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'disk'), `level=${level}`])
      t.is(again.code, 0, describe(again))
      t.regex(again.stderr, /finished the interrupted commit of .*disk-00000\d\.vmdk into/)
      t.deepEqual((await readdir(vm)).sort(), [left, 'disk.vmdk'].sort(), `level=${level} crashed at ${at}: the repeat merged more than the interrupted commit`)
      await qemuReadsBack(t, path.join(vm, left), '1 0 1M', '2 1M 1M', '0 2M 6M')
      await checkFiles(t, path.dirname(vm))
    }
    // another level, or a generation by number: they named the chain as the crash left it
    const vm = await build()
    await crashCommit(vm, 0, 'commit.drop')
    const other = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'disk'), 'level=1'])
    t.is(other.code, 1, describe(other))
    t.regex(other.stderr, /renumbered the generations, so level=1 may not name the one meant/)
    t.deepEqual((await readdir(vm)).sort(), ['disk-000001.vmdk', 'disk.vmdk'], 'only the interrupted commit was to be finished')
    // a discard of "the top": the finished commit merged the top the user saw away
    const vm3 = await build()
    await crashCommit(vm3, 0, 'commit.drop')
    const top = await run(process.execPath, [REDOFS_BIN, 'discard', path.join(vm3, 'disk')])
    t.is(top.code, 1, describe(top))
    t.regex(top.stderr, /so the top may not name the one meant/)
    t.deepEqual((await readdir(vm3)).sort(), ['disk-000001.vmdk', 'disk.vmdk'], 'the discard dropped the merged generation')
    await qemuReadsBack(t, path.join(vm3, 'disk-000001.vmdk'), '1 0 1M', '2 1M 1M')
    const vm2 = await build()
    await addRedoFilled(vm2, 3, '3M 1M') // disk-000003.vmdk
    await crashCommit(vm2, 0, 'commit.drop')
    const label = await run(process.execPath, [REDOFS_BIN, 'label', path.join(vm2, 'disk'), 'gen=1', 'name=x'])
    t.is(label.code, 1, describe(label))
    t.regex(label.stderr, /so gen=1 may not name the one meant/)
    const info = await infoJson(path.join(vm2, 'disk'))
    t.is(info.layers.length, 3, 'the interrupted commit was not finished')
    t.deepEqual(info.layers.map(l => l.label ?? null), [null, null, null], 'a label was set')
  })

  test.serial('a commit killed after re-linking the layer above: the merged redo log is no top, a read-only mount serves the real one and a writable one finishes without errors', async t => {
    const { dir, store, vm } = await storeWithRedo(env.tmp, '8M')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 1 1M 1M', path.join(vm, 'disk-000001.vmdk')])
    await addRedoFilled(vm, 2, '2M 1M')
    await addRedoFilled(vm, 3, '3M 1M')
    const k = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'disk'), 'level=1'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.drop' } })
    t.regex(k.stderr, /crashing at commit\.drop/, describe(k))
    // disk-000003 now names disk-000001; nothing names disk-000002 any more
    const q = await sh('qemu-img convert -O raw "$1" "$2" && sha256sum < "$2"', [path.join(vm, 'disk-000003.vmdk'), path.join(dir, 'top.raw')])
    t.is(q.code, 0, describe(q))
    const ro = await env.mount(store, path.join(dir, 'mnt'), ['--read-only'])
    const st = JSON.parse(await readFile(path.join(dir, 'mnt', '.ctl', 'status'), 'utf8')) as { vms: Array<{ errors: Array<{ message: string }> }> }
    t.deepEqual(st.vms[0].errors.map(e => e.message), [], 'the read-only mount saw a second top')
    t.is((await ro.status('vm', 'disk')).top, 'disk-000003.vmdk')
    t.is((await sh('sha256sum < "$1"', [ro.img('vm', 'disk')])).stdout, q.stdout, 'the live file is not the chain\'s top')
    await ro.stop()
    const rw = await env.mount(store, path.join(dir, 'mnt'))
    const st2 = JSON.parse(await readFile(path.join(dir, 'mnt', '.ctl', 'status'), 'utf8')) as { vms: Array<{ errors: Array<{ message: string }> }> }
    t.deepEqual(st2.vms[0].errors.map(e => e.message), [], 'the writable mount recorded an error')
    t.is((await rw.status('vm', 'disk')).redoLogs, 2)
    t.is((await sh('sha256sum < "$1"', [rw.img('vm', 'disk')])).stdout, q.stdout)
    await rw.stopClean(t)
    t.deepEqual((await readdir(vm)).sort(), ['disk-000001.vmdk', 'disk-000003.vmdk', 'disk.vmdk'])
  })

  test.serial('a commit killed mid-copy, under a read-only mount: the generation it merges into refuses to open, the others read as before', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    const vm = await twoRedoChain(store, '0 6M', '4M 1M')
    const before = await Promise.all(['disk-000001.vmdk', 'disk-000002.vmdk'].map(async f => {
      const q = await sh('qemu-img convert -O raw "$1" "$2" && sha256sum < "$2"', [path.join(vm, f), path.join(dir, `${f}.raw`)])
      return q.stdout
    }))
    const k = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'disk'), 'level=1'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.copy' } })
    t.regex(k.stderr, /crashing at commit\.copy/, describe(k))
    const ro = await env.mount(store, path.join(dir, 'mnt'), ['--read-only'])
    const g0 = await sh('head -c 1 "$1" >/dev/null', [ro.img('vm', 'disk', 0)])
    t.not(g0.code, 0, 'generation 0, half merged, was served')
    t.regex(g0.stderr, /busy/i)
    t.regex(await ro.errorText('vm', 'disk'), /generation 0 is being merged with the one above by an interrupted commit/)
    t.is((await sh('sha256sum < "$1"', [ro.img('vm', 'disk', 1)])).stdout, before[0])
    t.is((await sh('sha256sum < "$1"', [ro.img('vm', 'disk')])).stdout, before[1])
    await ro.stop()
    const rw = await env.mount(store, path.join(dir, 'mnt'))
    t.is((await rw.status('vm', 'disk')).redoLogs, 1)
    t.is((await sh('sha256sum < "$1"', [rw.img('vm', 'disk', 0)])).stdout, before[0])
    await rw.stopClean(t)
  })

  test.serial('a grain directory with 70 entries naming one table: those tables are held and never written, the other tables keep working', async t => {
    const dir = await env.tmp()
    const file = path.join(dir, 'd.vmdk')
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', file, '3G']) // 96 grain tables of 32 MiB
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x31 0 64k', '-c', 'write -P 0x32 2560M 64k', file])
    const gdOffset = Number((await readFile(file)).readBigUInt64LE(56))
    const table0 = await readU32(file, gdOffset * 512)
    for (let i = 1; i <= 70; i++) await writeU32(file, gdOffset * 512 + i * 4, table0)
    const before = await readFile(file)
    const layer = await Layer.open(file, { writable: true })
    try {
      t.true(layer.problems.filter(p => /over other metadata/.test(p)).length >= 70, layer.problems.slice(0, 3).join('\n'))
      const b = Buffer.alloc(BLOCK)
      await t.throwsAsync(layer.read(b, 0, 5 * 32 * 1024 * 1024, BLOCK), { code: 'EIO' })
      await layer.read(b, 0, 2560 * 1024 * 1024, BLOCK) // table 80 is untouched
      t.true(b.every(x => x === 0x32))
      await layer.beginSession()
      await layer.write(Buffer.alloc(BLOCK, 0x33), 0, 2600 * 1024 * 1024, BLOCK, async (buf, o, _p, l) => { buf.fill(0, o, o + l) })
      await layer.endSession()
    } finally {
      await layer.close()
    }
    const after = await readFile(file)
    t.true(after.subarray(table0 * 512, table0 * 512 + 2048).equals(before.subarray(table0 * 512, table0 * 512 + 2048)), 'the shared table was written')
    await qemuReadsBack(t, file, '0x33 2600M 64k')
  })

  test.serial('an in-place descriptor write that fails after its intent is durable still counts: read through the intent, finished by the next writable open', async t => {
    const { vm } = await storeWithRedo(env.tmp, '8M')
    const base = path.join(vm, 'disk.vmdk')
    const areaText = async (): Promise<string> => {
      const b = await readFile(base)
      const area = b.subarray(Number(b.readBigUInt64LE(28)) * 512)
      return area.subarray(0, area.indexOf(0)).toString('latin1')
    }
    const before = await areaText()
    // the first data sync of the command is the one after the in-place write
    const r = await run(process.execPath, [REDOFS_BIN, 'label', path.join(vm, 'disk'), 'gen=0', 'name=one'], {
      env: { ...process.env, REDOFS_FAIL_ONCE: 'datasync' }
    })
    t.is(r.code, 0, describe(r))
    t.true((await readdir(vm)).includes('disk.vmdk.redofs-desc'), 'the intent file is kept')
    const info = await run(process.execPath, [REDOFS_BIN, 'info', '--json', path.join(vm, 'disk')])
    t.is((JSON.parse(info.stdout) as { layers: Array<{ label: string | null }> }).layers[0].label, 'one', 'the change is made')
    t.not(await areaText(), before, 'the failed sync came before the in-place write (the test exercises nothing)')
    // the next writable open of the layer finishes the first rewrite, then makes its own
    const label = await run(process.execPath, [REDOFS_BIN, 'label', path.join(vm, 'disk'), 'gen=0', 'name=three'])
    t.is(label.code, 0, describe(label))
    t.true((await areaText()).includes('ddb.redofs.label = "three"'))
    t.false((await readdir(vm)).includes('disk.vmdk.redofs-desc'), 'the intent file is gone')
    await checkFiles(t, path.dirname(vm))
  })
}
