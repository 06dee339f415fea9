/**
 * Full stores, locks, redo growth limits and containment: refusals are clear, nothing written
 * earlier is damaged, and the mount keeps serving.
 */
import test from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import { access, chmod, mkdir, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises'
import { hostname } from 'node:os'
import path from 'node:path'
import { processStart, REGISTRY } from '../src/cli/serve'
import { REDOFS_BIN } from './helpers/env'
import { createDisk, e2e, isMounted, requireFuse, sh, shOk, storeWithRedo, writeVmx } from './helpers/mount'
import { describe, mustRun, run, sha256File, snapshotTree } from './helpers/qemu'

const ok = requireFuse(test)
const env = e2e(test)

async function tmpfs (dir: string, size: string): Promise<() => void> {
  await mkdir(dir, { recursive: true })
  await mustRun('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir])
  return () => { spawnSync('umount', ['-l', dir]) }
}

if (ok) {
  test.serial('full store: ENOSPC, earlier data intact, mount keeps serving, writes resume when space is freed', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    const unmountTmpfs = await tmpfs(store, '24M')
    t.teardown(unmountTmpfs)
    await createDisk(store, 'vm', 'disk', '64M')
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm', 'disk'), 'label=before'])
    const filler = path.join(store, 'filler')
    await shOk('dd if=/dev/zero of="$1" bs=1M count=8 status=none', [filler])
    const server = await env.mount(store, path.join(dir, 'mnt'))
    const img = server.img('vm', 'disk')
    // 4 MiB of known data, acknowledged by fsync
    await shOk('dd if=/dev/urandom of="$2" bs=1M count=4 status=none && dd if="$2" of="$1" bs=1M conv=notrunc,fsync status=none', [img, path.join(dir, 'known.raw')])
    const known = await sha256File(path.join(dir, 'known.raw'))
    // now fill the store through the disk: must end with ENOSPC, not a crash
    const fill = await sh('dd if=/dev/urandom of="$1" bs=1M seek=8 count=40 conv=notrunc,fsync', [img])
    t.not(fill.code, 0, 'writing 40 MiB into a 24 MiB store succeeded?')
    t.regex(fill.stderr, /No space left on device/)
    t.true(server.running, 'the server died on ENOSPC')
    const again = await sh('head -c 4194304 "$1" | sha256sum', [img])
    t.is(again.stdout.split(' ')[0], known, 'data written before the store filled changed')
    const status = JSON.parse(await readFile(path.join(server.mnt, '.ctl', 'status'), 'utf8')) as { vms: unknown[] }
    t.is(status.vms.length, 1, 'status still answers')
    // addredo refuses before it starts, even the label it would move stays where it was
    const add = await server.command('vm', 'disk', 'addredo', 'label=before')
    t.not(add.code, 0, 'addredo on a full store succeeded')
    t.regex(await server.errorText('vm', 'disk'), /free|space|ENOSPC/i)
    const gens = (await server.status('vm', 'disk')).generations
    t.deepEqual(gens.map(g => g.label), ['before', null], 'the refused addredo moved the label')
    // commit estimates what it needs and refuses up front
    const files = await snapshotTree(path.join(store, 'vm'))
    const com = await server.command('vm', 'disk', 'commit', 'level=0')
    t.not(com.code, 0, 'commit on a full store succeeded')
    t.regex(await server.errorText('vm', 'disk'), /free|space|ENOSPC/i)
    t.deepEqual(Object.keys(await snapshotTree(path.join(store, 'vm'))).sort(), Object.keys(files).sort(), 'the refused commit left files behind')
    // free space: writes work again and read back
    await rm(filler)
    await shOk('dd if=/dev/urandom of="$2" bs=1M count=2 status=none && dd if="$2" of="$1" bs=1M seek=30 conv=notrunc,fsync status=none', [img, path.join(dir, 'later.raw')])
    const later = await sh('dd if="$1" bs=1M skip=30 count=2 status=none | sha256sum', [img])
    t.is(later.stdout.split(' ')[0], await sha256File(path.join(dir, 'later.raw')))
    await server.stopClean(t)
    const c = await run(process.execPath, [REDOFS_BIN, 'check', path.join(store, 'vm', 'disk')])
    t.is(c.code, 0, describe(c))
    const q = await run('qemu-img', ['check', path.join(store, 'vm', 'disk-000001.vmdk')])
    t.is(q.code, 0, describe(q))
  })

  test.serial('locking: a command killed while taking the lock leaves no lock that blocks the next one', async t => {
    const { store, vm } = await storeWithRedo(env.tmp, '8M')
    const killed = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'disk')], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'lock.staged' } })
    t.regex(killed.stderr, /crashing at lock\.staged/, describe(killed))
    const next = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'disk')])
    t.is(next.code, 0, describe(next))
    t.deepEqual((await readdir(store)).filter(n => n.startsWith('.redofs.lock')), [], 'lock files left behind')
  })

  test.serial('locking: a second mount and an offline commit are refused naming the holder; a stale lock is taken over', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '8M')
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm', 'disk')])
    const server = await env.mount(store, path.join(dir, 'mnt'))
    const pid = String(server.proc.pid)
    const second = await run(process.execPath, [REDOFS_BIN, 'mount', store, path.join(dir, 'mnt2')], { timeoutMs: 20_000 })
    t.is(second.code, 1, describe(second))
    t.true(second.stderr.includes(`pid ${pid}`) && second.stderr.includes(hostname()) && /since \d{4}-/.test(second.stderr), second.stderr)
    t.false(isMounted(path.join(dir, 'mnt2')))
    const offline = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vm', 'disk'), 'level=0'])
    t.is(offline.code, 1, describe(offline))
    t.true(offline.stderr.includes(`pid ${pid}`), offline.stderr)
    t.is(offline.stderr.trim().split('\n').length, 1)
    await server.stopClean(t)
    // a lock left by a process that no longer exists
    const dead = spawnSync(process.execPath, ['-e', 'console.log(process.pid)'], { encoding: 'utf8' })
    await writeFile(path.join(store, '.redofs.lock'), JSON.stringify({ pid: Number(dead.stdout.trim()), host: hostname(), since: new Date(0).toISOString(), what: 'redofs mount' }))
    const taken = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vm', 'disk'), 'level=0'])
    t.is(taken.code, 0, describe(taken))
    await t.throwsAsync(stat(path.join(store, '.redofs.lock')), undefined, 'lock not released after the command')
  })

  test.serial('a failed write-back stays failed: later fsyncs fail too, status names the file, the rest keeps serving', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '64M')
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm', 'disk')])
    // the server's third fdatasync fails, as a disk error during write-back would: the first
    // two start the write session (the unclean flag, the new CID), the third flushes the data
    const server = await env.mount(store, path.join(dir, 'mnt'), [], { REDOFS_FAIL_ONCE: 'datasync#3' })
    const img = server.img('vm', 'disk')
    const data = path.join(dir, 'data.raw')
    await shOk('dd if=/dev/urandom of="$1" bs=64k count=16 status=none', [data])
    const first = await sh('dd if="$2" of="$1" bs=64k seek=4 conv=notrunc,fsync status=none', [img, data])
    t.not(first.code, 0, 'the fsync whose write-back failed succeeded')
    t.regex(first.stderr, /fsync failed/, 'the data was refused instead of its flush')
    // Linux would now answer the next fdatasync with success over the lost pages: redofs must not
    const second = await sh('dd if="$2" of="$1" bs=64k seek=40 conv=notrunc,fsync status=none', [img, data])
    t.not(second.code, 0, 'a later fsync succeeded after a write-back failure')
    t.regex(second.stderr, /Input\/output error/)
    const st = await server.status('vm', 'disk')
    t.true(st.problems.some(p => p.includes('disk-000001.vmdk') && /writing back/.test(p)), `status problems: ${JSON.stringify(st.problems)}`)
    const frozen = await sh('dd if="$1" bs=1M count=4 status=none | wc -c', [server.img('vm', 'disk', 0)])
    t.is(frozen.stdout.trim(), String(4 * 1024 * 1024), 'the frozen generation stopped serving')
    t.true(server.running, 'the server died')
    await server.stop()
  })

  // the drop renames the redo log, then its digest file: that second rename fails; or every
  // rename works and the directory's sync after them fails
  for (const [what, fail] of [['rename', 'layer.drop#2'], ['directory sync', 'layer.drop.sync']]) {
    test.serial(`a discard whose ${what} fails changes nothing: the live file keeps working and the discard works later`, async t => {
      const { dir, store, vm } = await storeWithRedo(env.tmp, '64M')
      const server = await env.mount(store, path.join(dir, 'mnt'), [], { REDOFS_FAIL_ONCE: fail })
      const img = server.img('vm', 'disk')
      await shOk('dd if=/dev/urandom of="$1" bs=64k count=4 conv=notrunc,fsync status=none', [img])
      const files = (await readdir(vm)).sort()
      const before = (await sh('sha256sum < "$1"', [img])).stdout
      const r = await server.command('vm', 'disk', 'discard')
      t.not(r.code, 0, 'the discard succeeded')
      t.regex(await server.errorText('vm', 'disk'), /injected I\/O error/)
      t.deepEqual((await readdir(vm)).sort(), files, 'the failed discard left renamed files behind')
      t.is((await sh('sha256sum < "$1"', [img])).stdout, before, 'the live file changed')
      await shOk('dd if=/dev/urandom of="$1" bs=64k seek=100 count=4 conv=notrunc,fsync status=none', [img])
      await server.commandOk('vm', 'disk', 'discard')
      t.is((await server.status('vm', 'disk')).redoLogs, 0)
      await server.stopClean(t)
    })
  }

  test.serial('a commit that fails and cannot be undone keeps the chain\'s shape until it is finished: other jobs are refused, the next open finishes it', async t => {
    const { dir, store, vm } = await storeWithRedo(env.tmp, '16M')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x5a 1M 2M', path.join(vm, 'disk-000001.vmdk')])
    // the server's first fdatasync is the parent's, as the commit starts writing it: it fails,
    // the parent keeps the error, so the commit can be neither finished nor undone
    const server = await env.mount(store, path.join(dir, 'mnt'), [], { REDOFS_FAIL_ONCE: 'datasync' })
    const live = await sha256File(server.img('vm', 'disk'))
    const r = await server.command('vm', 'disk', 'commit', 'level=0')
    t.not(r.code, 0, 'the commit succeeded')
    t.regex(await server.errorText('vm', 'disk'), /it is not undone: the next writable open finishes it/)
    t.true((await readdir(vm)).includes('disk.vmdk.redofs-commit'), 'the journal is kept')
    // generation 0 is being merged into: it does not open
    const g0 = await sh('head -c 1 "$1"', [server.img('vm', 'disk', 0)])
    t.not(g0.code, 0, 'generation 0 of an unfinished commit was opened')
    t.regex((await server.status('vm', 'disk')).generations[0].inFlux ?? '', /a commit that failed and is not undone/)
    for (const [cmd, arg] of [['addredo', ''], ['discard', '']]) {
      const refused = await server.command('vm', 'disk', cmd, arg)
      t.not(refused.code, 0, `${cmd} ran on a chain whose commit is unfinished`)
      t.regex(await server.errorText('vm', 'disk'), /failed and is not undone/, cmd)
    }
    t.is((await server.status('vm', 'disk')).redoLogs, 1, 'the chain changed shape')
    t.is(await sha256File(server.img('vm', 'disk')), live, 'the live file reads as before')
    // the live disk keeps taking writes meanwhile (they land in the redo log being merged, new
    // grains and rewritten ones): the roll-forward must carry them into the parent too
    await shOk('dd if=/dev/urandom of="$1" bs=64k seek=100 count=8 conv=notrunc,fsync status=none', [server.img('vm', 'disk')])
    await shOk('dd if=/dev/urandom of="$1" bs=4k seek=300 count=3 conv=notrunc,fsync status=none', [server.img('vm', 'disk')])
    const written = await sha256File(server.img('vm', 'disk'))
    t.not(written, live)
    await server.stop()
    // the next writable open finishes the commit: one layer, the same content
    const again = await env.mount(store, path.join(dir, 'mnt'))
    const st = await again.status('vm', 'disk')
    t.is(st.redoLogs, 0, 'the commit was not finished')
    t.true(st.notices.some(n => /finished the interrupted commit of .*disk-000001\.vmdk into .*disk\.vmdk at mount/.test(n)), `notices: ${JSON.stringify(st.notices)}`)
    t.is(await sha256File(again.img('vm', 'disk')), written, 'writes made after the failed commit were lost')
    await again.stopClean(t)
    t.false((await readdir(vm)).includes('disk.vmdk.redofs-commit'))
    const c = await run(process.execPath, [REDOFS_BIN, 'check', path.join(vm, 'disk')])
    t.is(c.code, 0, describe(c))
  })

  test.serial('the same failed commit run again and undone this time lifts the refusal: the chain is whole and serves as before', async t => {
    const { dir, store, vm } = await storeWithRedo(env.tmp, '16M')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x5a 1M 2M', path.join(vm, 'disk-000001.vmdk')])
    const server = await env.mount(store, path.join(dir, 'mnt'), [], { REDOFS_FAIL_ONCE: 'datasync' })
    const live = await sha256File(server.img('vm', 'disk'))
    t.not((await server.command('vm', 'disk', 'commit', 'level=0')).code, 0)
    t.true((await readdir(vm)).includes('disk.vmdk.redofs-commit'), 'the first failure kept its journal')
    // the parent's write-back error stays until a remount: the retry fails at once, before the
    // copy, and nothing new failed, so it is undone and its journal removed
    t.not((await server.command('vm', 'disk', 'commit', 'level=0')).code, 0, 'the retried commit succeeded over a failed write-back')
    t.false((await readdir(vm)).includes('disk.vmdk.redofs-commit'), 'the retry was not undone')
    await server.commandOk('vm', 'disk', 'addredo')
    t.is((await server.status('vm', 'disk')).redoLogs, 2)
    t.is(await sha256File(server.img('vm', 'disk')), live)
    await server.stop()
    const again = await env.mount(store, path.join(dir, 'mnt'))
    t.is((await again.status('vm', 'disk')).redoLogs, 2)
    t.is(await sha256File(again.img('vm', 'disk')), live)
    await again.stopClean(t)
    const c = await run(process.execPath, [REDOFS_BIN, 'check', path.join(vm, 'disk')])
    t.is(c.code, 0, describe(c))
  })

  test.serial('redo growth: --redo-limit warns in status; --redo-limit-hard fails writes past it with ENOSPC, without damage', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '32M')
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm', 'disk')])
    const soft = await env.mount(store, path.join(dir, 'mnt'), ['--redo-limit', '1M'])
    await shOk('dd if=/dev/urandom of="$1" bs=1M count=2 conv=notrunc,fsync status=none', [soft.img('vm', 'disk')])
    const st = JSON.parse(await readFile(soft.ctl('vm', 'disk', 'status'), 'utf8')) as { warnings: string[] }
    t.true(st.warnings.some(w => /redo-limit/.test(w)), JSON.stringify(st.warnings))
    await soft.stopClean(t)
    const hard = await env.mount(store, path.join(dir, 'mnt'), ['--redo-limit', '3M', '--redo-limit-hard'])
    const img = hard.img('vm', 'disk')
    const before = await sh('head -c 2097152 "$1" | sha256sum', [img])
    const over = await sh('dd if=/dev/urandom of="$1" bs=1M seek=8 count=4 conv=notrunc,fsync', [img])
    t.not(over.code, 0, 'writes past --redo-limit-hard succeeded')
    t.regex(over.stderr, /No space left/)
    // the refusal is only an errno to the writer: status says why
    const hs = JSON.parse(await readFile(hard.ctl('vm', 'disk', 'status'), 'utf8')) as { warnings: string[] }
    t.true(hs.warnings.some(w => /reached --redo-limit 3145728 \(hard\): writes that need new grains fail with ENOSPC/.test(w)), JSON.stringify(hs.warnings))
    // rewriting what the redo log already holds is not growth
    const rewrite = await sh('dd if=/dev/zero of="$1" bs=1M count=1 conv=notrunc,fsync status=none', [img])
    t.is(rewrite.code, 0, describe(rewrite))
    const tail = await sh('dd if="$1" bs=1M skip=1 count=1 status=none | sha256sum', [img])
    t.is(tail.stdout.split(' ')[0], (await sh('dd if="$1" bs=1M skip=1 count=1 status=none | sha256sum', [img])).stdout.split(' ')[0])
    t.not(before.stdout, '')
    // a new redo log (under the same name, after a discard) has room again: no warning
    await hard.commandOk('vm', 'disk', 'discard')
    await hard.commandOk('vm', 'disk', 'addredo')
    const fresh = JSON.parse(await readFile(hard.ctl('vm', 'disk', 'status'), 'utf8')) as { warnings: string[], top: string }
    t.is(fresh.top, 'disk-000001.vmdk')
    t.deepEqual(fresh.warnings, [])
    await hard.stopClean(t)
    const c = await run(process.execPath, [REDOFS_BIN, 'check', path.join(store, 'vm', 'disk')])
    t.is(c.code, 0, describe(c))
  })

  test.serial('containment: hints and extents outside the store are refused; control files are the mounting user\'s', async t => {
    const dir = await env.tmp()
    await chmod(dir, 0o755) // other users must reach the mountpoint to be refused by it
    const store = path.join(dir, 'store')
    await createDisk(store, 'good', 'disk', '8M')
    await createDisk(path.join(dir, 'outside'), 'x', 'base', '8M')
    // a child whose parent hint leaves the store (absolute, and with ..)
    await mkdir(path.join(store, 'evil1'), { recursive: true })
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', path.join(dir, 'outside', 'x', 'base.vmdk'), '-F', 'vmdk', 'disk-000001.vmdk'], { cwd: path.join(store, 'evil1') })
    await mkdir(path.join(store, 'evil2'), { recursive: true })
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', '../../outside/x/base.vmdk', '-F', 'vmdk', 'disk-000001.vmdk'], { cwd: path.join(store, 'evil2') })
    // a flat descriptor whose extent is outside the store
    await mkdir(path.join(store, 'evil3'), { recursive: true })
    await writeFile(path.join(dir, 'outside.raw'), Buffer.alloc(8 << 20))
    await writeFile(path.join(store, 'evil3', 'disk.vmdk'), '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 16384 FLAT "../../outside.raw" 0\n')
    await writeVmx(path.join(store, 'good', 'good.vmx'), [{ fileName: 'disk.vmdk' }])
    const server = await env.mount(store, path.join(dir, 'mnt'), ['--allow-other'])
    const status = JSON.parse(await readFile(path.join(server.mnt, '.ctl', 'status'), 'utf8')) as { vms: Array<{ name: string, disks: unknown[], errors: Array<{ message: string }> }> }
    for (const vm of ['evil1', 'evil2', 'evil3']) {
      const v = status.vms.find(x => x.name === vm)
      t.truthy(v, vm)
      t.is(v?.disks.length, 0, `${vm}: a disk escaping the store was served`)
      t.true(v?.errors.some(e => /outside the store/.test(e.message)), `${vm}: ${JSON.stringify(v?.errors)}`)
    }
    // control files: 0600 and owned by the mounting user; images per their modes for others
    const st = await stat(server.ctl('good', 'disk', 'commit'))
    t.is(st.mode & 0o777, 0o600)
    t.is(st.uid, process.getuid?.() ?? 0)
    const nobody = (cmd: string): Promise<import('./helpers/qemu').RunResult> => sh(`setpriv --reuid=65534 --regid=65534 --clear-groups bash -c "$1"`, [cmd])
    const cmdAsOther = await nobody(`echo > '${server.ctl('good', 'disk', 'addredo')}'`)
    t.not(cmdAsOther.code, 0, 'another user ran a control command')
    t.regex(cmdAsOther.stderr, /Permission denied/)
    const readAsOther = await nobody(`head -c 512 '${server.img('good', 'disk')}' | wc -c`)
    t.is(readAsOther.stdout.trim(), '512', describe(readAsOther))
    const writeAsOther = await nobody(`dd if=/dev/zero of='${server.img('good', 'disk')}' bs=512 count=1 conv=notrunc`)
    t.not(writeAsOther.code, 0, 'another user wrote to a 0644 image')
    await server.stopClean(t)
  })

  test.serial('redofs umount returns once the server is gone, also when its caller started the server and has not reaped it yet', async t => {
    const { dir, store } = await storeWithRedo(env.tmp, '8M')
    const mnt = path.join(dir, 'mnt')
    await mkdir(mnt)
    // a script that starts the mount, then runs umount synchronously: the exited server stays a
    // zombie until the script gets back to its event loop
    const script = `
      const { spawn, execFileSync } = require('child_process')
      const [bin, store, mnt] = process.argv.slice(1)
      const p = spawn(process.execPath, [bin, 'mount', store, mnt], { stdio: ['ignore', 'pipe', 'inherit'] })
      let out = ''
      p.stdout.on('data', d => {
        out += d
        if (!/mounted /.test(out)) return
        p.stdout.removeAllListeners('data')
        const t0 = Date.now()
        try {
          execFileSync(process.execPath, [bin, 'umount', '--timeout', '20', mnt], { stdio: 'inherit' })
          console.log('umount ok after ' + (Date.now() - t0) + ' ms')
        } catch (e) { console.log('umount failed: ' + e.message); process.exitCode = 1 }
      })`
    const r = await run(process.execPath, ['-e', script, REDOFS_BIN, store, mnt], { timeoutMs: 60_000 })
    t.is(r.code, 0, describe(r))
    t.regex(r.stdout, /umount ok/)
    t.false(isMounted(mnt))
  })

  test.serial('redofs umount ends the server that mounted, and never signals a process that took the pid of a killed one', async t => {
    const { dir, store } = await storeWithRedo(env.tmp, '8M')
    const mnt = path.join(dir, 'mnt')
    const server = await env.mount(store, mnt)
    // named through a symbolic link (mountinfo and the registry hold the real path)
    await symlink(mnt, path.join(dir, 'link'))
    const r = await run(process.execPath, [REDOFS_BIN, 'umount', path.join(dir, 'link')])
    t.is(r.code, 0, describe(r))
    t.deepEqual(await server.exited, { code: 0, signal: null }, `server exit\nstderr: ${server.stderr}`)
    t.false(isMounted(mnt))

    // a server killed hard leaves its registry entry; its pid now belongs to someone else
    const other = spawn('sleep', ['60'], { stdio: 'ignore' })
    t.teardown(() => { other.kill() })
    const registry = path.join(REGISTRY, encodeURIComponent(path.resolve(mnt)) + '.json')
    t.is((await stat(REGISTRY)).mode & 0o777, 0o700, 'the registry is open to other users')
    // its start time differs from the entry's; or even an entry naming it exactly: the path is
    // not mounted, so nothing is signalled
    for (const start of [1, processStart(other.pid as number)]) {
      await writeFile(registry, JSON.stringify({ pid: other.pid, start, store, mnt: path.resolve(mnt) }))
      const stale = await run(process.execPath, [REDOFS_BIN, 'umount', mnt])
      t.not(stale.code, 0, 'umount of a path that is not mounted succeeded')
      t.regex(stale.stderr, /not mounted/)
      t.is(other.exitCode, null, 'the unrelated process was signalled')
      t.is(other.signalCode, null, 'the unrelated process was signalled')
    }
    await writeFile(registry, JSON.stringify({ pid: other.pid, start: 1, store, mnt: path.resolve(mnt) }))
    // the next server to start, wherever it mounts, deletes the stale entry (and keeps its own)
    const next = await env.mount(store, path.join(dir, 'mnt2'))
    t.false(await access(registry).then(() => true, () => false), 'the stale registry entry is still there')
    const own = path.join(REGISTRY, encodeURIComponent(next.mnt) + '.json')
    t.true(await access(own).then(() => true, () => false), 'the new server has no registry entry')
    t.is(other.signalCode, null, 'the unrelated process was signalled')
    await next.stopClean(t)
    await rm(registry, { force: true })
  })
}
