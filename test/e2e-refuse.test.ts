/**
 * E2E acceptance 5 (SPEC §3): refusals are an errno for the writer of the command plus a
 * one-line message in the disk's (or VM's) `error` file and in `status`.
 */
import test, { type ExecutionContext } from 'ava'
import { mkdir } from 'node:fs/promises'
import path from 'node:path'
import { e2e, requireFuse, sh, sleep, type Server } from './helpers/mount'
import { describe, mustRun, qemuWrite, sameContent, type RunResult } from './helpers/qemu'
import { storeChain } from './helpers/store'

requireFuse(test)
const ctx = e2e(test)

const M = 1024 * 1024

let root: string
let srv: Server

test.before(async () => {
  root = await ctx.tmp()
  // vm1 + vm2: linked clones, vm2/disk-000001.vmdk's parent is ../vm1/disk.vmdk
  const c1 = await storeChain(root, 16 * M, [
    { writes: [{ pattern: 0x10, offset: 0, length: 2 * M }] },
    { writes: [{ pattern: 0x11, offset: M, length: 64 * 1024 }] }
  ], 'vm1')
  const vm2 = path.join(c1.store, 'vm2')
  await mkdir(vm2, { recursive: true })
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', '../vm1/disk.vmdk', '-F', 'vmdk', 'disk-000001.vmdk'], { cwd: vm2 })
  await qemuWrite(path.join(vm2, 'disk-000001.vmdk'), [{ pattern: 0x21, offset: 5 * M, length: 4096 }])
  // vm3: a big redo log, so that a commit runs for a while
  await storeChain(root, 256 * M, [{}, { writes: [{ pattern: 0x31, offset: 0, length: 200 * M }] }], 'vm3')
  // vm4: a small disk with one redo log
  await storeChain(root, 16 * M, [{ writes: [{ pattern: 0x41, offset: 0, length: M }] }, {}], 'vm4')
  srv = await ctx.mount(c1.store, path.join(root, 'mnt'), ['--max-redos', '2'])
})

/**
 * The refusal contract: non-zero exit with the errno's text, and one line in error and status
 * that is about THIS refusal (`about`: a word of it; the message of an earlier refusal does not count).
 */
async function assertRefused (t: ExecutionContext, r: RunResult, errnoText: RegExp, about: RegExp, vm: string, disk?: string): Promise<string> {
  t.not(r.code, 0, `expected a refusal\n${describe(r)}`)
  t.regex(r.stderr, errnoText, describe(r))
  const text = await srv.errorText(vm, disk)
  t.true(text.trim().length > 0, `${vm}/${disk ?? ''} error file is empty after: ${r.cmd}`)
  t.regex(text, about, `${vm}/${disk ?? ''} error file does not describe this refusal (${r.cmd}): ${JSON.stringify(text)}`)
  t.false(text.replace(/\n$/, '').includes('\n'), `error file holds more than one line: ${JSON.stringify(text)}`)
  if (disk !== undefined) {
    const st = await srv.status(vm, disk)
    t.is(st.error, text.replace(/\n$/, ''), 'status.error carries the same message')
  }
  return text.trim()
}

test.serial('malformed commands (level=x, bogus=1, freeze=2, a bare word, to=-1) fail with EINVAL and a one-line message in error', async t => {
  const cases: Array<[string, string, RegExp]> = [
    ['commit', 'level=x', /level/],
    ['commit', 'bogus=1', /bogus/],
    ['commit', 'freeze=2', /freeze/],
    ['addredo', 'hello', /hello/],
    ['discard', 'to=-1', /to=-1|-1/]
  ]
  for (const [cmd, line, about] of cases) {
    const r = await srv.command('vm4', 'disk', cmd, line)
    const msg = await assertRefused(t, r, /Invalid argument/, about, 'vm4', 'disk')
    t.log(`${cmd} ${line}: ${msg}`)
  }
  // the same on the VM-wide control files
  const v = await srv.command('vm4', undefined, 'commit', 'level=x')
  await assertRefused(t, v, /Invalid argument/, /level/, 'vm4')
  const st = await srv.status('vm4', 'disk')
  t.is(st.redoLogs, 1, 'nothing changed')
})

