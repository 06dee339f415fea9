/**
 * E2E acceptance 8 (SPEC §4): disk modes across mount (power on) / unmount (power off) cycles,
 * with the mode set in <vm>.vmx. Each test has its own store; a cycle is a server start and a
 * clean SIGTERM stop (or a SIGKILL for the crash case).
 */
import test, { type ExecutionContext } from 'ava'
import { randomBytes } from 'node:crypto'
import { open, readFile, readdir } from 'node:fs/promises'
import path from 'node:path'
import { e2e, requireFuse, sh, writeVmx, type Server } from './helpers/mount'
import { convertToRaw, describe, qemuCheck } from './helpers/qemu'
import { storeChain } from './helpers/store'
import { firstDifference } from './helpers/model'

requireFuse(test)
const ctx = e2e(test)

const M = 1024 * 1024
const SIZE = 16 * M

interface Vm {
  root: string
  store: string
  vmDir: string
  /** expected content of the base as created */
  orig: Buffer
  cycle: number
}

async function makeVm (mode: string): Promise<Vm> {
  const root = await ctx.tmp()
  const c = await storeChain(root, SIZE, [{
    writes: [{ pattern: 0x90, offset: 0, length: 3 * M + 5 }, { pattern: 0x91, offset: 9 * M - 1, length: 70000 }]
  }], 'vm1')
  await writeVmx(path.join(c.vmDir, 'vm1.vmx'), [{ fileName: 'disk.vmdk', mode }])
  const raw = path.join(root, 'orig.raw')
  await convertToRaw(c.files[0], raw)
  return { root, store: c.store, vmDir: c.vmDir, orig: await readFile(raw), cycle: 0 }
}

async function powerOn (vm: Vm): Promise<Server> {
  vm.cycle++
  return await ctx.mount(vm.store, path.join(vm.root, `mnt${vm.cycle}`))
}

/** A write through the mount at an unaligned offset; also applied to `model`. */
async function writeLive (srv: Server, model: Buffer, pos: number, len: number): Promise<void> {
  const data = randomBytes(len)
  const fh = await open(srv.img('vm1', 'disk'), 'r+')
  try {
    await fh.write(data, 0, len, pos)
  } finally {
    await fh.close()
  }
  data.copy(model, pos)
}

async function liveEquals (t: ExecutionContext, srv: Server, want: Buffer, what: string): Promise<void> {
  const got = await readFile(srv.img('vm1', 'disk'))
  t.is(firstDifference(got, want), -1, `${what}: disk.img differs from the expected content at that byte offset`)
}

/** Redo log files in the VM's directory, also those renamed aside but not deleted yet. */
async function redoFiles (vm: Vm): Promise<string[]> {
  return (await readdir(vm.vmDir)).filter(f => /^disk-\d{6}\.vmdk(\.redofs-dropped)?$/.test(f)).sort()
}

async function fileEquals (t: ExecutionContext, vm: Vm, file: string, want: Buffer, what: string): Promise<void> {
  const out = path.join(vm.root, `check-${vm.cycle}-${file}.raw`)
  await convertToRaw(path.join(vm.vmDir, file), out)
  t.is(firstDifference(await readFile(out), want), -1, `${what}: qemu-img convert ${file} differs at that byte offset`)
  const chk = await qemuCheck(path.join(vm.vmDir, file))
  t.is(chk.code, 0, `qemu-img check ${file}\n${describe(chk)}`)
}

async function vmxFileName (vm: Vm): Promise<string> {
  const m = /scsi0:0\.fileName\s*=\s*"([^"]*)"/.exec(await readFile(path.join(vm.vmDir, 'vm1.vmx'), 'utf8'))
  return m?.[1] ?? '(none)'
}

test('persistent: writes go to the base, no redo log at any time, kept across remounts', async t => {
  const vm = await makeVm('persistent')
  const want = Buffer.from(vm.orig)
  let srv = await powerOn(vm)
  let st = await srv.status('vm1', 'disk')
  t.is(st.mode, 'persistent')
  t.is(st.redoLogs, 0)
  await writeLive(srv, want, 5 * M + 3, 100000)
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(vm), [])
  await fileEquals(t, vm, 'disk.vmdk', want, 'base after the first power off')
  srv = await powerOn(vm)
  st = await srv.status('vm1', 'disk')
  t.is(st.redoLogs, 0)
  await liveEquals(t, srv, want, 'second power on')
  await srv.stopClean(t)
})

test('nonpersistent: a session redo log at mount, writes gone after remount, no redo log left', async t => {
  const vm = await makeVm('nonpersistent')
  let srv = await powerOn(vm)
  let st = await srv.status('vm1', 'disk')
  t.is(st.mode, 'nonpersistent')
  t.is(st.redoLogs, 1, 'a session redo log is added at mount')
  const model = Buffer.from(vm.orig)
  await writeLive(srv, model, 100, 2 * M)
  await liveEquals(t, srv, model, 'the session sees its writes')
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(vm), [], 'the session redo log is deleted at unmount')
  t.is(await vmxFileName(vm), 'disk.vmdk', 'the .vmx points at the base again')
  await fileEquals(t, vm, 'disk.vmdk', vm.orig, 'the base is untouched')
  srv = await powerOn(vm)
  st = await srv.status('vm1', 'disk')
  t.is(st.redoLogs, 1)
  await liveEquals(t, srv, vm.orig, 'after remount the writes are gone')
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(vm), [])
})

