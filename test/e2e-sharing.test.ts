/**
 * Disks that share files, and commands on a whole VM (SPEC §1, §3, §4): one file is never
 * served as two disks, a linked clone's jobs never make another disk's live file theirs, a
 * .vmx never follows another disk's chain, a VM-wide command is all or none and its undo keeps
 * what the VM wrote, power-off actions happen (or say why not), a .vmx that cannot be rewritten
 * does not fail a job that is done, and a command file takes one command at a time.
 */
import test from 'ava'
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { REDOFS_BIN } from './helpers/env'
import { createDisk, e2e, requireFuse, sh, shOk, writeVmx, type Server } from './helpers/mount'
import { describe, mustRun, run, sha256File } from './helpers/qemu'

const ok = requireFuse(test)
const env = e2e(test)

interface VmStatus { name: string, errors: Array<{ message: string }>, disks: Array<{ disk: string }> }
const vmsOf = async (mnt: string): Promise<VmStatus[]> => (JSON.parse(await readFile(path.join(mnt, '.ctl', 'status'), 'utf8')) as { vms: VmStatus[] }).vms

/** vmA/d.vmdk (a base with data) and a linked clone vmB/b.vmdk built on it by qemu-img. */
async function templateAndClone (dir: string): Promise<string> {
  const store = path.join(dir, 'store')
  await createDisk(store, 'vmA', 'd', '8M')
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x44 0 1M', path.join(store, 'vmA', 'd.vmdk')])
  await mkdir(path.join(store, 'vmB'))
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', '../vmA/d.vmdk', '-F', 'vmdk', path.join(store, 'vmB', 'b.vmdk')])
  return store
}

/** vm/d.vmdk and vm/vm.vmx naming it. */
async function diskWithVmx (): Promise<{ dir: string, store: string, vm: string }> {
  const dir = await env.tmp()
  const store = path.join(dir, 'store')
  const vm = path.join(store, 'vm')
  await createDisk(store, 'vm', 'd', '8M')
  await writeVmx(path.join(vm, 'vm.vmx'), [{ fileName: 'd.vmdk' }])
  return { dir, store, vm }
}

/** vm/a and vm/b (8M each, no .vmx), mounted with `faults` in the server's environment. */
async function mountTwoDisks (faults: Record<string, string>): Promise<Server> {
  const dir = await env.tmp()
  const store = path.join(dir, 'store')
  for (const d of ['a', 'b']) await createDisk(store, 'vm', d, '8M')
  return await env.mount(store, path.join(dir, 'mnt'), [], faults)
}