test.serial('a command while a job runs fails with EBUSY (commit wait=0 on a big redo, then another command at once)', async t => {
  const r = await sh(`echo "level=0 wait=0" > "$1/commit" || exit 10
    echo > "$1/addredo"; echo "addredo=$?"
    echo level=0 > "$1/commit"; echo "commit=$?"`, [path.join(srv.mnt, '.ctl', 'vm3', 'disk')])
  t.is(r.code, 0, `the first commit (wait=0) is accepted\n${describe(r)}`)
  t.regex(r.stdout, /addredo=1/, describe(r))
  t.regex(r.stdout, /commit=1/, describe(r))
  t.regex(r.stderr, /Device or resource busy[\s\S]*Device or resource busy/, describe(r))
  const msg = await assertRefused(t, { ...r, code: 1 }, /Device or resource busy/, /job|running|busy/i, 'vm3', 'disk')
  t.log(msg)
  // the running job is unaffected and completes
  let st = await srv.status('vm3', 'disk')
  for (let i = 0; i < 3000 && st.job !== null; i++) { await sleep(20); st = await srv.status('vm3', 'disk') }
  t.is(st.lastJob?.state, 'done', JSON.stringify(st.lastJob))
  t.is(st.redoLogs, 0, 'only the accepted commit happened')
})

test.serial('a commit into a parent that another chain shares fails with EBUSY, and succeeds with force=1', async t => {
  const vm2Before = path.join(root, 'vm2-before.raw')
  await mustRun('cp', [srv.img('vm2', 'disk'), vm2Before])
  const r = await srv.command('vm1', 'disk', 'commit', 'level=0')
  const msg = await assertRefused(t, r, /Device or resource busy/, /shared|force/i, 'vm1', 'disk')
  t.log(msg)
  t.is((await srv.status('vm1', 'disk')).redoLogs, 1, 'the refused commit changed nothing')
  t.true((await sameContent(srv.img('vm2', 'disk'), vm2Before)).same, 'the other chain still reads the same')
  const f = await srv.command('vm1', 'disk', 'commit', 'level=0 force=1')
  t.is(f.code, 0, `${describe(f)}\nerror: ${await srv.errorText('vm1', 'disk')}`)
  t.is((await srv.status('vm1', 'disk')).redoLogs, 0)
})

test.serial('opening a frozen file for writing fails with EROFS and leaves a one-line message in error', async t => {
  const r = await sh('dd if=/dev/zero of="$1" bs=4096 count=1 conv=notrunc status=none', [srv.img('vm4', 'disk', 0)])
  const msg = await assertRefused(t, r, /Read-only file system/, /read-only|frozen|EROFS|write/i, 'vm4', 'disk')
  t.log(msg)
})

test.serial('addredo beyond --max-redos (2) fails with EBUSY and a one-line message in error', async t => {
  t.is((await srv.status('vm4', 'disk')).redoLogs, 1)
  const ok = await srv.command('vm4', 'disk', 'addredo')
  t.is(ok.code, 0, describe(ok))
  t.is((await srv.status('vm4', 'disk')).redoLogs, 2)
  const r = await srv.command('vm4', 'disk', 'addredo')
  const msg = await assertRefused(t, r, /Device or resource busy/, /max-redos|redo logs/i, 'vm4', 'disk')
  t.log(msg)
  t.is((await srv.status('vm4', 'disk')).redoLogs, 2, 'no third redo log')
  const v = await srv.command('vm4', undefined, 'addredo')
  await assertRefused(t, v, /Device or resource busy/, /max-redos|redo logs/i, 'vm4')
  t.is((await srv.status('vm4', 'disk')).redoLogs, 2, 'no third redo log from the VM-wide addredo either')
  await srv.stopClean(t)
})