test('nonpersistent: a session redo log left by a SIGKILLed server is discarded at the next mount; content equals the base', async t => {
  const vm = await makeVm('nonpersistent')
  let srv = await powerOn(vm)
  const model = Buffer.from(vm.orig)
  await writeLive(srv, model, 7 * M - 1, 300000)
  const fh = await open(srv.img('vm1', 'disk'), 'r+')
  await fh.datasync() // make sure the redo log on disk really holds the session's data
  await fh.close()
  await srv.kill()
  t.not(srv.exit, null, 'the server is gone')
  t.true((await redoFiles(vm)).length >= 1, 'the crashed session left its redo log behind')
  srv = await powerOn(vm)
  const st = await srv.status('vm1', 'disk')
  t.is(st.mode, 'nonpersistent')
  t.is(st.redoLogs, 1, 'exactly one (new) session redo log')
  await liveEquals(t, srv, vm.orig, 'after the crash and remount')
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(vm), [], 'no redo log left after a clean unmount')
  await fileEquals(t, vm, 'disk.vmdk', vm.orig, 'the base is untouched')
})

test('undoable: the session redo log is kept by default and appended to; poweroff=discard and poweroff=commit are honoured', async t => {
  const vm = await makeVm('undoable')
  const model = Buffer.from(vm.orig)
  // cycle 1: keep (default)
  let srv = await powerOn(vm)
  let st = await srv.status('vm1', 'disk')
  t.is(st.mode, 'undoable')
  t.is(st.redoLogs, 1)
  await writeLive(srv, model, 2 * M + 1, 65536)
  await srv.stopClean(t)
  const kept = await redoFiles(vm)
  t.is(kept.length, 1, 'the session redo log is kept')
  await fileEquals(t, vm, kept[0], model, 'kept redo log')
  await fileEquals(t, vm, 'disk.vmdk', vm.orig, 'base after keep')
  // cycle 2: appends to the kept one, then poweroff=discard
  srv = await powerOn(vm)
  st = await srv.status('vm1', 'disk')
  t.is(st.redoLogs, 1, 'no second redo log: the kept one is appended to')
  t.is(st.top, kept[0])
  await liveEquals(t, srv, model, 'cycle 2 sees the kept writes')
  await writeLive(srv, Buffer.from(model), 11 * M, 4096)
  const d = await srv.command('vm1', 'disk', 'poweroff', 'discard')
  t.is(d.code, 0, describe(d))
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(vm), [], 'poweroff=discard deletes the redo log')
  await fileEquals(t, vm, 'disk.vmdk', vm.orig, 'base after discard')
  // cycle 3: a new session, then poweroff=commit
  srv = await powerOn(vm)
  st = await srv.status('vm1', 'disk')
  t.is(st.redoLogs, 1)
  await liveEquals(t, srv, vm.orig, 'cycle 3 starts from the base')
  const committed = Buffer.from(vm.orig)
  await writeLive(srv, committed, 13 * M - 7, 200000)
  const c = await srv.command('vm1', 'disk', 'poweroff', 'commit')
  t.is(c.code, 0, describe(c))
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(vm), [], 'poweroff=commit merges the redo log away')
  t.is(await vmxFileName(vm), 'disk.vmdk')
  await fileEquals(t, vm, 'disk.vmdk', committed, 'base after commit')
  // cycle 4: the committed data is there
  srv = await powerOn(vm)
  await liveEquals(t, srv, committed, 'cycle 4')
  await srv.stopClean(t)
})

test('redo logs a user adds during a nonpersistent or undoable session belong to it: discarded or committed with it at power off', async t => {
  // nonpersistent: everything written in the session goes, however many redo logs it used
  const np = await makeVm('nonpersistent')
  let srv = await powerOn(np)
  const scratch = Buffer.from(np.orig)
  await writeLive(srv, scratch, 100, 300000)
  await srv.commandOk('vm1', 'disk', 'addredo')
  await writeLive(srv, scratch, 7 * M, 300000)
  t.is((await srv.status('vm1', 'disk')).redoLogs, 2)
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(np), [], 'a redo log of the session was kept')
  t.is(await vmxFileName(np), 'disk.vmdk')
  await fileEquals(t, np, 'disk.vmdk', np.orig, 'the base after a nonpersistent session')
  // undoable with poweroff=commit: both redo logs of the session reach the base
  const un = await makeVm('undoable')
  srv = await powerOn(un)
  const model = Buffer.from(un.orig)
  await writeLive(srv, model, 2 * M + 1, 65536)
  await srv.commandOk('vm1', 'disk', 'addredo')
  await writeLive(srv, model, 11 * M, 4096)
  await srv.commandOk('vm1', 'disk', 'poweroff', 'commit')
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(un), [], 'a redo log of the session was left')
  t.is(await vmxFileName(un), 'disk.vmdk')
  await fileEquals(t, un, 'disk.vmdk', model, 'the base after poweroff=commit')
})

