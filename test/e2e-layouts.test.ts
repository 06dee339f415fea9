/**
 * Stores laid out wrongly (SPEC §6): files that two disks would both write, FIFOs where VMDK
 * files should be, parent loops, short flat files. The disks concerned are left out (or served
 * read-only) with their files named, the mount comes up, every other disk is served, and no
 * file is written.
 */
import test from 'ava'
import { readFile, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { REDOFS_BIN } from './helpers/env'
import { createDisk, e2e, requireFuse, sh, shOk, writeVmx } from './helpers/mount'
import { describe, run, sha256File, snapshotTree } from './helpers/qemu'
import { storeChain } from './helpers/store'
import { cidText, layerInfo, patchDescriptor, setField } from './helpers/vmdk'

const ok = requireFuse(test)
const env = e2e(test)

const M = 1024 * 1024

interface VmStatus { name: string, errors: Array<{ file: string, message: string }>, disks: Array<{ disk: string, writable: boolean }> }
const vmsOf = async (mnt: string): Promise<VmStatus[]> => (JSON.parse(await readFile(path.join(mnt, '.ctl', 'status'), 'utf8')) as { vms: VmStatus[] }).vms
const vm = (vms: VmStatus[], name: string): VmStatus => vms.find(v => v.name === name) ?? { name, errors: [], disks: [] }

if (ok) {
  test.serial('a live file another descriptor uses too (another disk\'s flat file, a sparse file as FLAT data) is served by no disk; frozen, it is never written', async t => {
    const dir = await env.tmp()
    // vm1/disk: monolithicFlat base with data + a redo log; vm2/x.vmdk names vm1's flat file as
    // its own extent; vm3/y.vmdk names vm4's sparse base (vm4's live file) as a FLAT extent
    const c = await storeChain(dir, 16 * M, [{ format: 'monolithicFlat', writes: [{ pattern: 0x11, offset: 0, length: M }] }, {}], 'vm1')
    const store = c.store
    await createDisk(store, 'vm2', 'unused', '1M') // makes the directory
    await writeFile(path.join(store, 'vm2', 'x.vmdk'), '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 32768 FLAT "../vm1/disk-flat.vmdk" 0\n')
    await storeChain(dir, 16 * M, [{ writes: [{ pattern: 0x44, offset: 0, length: M }] }], 'vm4')
    await createDisk(store, 'vm3', 'unused', '1M')
    await writeFile(path.join(store, 'vm3', 'y.vmdk'), '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 32768 FLAT "../vm4/disk.vmdk" 0\n')
    const before = await snapshotTree(store)
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    const errors = (name: string): string => vm(vms, name).errors.map(e => e.message).join('\n')
    // vm1's flat file is frozen under its redo log: vm1 is served, x (whose live file it would be) is not
    t.deepEqual(vm(vms, 'vm1').disks.map(d => d.disk), ['disk'])
    t.deepEqual(vm(vms, 'vm2').disks.map(d => d.disk), ['unused'])
    t.regex(errors('vm2'), /x\.vmdk: its file .*vm1\/disk-flat\.vmdk is also used by .*vm1\/disk\.vmdk; writing it would change that disk too, so disk "x" is left out \(redofs addredo puts a redo log above it\)/)
    // vm4/disk.vmdk is both vm4's live file and y's data: neither is served
    t.deepEqual(vm(vms, 'vm3').disks.map(d => d.disk), ['unused'])
    t.deepEqual(vm(vms, 'vm4').disks, [])
    t.regex(errors('vm4'), /vm4\/disk\.vmdk: its file .*vm4\/disk\.vmdk is also used by .*vm3\/y\.vmdk/)
    t.is((await shOk('head -c 4 "$1" | od -An -tx1', [s.img('vm1', 'disk')])).stdout.trim(), '11 11 11 11')
    await s.stopClean(t)
    t.deepEqual(await snapshotTree(store), before, 'a file of the store changed')
    // offline: once a redo log is above x, neither a commit into x nor a discard down to it may write vm1's flat file
    const a = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm2', 'x')])
    t.is(a.code, 0, describe(a))
    const q = await run('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x66 0 64k', path.join(store, 'vm2', 'x-000001.vmdk')])
    t.is(q.code, 0, describe(q))
    const vm1 = Object.fromEntries(Object.entries(await snapshotTree(store)).filter(([f]) => f.startsWith('vm1/')))
    const cm = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vm2', 'x'), 'level=0'])
    t.is(cm.code, 1, describe(cm))
    t.regex(cm.stderr, /x\.vmdk: its file .*disk-flat\.vmdk is also used by .*vm1\/disk\.vmdk; committing into it would change that disk too/)
    const dc = await run(process.execPath, [REDOFS_BIN, 'discard', path.join(store, 'vm2', 'x')])
    t.is(dc.code, 1, describe(dc))
    t.regex(dc.stderr, /x\.vmdk: its file .*disk-flat\.vmdk is also used by .*vm1\/disk\.vmdk; making it live would change that disk too/)
    t.deepEqual(Object.fromEntries(Object.entries(await snapshotTree(store)).filter(([f]) => f.startsWith('vm1/'))), vm1, 'vm1 changed')
    // and mounted, x is served now, its writes landing in its redo log
    const s2 = await env.mount(store, path.join(dir, 'mnt'))
    t.deepEqual(vm(await vmsOf(s2.mnt), 'vm2').disks.map(d => d.disk).sort(), ['unused', 'x'])
    await shOk('printf zz | dd of="$1" bs=1 seek=1000 conv=notrunc,fsync status=none', [s2.img('vm2', 'x')])
    await s2.stopClean(t)
    t.deepEqual(Object.fromEntries(Object.entries(await snapshotTree(store)).filter(([f]) => f.startsWith('vm1/'))), vm1, 'vm1 changed')
  })

  test.serial('a template outside the VM directories (hidden, nested) is checked too; a redo log whose delta another descriptor uses is never deleted by a commit or discard', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    const rf = async (...args: string[]): Promise<void> => { await shOk('"$@"', [process.execPath, REDOFS_BIN, ...args]) }
    // .golden/base: a flat template; vm2/c: a linked clone of it; vm1/x.vmdk names its flat file
    await rf('create', path.join(store, '.golden', 'base'), '--size', '4M', '--format', 'flat')
    await createDisk(store, 'vm1', 'other', '1M')
    await shOk('mkdir -p "$1/vm2" && cd "$1/vm2" && qemu-img create -q -f vmdk -b ../.golden/base.vmdk -F vmdk c.vmdk 4M', [store])
    await writeFile(path.join(store, 'vm1', 'x.vmdk'), '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 8192 FLAT "../.golden/base-flat.vmdk" 0\n')
    // vm3/disk has a COWD redo log (a -delta.vmdk extent) under its top; vm4/y.vmdk names that delta as its own
    await createDisk(store, 'vm3', 'disk', '4M')
    await rf('addredo', path.join(store, 'vm3', 'disk'), '--redo-format', 'cowd')
    await rf('addredo', path.join(store, 'vm3', 'disk'))
    await createDisk(store, 'vm4', 'b', '4M')
    const bcid = cidText((await layerInfo(path.join(store, 'vm4', 'b.vmdk'))).cid)
    await writeFile(path.join(store, 'vm4', 'y.vmdk'), `# Disk DescriptorFile\nversion=1\nCID=fffffffd\nparentCID=${bcid}\ncreateType="vmfsSparse"\nparentFileNameHint="b.vmdk"\n\nRW 8192 VMFSSPARSE "../vm3/disk-000001-delta.vmdk"\n`)
    const before = await snapshotTree(store)
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'vm1').disks.map(d => d.disk), ['other'])
    t.regex(vm(vms, 'vm1').errors.map(e => e.message).join('\n'), /x\.vmdk: its file .*\.golden\/base-flat\.vmdk is also used by .*\.golden\/base\.vmdk/)
    t.deepEqual(vm(vms, 'vm2').disks.map(d => d.disk), ['c'])
    for (const to of ['1', '0']) {
      const r = await s.command('vm3', 'disk', 'discard', `to=${to}`)
      t.not(r.code, 0, `discard to=${to} deleted a file vm4/y.vmdk uses`)
    }
    t.regex(await s.errorText('vm3', 'disk'), /disk-000001\.vmdk: its file .*disk-000001-delta\.vmdk is also used by .*vm4\/y\.vmdk; the discard deletes it, which would break that disk/)
    const c = await s.command('vm3', 'disk', 'commit', 'level=1')
    t.not(c.code, 0, 'a commit deleted a file vm4/y.vmdk uses')
    t.regex(await s.errorText('vm3', 'disk'), /the commit deletes it, which would break that disk/)
    await s.stopClean(t)
    t.deepEqual(await snapshotTree(store), before, 'a file of the store changed')
    // offline the same, and no commit into the template through x
    const oc = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vm3', 'disk'), 'level=1'])
    t.is(oc.code, 1, describe(oc))
    await rf('addredo', path.join(store, 'vm1', 'x'))
    const ox = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vm1', 'x'), 'level=0'])
    t.is(ox.code, 1, describe(ox))
    t.regex(ox.stderr, /committing into it would change that disk too/)
    t.is((await snapshotTree(store))['vm3/disk-000001-delta.vmdk'], before['vm3/disk-000001-delta.vmdk'])
    t.is((await snapshotTree(store))['.golden/base-flat.vmdk'], before['.golden/base-flat.vmdk'])
  })

  test.serial('a -flat file that holds a VMDK image is no disk, also when its descriptor names it through a symlink', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'd', 'disk', '8M', 'flat')
    await shOk('qemu-img create -q -f vmdk "$1" 1M && dd if="$1" of="$2" conv=notrunc status=none', [path.join(dir, 'inner.vmdk'), path.join(store, 'd', 'disk-flat.vmdk')])
    await shOk('ln -s . "$1"', [path.join(store, 'd', 'here')])
    const desc = path.join(store, 'd', 'disk.vmdk')
    await writeFile(desc, (await readFile(desc, 'utf8')).replace('"disk-flat.vmdk"', '"here/disk-flat.vmdk"'))
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'd').disks.map(d => d.disk), ['disk'])
    t.deepEqual(vm(vms, 'd').errors, [])
    await s.stopClean(t)
  })

  test.serial('one raw image imported into two VMs (hard links): both disks are served above their redo logs; without one they are not', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await shOk('mkdir -p "$1/vm1" "$1/vm2" && head -c 16777216 /dev/urandom > "$1/golden.img"', [store])
    for (const v of ['vm1', 'vm2']) {
      const r = await run(process.execPath, [REDOFS_BIN, 'import', path.join(store, 'golden.img'), path.join(store, v, 'disk')])
      t.is(r.code, 0, describe(r))
    }
    let s = await env.mount(store, path.join(dir, 'mnt'))
    let vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'vm1').disks, [])
    t.regex(vm(vms, 'vm1').errors.map(e => e.message).join('\n'), /disk-flat\.vmdk is also used by .*vm2\/disk\.vmdk .*redofs addredo puts a redo log above it/)
    await s.stopClean(t)
    for (const v of ['vm1', 'vm2']) await shOk('"$1" "$2" addredo "$3"', [process.execPath, REDOFS_BIN, path.join(store, v, 'disk')])
    const golden = await sha256File(path.join(store, 'golden.img'))
    s = await env.mount(store, path.join(dir, 'mnt'))
    vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'vm1').disks.map(d => d.disk), ['disk'])
    t.deepEqual(vm(vms, 'vm2').disks.map(d => d.disk), ['disk'])
    await shOk('head -c 65536 /dev/zero | dd of="$1" conv=notrunc,fsync status=none', [s.img('vm1', 'disk')])
    const r = await s.command('vm1', 'disk', 'commit')
    t.not(r.code, 0, 'a commit into the shared base succeeded')
    t.regex(await s.errorText('vm1', 'disk'), /is also used by .*vm2\/disk\.vmdk; committing into it would change that disk too/)
    await s.stopClean(t)
    t.is(await sha256File(path.join(store, 'golden.img')), golden)
  })

  test.serial('an interrupted commit into a file that another descriptor came to share is not finished: that disk is left out, the file unchanged', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    const rf = async (...args: string[]): Promise<void> => { await shOk('"$@"', [process.execPath, REDOFS_BIN, ...args]) }
    await rf('create', path.join(store, 'vm2', 'disk'), '--size', '4M', '--format', 'flat')
    await rf('addredo', path.join(store, 'vm2', 'disk'))
    await shOk('qemu-io -f vmdk -c "write -P 0x77 0 1M" "$1" > /dev/null', [path.join(store, 'vm2', 'disk-000001.vmdk')])
    const k = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(store, 'vm2', 'disk'), 'level=0'], { env: { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: 'commit.journal' } })
    t.not(k.code, 0, describe(k))
    // then vm1 imports the same flat file (a hard link) and puts a redo log above it
    await rf('import', path.join(store, 'vm2', 'disk-flat.vmdk'), path.join(store, 'vm1', 'disk'))
    await rf('addredo', path.join(store, 'vm1', 'disk'))
    const flat = await sha256File(path.join(store, 'vm1', 'disk-flat.vmdk'))
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'vm1').disks.map(d => d.disk), ['disk'])
    t.deepEqual(vm(vms, 'vm2').disks, [])
    t.regex(vm(vms, 'vm2').errors.map(e => e.message).join('\n'), /is also used by .*vm1\/disk\.vmdk; the interrupted commit of .*disk-000001\.vmdk into it cannot be finished/)
    await s.stopClean(t)
    t.is(await sha256File(path.join(store, 'vm1', 'disk-flat.vmdk')), flat, 'the shared flat file changed')
  })

  test.serial('a flat disk whose guest data starts like a VMDK file is still served; its -flat file is no disk', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '16M', 'flat')
    await shOk('qemu-img create -q -f vmdk "$1" 1M', [path.join(dir, 'inner.vmdk')])
    let s = await env.mount(store, path.join(dir, 'mnt'))
    await shOk('dd if="$1" of="$2" bs=64k conv=notrunc,fsync status=none', [path.join(dir, 'inner.vmdk'), s.img('vm', 'disk')])
    await s.stopClean(t)
    const flat = await sha256File(path.join(store, 'vm', 'disk-flat.vmdk'))
    s = await env.mount(store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'vm').disks.map(d => d.disk), ['disk'])
    t.deepEqual(vm(vms, 'vm').errors, [])
    t.is((await shOk('head -c 4 "$1"', [s.img('vm', 'disk')])).stdout, 'KDMV')
    await s.stopClean(t)
    t.is(await sha256File(path.join(store, 'vm', 'disk-flat.vmdk')), flat)
  })

  test.serial('an extent listed twice in one descriptor is refused, naming it: the disk is left out, nothing is written', async t => {
    const dir = await env.tmp()
    const c = await storeChain(dir, 16 * M, [{ format: 'twoGbMaxExtentSparse', writes: [{ pattern: 0x21, offset: 0, length: 64 * 1024 }] }], 'vm1')
    const desc = await readFile(c.files[0], 'utf8')
    const line = desc.split('\n').find(l => /^RW \d+ SPARSE /.test(l)) as string
    await writeFile(c.files[0], desc.replace(line, `${line}\n${line}`))
    const before = await snapshotTree(c.store)
    const r = await run(process.execPath, [REDOFS_BIN, 'check', c.files[0]])
    t.is(r.code, 1, describe(r))
    t.regex(r.stdout + r.stderr, /disk\.vmdk: extent file .*disk-s001\.vmdk is listed twice/)
    await createDisk(c.store, 'vm2', 'other', '4M')
    const s = await env.mount(c.store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'vm1').disks, [])
    t.regex(vm(vms, 'vm1').errors.map(e => e.message).join('\n'), /listed twice/)
    t.deepEqual(vm(vms, 'vm2').disks.map(d => d.disk), ['other'])
    await s.stopClean(t)
    const after = await snapshotTree(c.store)
    delete after['vm2/other.vmdk']
    t.deepEqual(after, before)
  })

  test.serial('FIFOs named like a disk, an extent, a .vmx or a journal: the mount comes up and serves the other disks', async t => {
    const dir = await env.tmp()
    const c = await storeChain(dir, 16 * M, [{ writes: [{ pattern: 0x31, offset: 0, length: M }] }, {}], 'good')
    const store = c.store
    await shOk(`mkdir -p "$1/fifodisk" "$1/fifoext" "$1/fifovmx" "$1/fifojournal"
      mkfifo "$1/fifodisk/d.vmdk"
      printf '# Disk DescriptorFile\\nversion=1\\nCID=fffffffe\\nparentCID=ffffffff\\ncreateType="monolithicFlat"\\n\\nRW 2048 FLAT "d-flat.vmdk" 0\\n' > "$1/fifoext/d.vmdk"
      mkfifo "$1/fifoext/d-flat.vmdk"
      mkfifo "$1/fifovmx/fifovmx.vmx"`, [store])
    await createDisk(store, 'fifojournal', 'j', '4M')
    await shOk('mkfifo "$1"', [path.join(store, 'fifojournal', 'j.vmdk.redofs-commit')])
    // a .vmx the mount rewrites (it names the base of a disk with a redo log), with a FIFO where
    // the rewrite puts its temporary file
    await storeChain(dir, 16 * M, [{}, {}], 'fifotmp')
    await writeVmx(path.join(store, 'fifotmp', 'fifotmp.vmx'), [{ fileName: 'disk.vmdk' }])
    await shOk('mkfifo "$1"', [path.join(store, 'fifotmp', 'fifotmp.vmx.redofs-tmp')])
    const s = await env.mount(store, path.join(dir, 'mnt'), [], {})
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'good').disks.map(d => d.disk), ['disk'])
    t.regex(vm(vms, 'fifodisk').errors.map(e => `${e.file}: ${e.message}`).join('\n'), /d\.vmdk/)
    t.regex(vm(vms, 'fifoext').errors.map(e => e.message).join('\n'), /d-flat\.vmdk is not a regular file/)
    t.regex(vm(vms, 'fifovmx').errors.map(e => e.message).join('\n'), /fifovmx\.vmx: not a regular file/)
    t.deepEqual(vm(vms, 'fifojournal').disks, [])
    t.regex(vm(vms, 'fifojournal').errors.map(e => e.message).join('\n'), /j\.vmdk\.redofs-commit: not a regular file/)
    t.deepEqual(vm(vms, 'fifotmp').disks.map(d => d.disk), ['disk'])
    t.regex(await readFile(path.join(store, 'fifotmp', 'fifotmp.vmx'), 'utf8'), /fileName = "disk-000001\.vmdk"/)
    await s.stopClean(t)
    // the command line does not wait on them either
    const i = await run(process.execPath, [REDOFS_BIN, 'info', path.join(store, 'fifoext', 'd.vmdk')], { timeoutMs: 20_000 })
    t.is(i.code, 1, describe(i))
  })

  test.serial('a parent loop among redo logs keeps the disk out, also without a .vmx (its base is not served alone); commands given the disk name refuse it', async t => {
    const dir = await env.tmp()
    const c = await storeChain(dir, 16 * M, [
      { writes: [{ pattern: 0x41, offset: 0, length: M }] },
      { writes: [{ pattern: 0x42, offset: M, length: M }] },
      { writes: [{ pattern: 0x43, offset: 2 * M, length: M }] }
    ], 'loop')
    // disk-000001 and disk-000002 name each other
    const c2cid = (await layerInfo(c.files[2])).cid
    await patchDescriptor(c.files[1], x => setField(setField(x, 'parentFileNameHint', 'disk-000002.vmdk', true), 'parentCID', cidText(c2cid), false))
    // and in another VM, a redo log naming itself
    const self = await storeChain(dir, 16 * M, [{}, { writes: [{ pattern: 0x51, offset: 0, length: 4096 }] }], 'self')
    await patchDescriptor(self.files[1], x => setField(x, 'parentFileNameHint', 'disk-000001.vmdk', true))
    await storeChain(dir, 16 * M, [{ writes: [{ pattern: 0x61, offset: 0, length: M }] }], 'fine')
    const before = await snapshotTree(c.store)
    const s = await env.mount(c.store, path.join(dir, 'mnt'))
    const vms = await vmsOf(s.mnt)
    t.deepEqual(vm(vms, 'loop').disks, [], 'the loop\'s base was served as the disk')
    t.regex(vm(vms, 'loop').errors.map(e => e.message).join('\n'), /parent loop: disk-00000[12]\.vmdk -> disk-00000[12]\.vmdk -> disk-00000[12]\.vmdk/)
    t.deepEqual(vm(vms, 'self').disks, [])
    t.regex(vm(vms, 'self').errors.map(e => e.message).join('\n'), /disk-000001\.vmdk: parent loop: disk-000001\.vmdk -> disk-000001\.vmdk/)
    t.deepEqual(vm(vms, 'fine').disks.map(d => d.disk), ['disk'])
    await s.stopClean(t)
    const a = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(c.store, 'loop', 'disk')])
    t.is(a.code, 1, describe(a))
    t.regex(a.stderr, /parent loop/)
    t.deepEqual(await snapshotTree(c.store), before, 'a file of the store changed')
  })

  test.serial('a flat base shorter than its descriptor says is served read-only: writes fail, the file does not grow; a whole one shows its new blocks after writes', async t => {
    const dir = await env.tmp()
    const short = await storeChain(dir, 16 * M, [{ format: 'monolithicFlat', writes: [{ pattern: 0x71, offset: 0, length: M }] }], 'short')
    await shOk('truncate -s 1M "$1"', [path.join(short.vmDir, 'disk-flat.vmdk')])
    await createDisk(short.store, 'whole', 'disk', '64M', 'flat')
    const flat = path.join(short.store, 'whole', 'disk-flat.vmdk')
    const sum = await sha256File(path.join(short.vmDir, 'disk-flat.vmdk'))
    const s = await env.mount(short.store, path.join(dir, 'mnt'))
    const st = await s.status('short', 'disk') as unknown as { writable: boolean }
    t.false(st.writable)
    const w = await sh('printf abcd | dd of="$1" bs=1 seek=2097152 conv=notrunc status=none', [s.img('short', 'disk')])
    t.not(w.code, 0, 'a write past the end of the short flat file succeeded')
    t.is(await sha256File(path.join(short.vmDir, 'disk-flat.vmdk')), sum)
    // du follows writes into a whole flat base
    const blocks = async (): Promise<number> => Number((await shOk('stat -c %b "$1"', [s.img('whole', 'disk')])).stdout.trim())
    const b0 = await blocks()
    await shOk('dd if=/dev/urandom of="$1" bs=1M count=8 conv=notrunc,fsync status=none', [s.img('whole', 'disk')])
    let b1 = b0
    for (let i = 0; i < 50 && b1 < b0 + 8 * 2048; i++) { await new Promise(resolve => setTimeout(resolve, 200)); b1 = await blocks() }
    t.true(b1 >= b0 + 8 * 2048, `st_blocks ${b0} -> ${b1} after 8 MiB written into holes of ${flat}`)
    await s.stopClean(t)
  })
}