if (ok) {
  test.serial('two .vmx files naming one disk: it is served once, by the VM whose directory holds it; the other leaves it out naming the owner', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    // "app" sorts first, but the disk lies in "db"'s directory
    await createDisk(store, 'db', 'd', '8M')
    await writeVmx(path.join(store, 'db', 'db.vmx'), [{ fileName: 'd.vmdk' }])
    await mkdir(path.join(store, 'app'))
    await writeVmx(path.join(store, 'app', 'app.vmx'), [{ fileName: '../db/d.vmdk' }])
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vms.find(v => v.name === 'db')?.disks.map(d => d.disk), ['d'], 'the disk\'s own VM lost it')
    const app = vms.find(v => v.name === 'app')
    t.deepEqual(app?.disks, [], 'app serves the same file as a second disk')
    t.regex(app?.errors.map(e => e.message).join('\n') ?? '', /d\.vmdk: already served as db\/d/)
    await s.stopClean(t)
  })

  test.serial('a disk its own VM leaves out (a damaged redo log) is not served through another VM\'s .vmx either', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'db', 'd', '8M')
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'db', 'd')])
    await writeVmx(path.join(store, 'db', 'db.vmx'), [{ fileName: 'd-000001.vmdk' }])
    await shOk('printf XXXX | dd of="$1" conv=notrunc status=none', [path.join(store, 'db', 'd-000001.vmdk')])
    await mkdir(path.join(store, 'app'))
    await writeVmx(path.join(store, 'app', 'app.vmx'), [{ fileName: '../db/d.vmdk' }])
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vms.find(v => v.name === 'db')?.disks, [])
    t.deepEqual(vms.find(v => v.name === 'app')?.disks, [], 'the disk left out for its damaged redo log was served through app')
    t.regex(vms.find(v => v.name === 'app')?.errors.map(e => e.message).join('\n') ?? '', /d\.vmdk: a disk of VM directory db\/d; disk "d" of app left out/)
    await s.stopClean(t)
  })

  test.serial('a .vmx does not follow a child of another disk: the disk it names stays its own, the .vmx unchanged', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'd', '8M')
    const vm = path.join(store, 'vm')
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'd.vmdk', '-F', 'vmdk', path.join(vm, 'e.vmdk')]) // another disk built on d
    await writeVmx(path.join(vm, 'vm.vmx'), [{ fileName: 'd.vmdk' }])
    const before = await readFile(path.join(vm, 'vm.vmx'), 'utf8')
    const s = await env.mount(store, path.join(dir, 'mnt'))
    t.deepEqual((await readdir(path.join(s.mnt, 'vm'))).sort(), ['d.img'])
    t.is((await s.status('vm', 'd')).top, 'd.vmdk')
    await s.stopClean(t)
    t.is(await readFile(path.join(vm, 'vm.vmx'), 'utf8'), before, 'the .vmx was pointed at another disk')
  })

  test.serial('a template that a linked clone is built on stays its VM\'s disk (read-only); the clone\'s discard or commit cannot make it the clone\'s live file', async t => {
    const dir = await env.tmp()
    const store = await templateAndClone(dir)
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vms.find(v => v.name === 'vmA')?.disks.map(d => d.disk), ['d'], 'the template VM has no disk')
    t.deepEqual(vms.find(v => v.name === 'vmA')?.errors.map(e => e.message).filter(m => !/read-only/.test(m)), [])
    const w = await sh('printf x | dd of="$1" conv=notrunc status=none', [s.img('vmA', 'd')])
    t.not(w.code, 0, 'the template took a write while a clone is built on it')
    for (const cmd of ['discard', 'commit']) {
      const r = await s.command('vmB', 'b', cmd)
      t.not(r.code, 0, `${cmd} on the clone made the template its live file`)
      t.regex(await s.errorText('vmB', 'b'), /d\.vmdk: the live file of disk vmA\/d/)
    }
    t.is((await s.status('vmB', 'b')).redoLogs, 1)
    await s.stopClean(t)
    // offline the same
    const r = await run(process.execPath, [REDOFS_BIN, 'discard', path.join(store, 'vmB', 'b')])
    t.is(r.code, 1, describe(r))
    t.regex(r.stderr, /d\.vmdk: the live file of disk vmA\/d/)
    // the owner is what a mount would serve: here another VM's .vmx names the template (vmA's
    // own .vmx names only another disk, and a leftover .vmx beside it names nothing)
    await createDisk(store, 'vmA', 'other', '8M')
    await writeVmx(path.join(store, 'vmA', 'vmA.vmx'), [{ fileName: 'other.vmdk' }])
    await writeVmx(path.join(store, 'vmA', 'backup.vmx'), [])
    await mkdir(path.join(store, 'app'))
    await writeVmx(path.join(store, 'app', 'app.vmx'), [{ fileName: '../vmA/d.vmdk' }])
    const viaApp = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vmB', 'b'), 'level=0'])
    t.is(viaApp.code, 1, describe(viaApp))
    t.regex(viaApp.stderr, /d\.vmdk: the live file of disk app\/d/)
    // a base no disk serves (in the store's root, not a VM directory) is no other disk's top
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', path.join(store, 'base.vmdk'), '8M'])
    await mkdir(path.join(store, 'vmC'))
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', '../base.vmdk', '-F', 'vmdk', path.join(store, 'vmC', 'c.vmdk')])
    const c = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vmC', 'c'), 'level=0'])
    t.is(c.code, 0, describe(c))
  })

  test.serial('the owner of a file is the VM whose directory holds it: a clone may not write its template even when that VM leaves the disk out, and another VM naming the file does not make it the owner', async t => {
    const dir = await env.tmp()
    const store = await templateAndClone(dir) // vmA/d.vmdk <- vmB/b.vmdk
    // a stray file of disk d that cannot be read: vmA leaves d out
    await writeFile(path.join(store, 'vmA', 'd-000009.vmdk'), Buffer.alloc(2 << 20, 7))
    const s = await env.mount(store, path.join(dir, 'mnt'))
    t.deepEqual((await vmsOf(s.mnt)).find(v => v.name === 'vmA')?.disks, [], 'vmA served d despite its damaged file')
    const r = await s.command('vmB', 'b', 'commit')
    t.not(r.code, 0, 'the clone committed into the template its VM owns')
    t.regex(await s.errorText('vmB', 'b'), /d\.vmdk: the live file of disk vmA\/d/)
    await s.stopClean(t)
    // offline: VM "aa" (sorted first) names both a template and its clone, which share a disk
    // name; the owners stay the VMs whose directories hold them, as on the mount
    await createDisk(store, 'vmX', 'x', '8M')
    await mkdir(path.join(store, 'vmY'))
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', '../vmX/x.vmdk', '-F', 'vmdk', path.join(store, 'vmY', 'x-000001.vmdk')])
    await mkdir(path.join(store, 'aa'))
    await writeVmx(path.join(store, 'aa', 'aa.vmx'), [{ fileName: '../vmX/x.vmdk' }, { fileName: '../vmY/x-000001.vmdk' }])
    const off = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vmY', 'x'), 'level=0'])
    t.is(off.code, 1, describe(off))
    t.regex(off.stderr, /x\.vmdk: the live file of disk vmX\/x/)
  })

  test.serial('a VM-wide discard refused for one disk (its kept layer is shared) changes no disk', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    for (const d of ['a', 'b']) {
      await createDisk(store, 'vm1', d, '8M')
      await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm1', d)])
    }
    await mkdir(path.join(store, 'vm2'))
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', '../vm1/b.vmdk', '-F', 'vmdk', path.join(store, 'vm2', 'c.vmdk')])
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const r = await s.command('vm1', undefined, 'discard')
    t.not(r.code, 0, 'the VM-wide discard succeeded')
    t.regex(await s.errorText('vm1'), /shared by other chains/)
    t.is((await s.status('vm1', 'a')).redoLogs, 1, 'disk a was discarded although disk b refused')
    t.is((await s.status('vm1', 'b')).redoLogs, 1)
    await s.stopClean(t)
  })

  test.serial('while a VM-wide discard works through its disks, a command on a disk it has not reached yet is refused (EBUSY)', async t => {
    // deleting a's earlier redo log takes 3 s: the VM-wide discard waits for it on disk a first
    const s = await mountTwoDisks({ REDOFS_DELAY: 'reap:3000' })
    for (let i = 0; i < 2; i++) for (const d of ['a', 'b']) await s.commandOk('vm', d, 'addredo')
    await s.commandOk('vm', 'a', 'discard')
    const vmWide = s.command('vm', undefined, 'discard')
    await new Promise(resolve => setTimeout(resolve, 1000))
    const r = await s.command('vm', 'b', 'addredo')
    t.not(r.code, 0, 'an addredo on disk b slipped in while the VM-wide discard held it')
    t.regex(await s.errorText('vm', 'b'), /a command on the whole VM is running/)
    t.is((await vmWide).code, 0, await s.errorText('vm'))
    t.is((await s.status('vm', 'a')).redoLogs, 0)
    t.is((await s.status('vm', 'b')).redoLogs, 1)
    await s.stopClean(t)
  })

  test.serial('a VM-wide addredo that fails on its second disk merges the first disk\'s new redo log back: what the VM wrote meanwhile stays', async t => {
    // the second addredo fails; between the two, a write lands in disk a's new redo log
    const s = await mountTwoDisks({ REDOFS_FAIL_ONCE: 'addredo#2', REDOFS_DELAY: 'vm.addredo:1500' })
    const vmCmd = s.command('vm', undefined, 'addredo')
    await new Promise(resolve => setTimeout(resolve, 700))
    await shOk('dd if=/dev/urandom of="$1" bs=64k count=4 conv=notrunc,fsync status=none', [s.img('vm', 'a')])
    const written = await sha256File(s.img('vm', 'a'))
    const r = await vmCmd
    t.not(r.code, 0, 'the VM-wide addredo succeeded')
    t.regex(await s.errorText('vm'), /injected I\/O error/)
    t.is((await s.status('vm', 'a')).redoLogs, 0, 'disk a kept its new redo log')
    t.is(await sha256File(s.img('vm', 'a')), written, 'the write made into the undone redo log was lost')
    await s.stopClean(t)
  })

  test.serial('power off ends a nonpersistent session whose base a linked clone shares, and a undoable discard with a generation file still open', async t => {
    const dir = await env.tmp()
    const store = await templateAndClone(dir)
    await writeVmx(path.join(store, 'vmA', 'vmA.vmx'), [{ fileName: 'd.vmdk', mode: 'nonpersistent' }])
    const base = await sha256File(path.join(store, 'vmA', 'd.vmdk'))
    // rounds 0 and 1 power off; round 2 is killed, and the next power on drops its session
    for (let round = 0; round < 4; round++) {
      const s = await env.mount(store, path.join(dir, 'mnt'))
      t.deepEqual((await vmsOf(s.mnt)).find(v => v.name === 'vmA')?.disks.map(d => d.disk), ['d'], `round ${round}: the disk was left out`)
      if (round === 3) { await s.stopClean(t); break }
      await shOk('printf session | dd of="$1" conv=notrunc,fsync status=none', [s.img('vmA', 'd')])
      if (round === 2) { await s.kill(); continue }
      await s.stopClean(t)
      t.deepEqual((await readdir(path.join(store, 'vmA'))).sort(), ['d.vmdk', 'vmA.vmx'], `round ${round}: the session redo log survived power off`)
      t.is(await sha256File(path.join(store, 'vmA', 'd.vmdk')), base)
    }
    t.deepEqual((await readdir(path.join(store, 'vmA'))).sort(), ['d.vmdk', 'vmA.vmx'], 'the killed session\'s redo log survived the next power on and off')
    // undoable, poweroff=discard, a generation file held open across the unmount
    const dir2 = await env.tmp()
    const store2 = path.join(dir2, 'store')
    await createDisk(store2, 'vm', 'u', '8M')
    await writeVmx(path.join(store2, 'vm', 'vm.vmx'), [{ fileName: 'u.vmdk', mode: 'undoable' }])
    const s = await env.mount(store2, path.join(dir2, 'mnt'))
    await shOk('printf session | dd of="$1" conv=notrunc,fsync status=none', [s.img('vm', 'u')])
    await s.commandOk('vm', 'u', 'poweroff', 'discard')
    const holder = (await import('node:child_process')).spawn('sh', ['-c', 'exec 3<"$1"; sleep 30', 'sh', s.img('vm', 'u', 0)], { stdio: 'ignore' })
    t.teardown(() => { holder.kill() })
    await new Promise(resolve => setTimeout(resolve, 300))
    const e = await s.stop()
    holder.kill()
    t.deepEqual(e, { code: 0, signal: null }, `server exit\nstderr: ${s.stderr}`)
    t.deepEqual((await readdir(path.join(store2, 'vm'))).filter(f => f.endsWith('.vmdk')), ['u.vmdk'], 'the session was kept although poweroff=discard')
  })

  test.serial('a .vmx that cannot be rewritten does not fail the addredo that is done: a notice says so, and the next mount heals it', async t => {
    const { dir, store, vm } = await diskWithVmx()
    const s = await env.mount(store, path.join(dir, 'mnt'))
    await mkdir(path.join(vm, 'vm.vmx.redofs-tmp')) // the rewrite's temporary name is taken
    await s.commandOk('vm', 'd', 'addredo')
    const st = await s.status('vm', 'd')
    t.is(st.redoLogs, 1)
    t.true(st.notices.some(n => /the \.vmx could not be updated to name d-000001\.vmdk/.test(n)), `notices: ${JSON.stringify(st.notices)}`)
    await s.stopClean(t)
    await rm(path.join(vm, 'vm.vmx.redofs-tmp'), { recursive: true })
    const again = await env.mount(store, path.join(dir, 'mnt'))
    t.is((await again.status('vm', 'd')).redoLogs, 1)
    await again.stopClean(t)
    t.regex(await readFile(path.join(vm, 'vm.vmx'), 'utf8'), /scsi0:0\.fileName = "d-000001\.vmdk"/)
  })

  test.serial('offline addredo and commit keep the .vmx naming the chain\'s top', async t => {
    const { vm } = await diskWithVmx()
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'd')])
    t.regex(await readFile(path.join(vm, 'vm.vmx'), 'utf8'), /scsi0:0\.fileName = "d-000001\.vmdk"/)
    await mustRun(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'd'), 'level=0'])
    t.regex(await readFile(path.join(vm, 'vm.vmx'), 'utf8'), /scsi0:0\.fileName = "d\.vmdk"/)
    // a commit killed before it could point the .vmx at the parent: its repeat does
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'd')])
    const k = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'd'), 'level=0'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.drop' } })
    t.regex(k.stderr, /crashing at commit\.drop/, describe(k))
    t.regex(await readFile(path.join(vm, 'vm.vmx'), 'utf8'), /scsi0:0\.fileName = "d-000001\.vmdk"/)
    await mustRun(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'd'), 'level=0'])
    t.regex(await readFile(path.join(vm, 'vm.vmx'), 'utf8'), /scsi0:0\.fileName = "d\.vmdk"/, 'the .vmx names the merged redo log')
    // and when the command after the crash is refused (a discard of the top the open merged away)
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'd')])
    const k2 = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(vm, 'd'), 'level=0'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.drop' } })
    t.regex(k2.stderr, /crashing at commit\.drop/, describe(k2))
    const refused = await run(process.execPath, [REDOFS_BIN, 'discard', path.join(vm, 'd')])
    t.is(refused.code, 1, describe(refused))
    t.regex(await readFile(path.join(vm, 'vm.vmx'), 'utf8'), /scsi0:0\.fileName = "d\.vmdk"/, 'a refused command left the .vmx naming the merged redo log')
  })

  test.serial('a second writer to a command file whose command still runs is refused at once (EBUSY), not queued behind it', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'd', '8M')
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm', 'd')])
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 1 0 4M', path.join(store, 'vm', 'd-000001.vmdk')])
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm', 'd')])
    const s = await env.mount(store, path.join(dir, 'mnt'), [], { REDOFS_DELAY: 'commit.chunk:2000' }) // the commit takes a while
    const first = s.command('vm', 'd', 'commit', 'level=1')
    await new Promise(resolve => setTimeout(resolve, 500))
    const second = await s.command('vm', 'd', 'commit', 'level=0')
    t.not(second.code, 0, 'the second command was taken')
    t.regex(second.stderr, /busy/i)
    t.is((await first).code, 0)
    t.is((await s.status('vm', 'd')).redoLogs, 1, 'the second commit ran after the first')
    await s.stopClean(t)
  })
}