test('a nonpersistent session whose first redo log the user commits into the base: the redo logs above it still belong to the session and go at power off', async t => {
  const np = await makeVm('nonpersistent')
  const srv = await powerOn(np)
  const kept = Buffer.from(np.orig)
  await writeLive(srv, kept, 3 * M, 70000)
  await srv.commandOk('vm1', 'disk', 'addredo')
  const scratch = Buffer.from(kept)
  await writeLive(srv, scratch, 9 * M, 70000)
  await srv.commandOk('vm1', 'disk', 'commit', 'level=1') // the session's first redo log into the base
  t.is((await srv.status('vm1', 'disk')).redoLogs, 1)
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(np), [], 'the session\'s remaining redo log survived a nonpersistent power off')
  await fileEquals(t, np, 'disk.vmdk', kept, 'the base holds what was committed, and only that')
})

test('nonpersistent: a session commit that stopped midway keeps the session at power off (the base holds part of it): the server says so and exits 1, and the next power on leaves the disk out with the reason', async t => {
  const np = await makeVm('nonpersistent')
  np.cycle++
  // the commit's second 4 MiB chunk fails: the first is in the base by then
  const srv = await ctx.mount(np.store, path.join(np.root, `mnt${np.cycle}`), [], { REDOFS_FAIL_ONCE: 'commit.copy#2' })
  await writeLive(srv, Buffer.from(np.orig), 0, 12 * M)
  await srv.commandOk('vm1', 'disk', 'addredo')
  const r = await srv.command('vm1', 'disk', 'commit', 'level=1') // the session's first redo log into the base
  t.not(r.code, 0, 'the commit did not fail')
  const st = await srv.status('vm1', 'disk')
  t.regex(st.generations[0].inFlux ?? '', /generation 0 holds part of generation 1's changes/)
  // the generation's image and its map stay closed
  for (const f of [srv.img('vm1', 'disk', 0), srv.ctl('vm1', 'disk', 'map@0')]) {
    const busy = await sh('head -c 1 "$1"', [f])
    t.not(busy.code, 0, `${f} opened`)
    t.regex(busy.stderr, /busy/i)
  }
  const e = await srv.stop()
  t.is(e.code, 1, srv.stderr)
  t.regex(srv.stderr, /power off failed: .*generation 0 holds part of generation 1's changes/)
  t.deepEqual(await redoFiles(np), ['disk-000001.vmdk', 'disk-000002.vmdk'], 'the session was discarded onto a base holding part of it')
  // the next power on would discard that session onto the mixed base: the disk is left out
  const again = await powerOn(np)
  const vm = JSON.parse(await readFile(again.ctl('vm1', undefined, 'status'), 'utf8')) as { disks: unknown[], errors: Array<{ message: string }> }
  t.deepEqual(vm.disks, [])
  t.true(vm.errors.some(x => /power on of disk \(nonpersistent\): discard: generation 0 holds part of generation 1's changes/.test(x.message)), JSON.stringify(vm.errors))
  await again.stopClean(t)
  t.deepEqual(await redoFiles(np), ['disk-000001.vmdk', 'disk-000002.vmdk'])
})

test('append: the redo log is added once, kept at unmount and appended to at the next mount', async t => {
  const vm = await makeVm('append')
  const model = Buffer.from(vm.orig)
  let srv = await powerOn(vm)
  let st = await srv.status('vm1', 'disk')
  t.is(st.mode, 'append')
  t.is(st.redoLogs, 1, 'a redo log is added when there is none')
  await writeLive(srv, model, 3 * M - 2, 5000)
  await srv.stopClean(t)
  const files = await redoFiles(vm)
  t.is(files.length, 1)
  await fileEquals(t, vm, files[0], model, 'redo log after cycle 1')
  srv = await powerOn(vm)
  st = await srv.status('vm1', 'disk')
  t.is(st.redoLogs, 1, 'the existing redo log is appended to')
  t.is(st.top, files[0])
  // poweroff is an undoable disk's choice: taken here, it would silently do nothing
  const po = await srv.command('vm1', 'disk', 'poweroff', 'discard')
  t.not(po.code, 0, 'poweroff=discard was accepted on an append disk')
  t.regex(await srv.errorText('vm1', 'disk'), /is append; only an undoable disk chooses at power off/)
  await liveEquals(t, srv, model, 'cycle 2')
  await writeLive(srv, model, 3 * M, 100)
  await srv.stopClean(t)
  t.deepEqual(await redoFiles(vm), files, 'still the same single redo log')
  await fileEquals(t, vm, files[0], model, 'redo log after cycle 2')
  await fileEquals(t, vm, 'disk.vmdk', vm.orig, 'the base is untouched')
})
