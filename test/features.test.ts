/**
 * Beyond the anchors: labels with freeze times, allocation/change maps, one-command hot backup
 * and restore, linked clones, COWD writing and ESX 2.x REDO files, safe relink, commit control.
 */
import test from 'ava'
import { copyFile, mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import path from 'node:path'
import { REDOFS_BIN } from './helpers/env'
import { createDisk, e2e, requireFuse, sh, shOk, waitFor, type Server } from './helpers/mount'
import { makeCowd, writeVmfsBase } from './helpers/cowd'
import { describe, mustRun, run, sha256File, snapshotTree } from './helpers/qemu'
import { stoppedReader } from './helpers/redofs'

const ok = requireFuse(test, ['qemu-img', 'qemu-io', 'vmdkinfo'])
const env = e2e(test)

const redofs = async (...args: string[]): Promise<import('./helpers/qemu').RunResult> => await run(process.execPath, [REDOFS_BIN, ...args])
const redofsOk = async (...args: string[]): Promise<import('./helpers/qemu').RunResult> => {
  const r = await redofs(...args)
  if (r.code !== 0) throw new Error(describe(r))
  return r
}

interface Gen { generation: number, label: string | null, frozenAt: string | null, file: string, inFlux: string | null }
interface Status { redoLogs: number, generations: Gen[], notices: string[], job: null | Record<string, unknown>, lastJob: null | Record<string, unknown> }
const status = async (s: Server, vm = 'vm', disk = 'disk'): Promise<Status> => JSON.parse(await readFile(s.ctl(vm, disk, 'status'), 'utf8')) as Status

if (ok) {
  test.serial('labels: label file and addredo label=; symlinks; kept across remounts; dropped by a commit that changes them; mtime is the freeze time', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '16M')
    let s = await env.mount(store, path.join(dir, 'mnt'))
    await shOk('dd if=/dev/urandom of="$1" bs=64k count=8 conv=notrunc status=none', [s.img('vm', 'disk')])
    const t0 = Date.now()
    await s.commandOk('vm', 'disk', 'addredo', 'label=before-upgrade')
    const t1 = Date.now()
    await shOk('dd if=/dev/urandom of="$1" bs=64k seek=20 count=4 conv=notrunc status=none', [s.img('vm', 'disk')])
    await s.commandOk('vm', 'disk', 'addredo')
    await s.commandOk('vm', 'disk', 'label', 'gen=1 name=after')
    const link = path.join(s.mnt, 'vm', 'disk@before-upgrade.img')
    t.is((await sh('readlink "$1"', [link])).stdout.trim(), 'disk@0.img')
    t.is(await sha256File(link), await sha256File(s.img('vm', 'disk', 0)))
    const st0 = await stat(s.img('vm', 'disk', 0))
    t.true(st0.mtimeMs >= t0 - 1000 && st0.mtimeMs <= t1 + 1000, `mtime ${st0.mtime.toISOString()} is not the freeze time`)
    const frozenAt = (await status(s)).generations[0].frozenAt as string
    t.is(Math.floor(st0.mtimeMs / 1000), Math.floor(Date.parse(frozenAt) / 1000))
    const malformed = await s.command('vm', 'disk', 'label', 'gen=7 name=x')
    t.not(malformed.code, 0)
    await s.stopClean(t)
    // labels and freeze times live in the descriptors: they survive a remount
    s = await env.mount(store, path.join(dir, 'mnt'))
    const gens = (await status(s)).generations
    t.deepEqual(gens.map(g => g.label), ['before-upgrade', 'after', null])
    t.is(gens[0].frozenAt, frozenAt)
    t.is(Math.floor((await stat(s.img('vm', 'disk', 0))).mtimeMs / 1000), Math.floor(Date.parse(frozenAt) / 1000))
    // commit level=1 merges generation 1 into generation 0: "before-upgrade" loses its content
    await s.commandOk('vm', 'disk', 'commit', 'level=1')
    const after = await status(s)
    t.deepEqual(after.generations.map(g => g.label), ['after', null], 'the merged generation keeps its label, the changed one loses it')
    t.true(after.notices.some(n => n.includes('"before-upgrade" dropped')), JSON.stringify(after.notices))
    await t.throwsAsync(stat(link))
    t.true((await readdir(path.join(s.mnt, 'vm'))).includes('disk@after.img'))
    await s.stopClean(t)
    // offline: export by label
    const out = path.join(dir, 'after.raw')
    await redofsOk('export', `${path.join(store, 'vm', 'disk')}@after`, out)
    t.truthy((await stat(out)).size)
  })

  test.serial('maps: map and map@G (and redofs map) agree with qemu-img map and name the generation of every extent', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    const vm = path.join(store, 'vm')
    await mkdir(vm, { recursive: true })
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', 'disk.vmdk', '16M'], { cwd: vm })
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 8M 64k', 'disk.vmdk'], { cwd: vm })
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'zeroed_grain=on', '-b', 'disk.vmdk', '-F', 'vmdk', 'disk-000001.vmdk'], { cwd: vm })
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 3 512k 1M', '-c', 'write -z 8M 64k', 'disk-000001.vmdk'], { cwd: vm })
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'disk-000001.vmdk', '-F', 'vmdk', 'disk-000002.vmdk'], { cwd: vm })
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 4 3M 100k', '-c', 'write -P 5 16711680 65536', 'disk-000002.vmdk'], { cwd: vm })
    const s = await env.mount(store, path.join(dir, 'mnt'))
    type E = { start: number, length: number, data: boolean, zero: boolean, generation: number }
    type Q = { start: number, length: number, depth: number, present: boolean, data: boolean, zero: boolean }
    const grains = (entries: Array<{ start: number, length: number }>, f: (e: never) => string): string[] => {
      const out: string[] = []
      for (const e of entries) for (let p = e.start; p < e.start + e.length; p += 65536) out.push(f(e as never))
      return out
    }
    for (const [g, file] of [[2, 'disk-000002.vmdk'], [1, 'disk-000001.vmdk'], [0, 'disk.vmdk']] as const) {
      const ours = JSON.parse(await readFile(s.ctl('vm', 'disk', g === 2 ? 'map' : `map@${g}`), 'utf8')) as E[]
      const q = JSON.parse((await mustRun('qemu-img', ['map', '--output=json', file], { cwd: vm })).stdout) as Q[]
      const mine = grains(ours, (e: E) => `${e.generation}:${e.data}:${e.zero}`)
      const theirs = grains(q, (e: Q) => `${e.present ? g - e.depth : -1}:${e.data}:${e.zero}`)
      t.deepEqual(mine, theirs, `generation ${g}: allocation map differs from qemu-img map`)
      t.is(ours.reduce((n, e) => n + e.length, 0), 16 << 20)
    }
    // "what changed since generation 0": extents provided by generations above it
    const changed = (JSON.parse(await readFile(s.ctl('vm', 'disk', 'map'), 'utf8')) as E[]).filter(e => e.generation > 0)
    t.true(changed.some(e => e.start === 8 << 20 && e.zero), 'the zeroed grain written in generation 1 is a change')
    await s.stopClean(t)
    const cli = JSON.parse((await redofsOk('map', `${path.join(vm, 'disk')}@1`)).stdout) as E[]
    const q1 = JSON.parse((await mustRun('qemu-img', ['map', '--output=json', 'disk-000001.vmdk'], { cwd: vm })).stdout) as Q[]
    t.deepEqual(grains(cli, (e: E) => `${e.generation}:${e.data}`), grains(q1, (e: Q) => `${e.present ? 1 - e.depth : -1}:${e.data}`))
  })

  test.serial('hot backup in one command, incremental after the first; restore equals the disk at the last backup', async t => {
    t.timeout(180_000)
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '64M')
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const img = s.img('vm', 'disk')
    const dest = path.join(dir, 'backup')
    await shOk('dd if=/dev/urandom of="$1" bs=1M count=20 conv=notrunc status=none', [img])
    const first = await redofsOk('backup', s.mnt, 'vm/disk', dest)
    t.regex(first.stdout, /full backup/)
    // a writer keeps going during the second backup
    await shOk('dd if=/dev/urandom of="$1" bs=4k seek=9000 count=300 conv=notrunc status=none', [img])
    const writer = sh('for i in $(seq 1 40); do dd if=/dev/urandom of="$1" bs=4k seek=$((12000 + i * 3)) count=2 conv=notrunc status=none; sleep 0.02; done', [img])
    const second = await redofsOk('backup', s.mnt, 'vm/disk', dest)
    t.is((await writer).code, 0)
    t.regex(second.stdout, /incr backup/)
    const manifest = JSON.parse(await readFile(path.join(dest, 'manifest.json'), 'utf8')) as { backups: Array<{ kind: string, bytes: number, label: string }> }
    t.deepEqual(manifest.backups.map(b => b.kind), ['full', 'incr'])
    t.true(manifest.backups[1].bytes < manifest.backups[0].bytes / 4, `incremental copied ${manifest.backups[1].bytes} bytes`)
    // the chain stays short: the backup point and the live redo log
    const st = await status(s)
    t.is(st.redoLogs, 1, JSON.stringify(st.generations))
    t.is(st.generations[0].label, manifest.backups[1].label)
    const backupPoint = path.join(s.mnt, 'vm', `disk@${manifest.backups[1].label}.img`)
    await redofsOk('restore', dest, path.join(dir, 'restored.raw'))
    t.is(await sha256File(path.join(dir, 'restored.raw')), await sha256File(backupPoint), 'raw restore differs from the disk at the last backup')
    await redofsOk('restore', dest, path.join(dir, 'restored', 'disk.vmdk'))
    const cmp = await run('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', path.join(dir, 'restored', 'disk.vmdk'), path.join(dir, 'restored.raw')])
    t.is(cmp.code, 0, describe(cmp))
    await s.stopClean(t)
  })

  test.serial('export and restore never write a file they read, leave no target when they fail, and write a mounted disk file in place byte for byte', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    const vm = path.join(store, 'vm')
    await createDisk(store, 'vm', 'disk', '8M')
    await createDisk(store, 'vm', 'other', '8M')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x31 1M 2M', path.join(vm, 'disk.vmdk')])
    // export onto a file of the chain it reads
    const tree = await snapshotTree(store)
    const self = await redofs('export', path.join(vm, 'disk'), path.join(vm, 'disk.vmdk'))
    t.is(self.code, 1, describe(self))
    t.regex(self.stderr, /disk\.vmdk: is .*disk\.vmdk, which this command reads/)
    t.deepEqual(await snapshotTree(store), tree, 'the export wrote the store')
    const ref = path.join(dir, 'ref.raw')
    await redofsOk('export', path.join(vm, 'disk'), ref)
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const dest = path.join(dir, 'backup')
    await redofsOk('backup', s.mnt, 'vm/disk', dest)
    const full = (JSON.parse(await readFile(path.join(dest, 'manifest.json'), 'utf8')) as { backups: Array<{ data: string }> }).backups[0].data
    // in place: a mounted disk file keeps its old bytes where nothing is written, so every byte is
    for (const [cmd, from] of [['export', path.join(vm, 'disk')], ['restore', dest]]) {
      await shOk('dd if=/dev/urandom of="$1" bs=1M count=8 conv=notrunc,fsync status=none', [s.img('vm', 'other')])
      await redofsOk(cmd, from, s.img('vm', 'other'))
      t.is(await sha256File(s.img('vm', 'other')), await sha256File(ref), `${cmd} into the mounted file left old bytes`)
    }
    await s.stopClean(t)
    // restore onto its own data file
    const data = await sha256File(path.join(dest, full))
    const own = await redofs('restore', dest, path.join(dest, full))
    t.is(own.code, 1, describe(own))
    t.regex(own.stderr, /which this command reads/)
    t.is(await sha256File(path.join(dest, full)), data, 'the restore wrote its own backup')
    // a manifest that is not one
    const manifest = path.join(dest, 'manifest.json')
    const good = await readFile(manifest, 'utf8')
    await writeFile(manifest, JSON.stringify({ ...JSON.parse(good), capacity: undefined }))
    const bad = await redofs('restore', dest, path.join(dir, 'x.raw'))
    t.is(bad.code, 1, describe(bad))
    t.regex(bad.stderr, /manifest\.json: not a redofs backup manifest \(no valid capacity\)/)
    await writeFile(manifest, good)
    // a restore that fails (its data file is gone) leaves the target as it was, or none
    await writeFile(path.join(dir, 'keep.raw'), 'precious')
    await rm(path.join(dest, full))
    for (const target of ['keep.raw', 'new.raw', path.join('vmdir', 'new.vmdk')]) {
      const r = await redofs('restore', dest, path.join(dir, target))
      t.is(r.code, 1, describe(r))
      t.regex(r.stderr, /ENOENT|no such file/i)
    }
    t.is(await readFile(path.join(dir, 'keep.raw'), 'utf8'), 'precious', 'a failed restore changed its target')
    t.deepEqual((await readdir(dir)).filter(f => /new|redofs/.test(f)), [], 'a failed restore left a file behind')
    t.deepEqual(await readdir(path.join(dir, 'vmdir')), [], 'a failed restore into a .vmdk left a file behind')
  })

  test.serial('linked clones: redofs clone shares the parent, commits into it are refused, info shows the tree', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm1', 'disk', '16M')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 7 0 2M', path.join(store, 'vm1', 'disk.vmdk')])
    await redofsOk('addredo', path.join(store, 'vm1', 'disk'))
    const clone = (await redofsOk('clone', `${path.join(store, 'vm1', 'disk')}@0`, 'vm2')).stdout.trim()
    t.is(path.dirname(clone), path.join(store, 'vm2'))
    // a second clone into the same VM is refused before the source changes (it would freeze
    // the live generation first)
    const files = (await readdir(path.join(store, 'vm1'))).sort()
    const twice = await redofs('clone', path.join(store, 'vm1', 'disk'), 'vm2')
    t.is(twice.code, 1, describe(twice))
    t.regex(twice.stderr, /VM vm2 already has a disk "disk"/)
    t.deepEqual((await readdir(path.join(store, 'vm1'))).sort(), files, 'the refused clone froze the source')
    const info = await redofsOk('info', path.join(store, 'vm1', 'disk'))
    t.regex(info.stdout, /also parent of .*vm2\/disk-000001\.vmdk/)
    const offline = await redofs('commit', path.join(store, 'vm1', 'disk'), 'level=0')
    t.is(offline.code, 1)
    t.regex(offline.stderr, /shared by other chains/)
    const s = await env.mount(store, path.join(dir, 'mnt'))
    t.is(await sha256File(s.img('vm2', 'disk')), await sha256File(s.img('vm1', 'disk', 0)), 'the clone does not read its parent')
    await shOk('dd if=/dev/urandom of="$1" bs=64k count=3 conv=notrunc status=none', [s.img('vm2', 'disk')])
    const refused = await s.command('vm1', 'disk', 'commit', 'level=0')
    t.not(refused.code, 0)
    t.regex(await s.errorText('vm1', 'disk'), /shared by other chains/)
    t.not(await sha256File(s.img('vm2', 'disk')), await sha256File(s.img('vm1', 'disk', 0)))
    await s.stopClean(t)
    const q = await run('qemu-img', ['convert', '-O', 'raw', clone, path.join(dir, 'c.raw')])
    t.is(q.code, 0, describe(q))
  })

  test.serial('linked clones: a commit or discard that would delete the layer a clone is built on is refused, force or not', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm1', 'disk', '16M')
    await redofsOk('addredo', path.join(store, 'vm1', 'disk'))
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 9 0 1M', path.join(store, 'vm1', 'disk-000001.vmdk')])
    // without @G the live generation is frozen: vm1 gets a new top and vm2's clone sits on disk-000001
    const clone = (await redofsOk('clone', path.join(store, 'vm1', 'disk'), 'vm2')).stdout.trim()
    const r1 = path.join(store, 'vm1', 'disk-000001.vmdk')
    const before = await sha256File(clone)
    for (const args of [['commit', 'level=1'], ['commit', 'level=1', 'force=1'], ['discard', 'to=0'], ['discard', 'to=0', 'force=1']]) {
      const r = await redofs(args[0], path.join(store, 'vm1', 'disk'), ...args.slice(1))
      t.is(r.code, 1, `${args.join(' ')}: ${describe(r)}`)
      t.regex(r.stderr, /disk-000001\.vmdk: other chains are built on it \(.*vm2/, args.join(' '))
    }
    t.true(existsSync(r1), 'the clone\'s parent is still there')
    t.is(await sha256File(clone), before)
    const q = await run('qemu-img', ['convert', '-O', 'raw', clone, path.join(dir, 'c.raw')])
    t.is(q.code, 0, describe(q))
  })

  test.serial('COWD writing: --redo-format cowd writes vmfsSparse redo logs that qemu and libvmdk read identically', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '32M', 'flat')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x33 0 32M', path.join(store, 'vm', 'disk.vmdk')])
    const s = await env.mount(store, path.join(dir, 'mnt'), ['--redo-format', 'cowd'])
    await s.commandOk('vm', 'disk', 'addredo')
    await shOk('dd if=/dev/urandom of="$1" bs=1000 seek=3 count=3000 conv=notrunc status=none && dd if=/dev/urandom of="$1" bs=1M seek=20 count=5 conv=notrunc status=none', [s.img('vm', 'disk')])
    const served = await sha256File(s.img('vm', 'disk'))
    await s.stopClean(t)
    const top = path.join(store, 'vm', 'disk-000001.vmdk')
    t.regex(await readFile(top, 'utf8'), /createType="vmfsSparse"[\s\S]*VMFSSPARSE "disk-000001-delta.vmdk"/)
    await mustRun('qemu-img', ['convert', '-O', 'raw', top, path.join(dir, 'q.raw')])
    t.is(await sha256File(path.join(dir, 'q.raw')), served, 'qemu reads the COWD redo log differently')
    const info = await run('vmdkinfo', [top])
    t.is(info.code, 0, describe(info))
    const py = await run('/usr/bin/python3', ['-c', `
import pyvmdk, hashlib, sys
b = pyvmdk.handle(); b.open(sys.argv[1]); b.open_extent_data_files()
c = pyvmdk.handle(); c.open(sys.argv[2]); c.open_extent_data_files(); c.set_parent(b)
h = hashlib.sha256(); off = 0; size = c.get_media_size()
while off < size:
    n = min(1 << 20, size - off); h.update(c.read_buffer_at_offset(n, off)); off += n
print(h.hexdigest())`, path.join(store, 'vm', 'disk.vmdk'), top])
    t.is(py.code, 0, `${describe(py)}\n(python3-libvmdk missing? npm test's set-up installs it)`)
    t.is(py.stdout.trim(), served, 'libvmdk reads the COWD redo log differently')
    const c = await redofs('check', path.join(store, 'vm', 'disk'))
    t.is(c.code, 0, describe(c))
  })

  test.serial('ESX 2.x: a .REDO file, bare or wrapped in a descriptor, reads as its content; a bare one commits into its raw base, after a crash too, and refuses a redo log above it', async t => {
    const dir = await env.tmp()
    const vm = path.join(dir, 'store', 'vm')
    await mkdir(vm, { recursive: true })
    const sectors = 8192
    const baseData = Buffer.alloc(sectors * 512, 0x61)
    await writeFile(path.join(vm, 'disk.vmdk'), baseData) // ESX 2.x: a flat disk without descriptor
    const redo = path.join(vm, 'disk.vmdk.REDO')
    await makeCowd(redo, sectors, [{ sector: 10, data: Buffer.alloc(4096, 0x62) }, { sector: 5000, data: Buffer.alloc(512, 0x63) }])
    // the parent is named inside the COWD header (child area at byte 32)
    const fh = await (await import('node:fs/promises')).open(redo, 'r+')
    await fh.write(Buffer.from('vmhba0:0:0:1:disk.vmdk\0'), 0, 23, 32)
    await fh.close()
    const expected = Buffer.from(baseData)
    expected.fill(0x62, 10 * 512, 10 * 512 + 4096)
    expected.fill(0x63, 5000 * 512, 5001 * 512)
    await writeFile(path.join(dir, 'expected.raw'), expected)
    await redofsOk('export', redo, path.join(dir, 'bare.raw'))
    t.is(await sha256File(path.join(dir, 'bare.raw')), await sha256File(path.join(dir, 'expected.raw')))
    // wrapped: a vmfs base descriptor and a vmfsSparse descriptor naming the REDO file
    const wrapped = path.join(dir, 'store', 'vm2')
    await mkdir(wrapped, { recursive: true })
    const base = await writeVmfsBase(wrapped, 'disk', sectors, baseData)
    await copyFile(redo, path.join(wrapped, 'disk.vmdk.REDO'))
    await writeFile(path.join(wrapped, 'disk-redo.vmdk'), `# Disk DescriptorFile\nversion=1\nCID=22222222\nparentCID=${base.cid.toString(16).padStart(8, '0')}\ncreateType="vmfsSparse"\nparentFileNameHint="disk.vmdk"\n# Extent description\nRW ${sectors} VMFSSPARSE "disk.vmdk.REDO"\n`)
    await redofsOk('export', path.join(wrapped, 'disk-redo.vmdk'), path.join(dir, 'wrapped.raw'))
    t.is(await sha256File(path.join(dir, 'wrapped.raw')), await sha256File(path.join(dir, 'expected.raw')))
    await mustRun('qemu-img', ['convert', '-O', 'raw', path.join(wrapped, 'disk-redo.vmdk'), path.join(dir, 'qw.raw')])
    t.is(await sha256File(path.join(dir, 'qw.raw')), await sha256File(path.join(dir, 'expected.raw')))
    // a redo log above the bare REDO could not name it (no CID): refused, nothing created
    const above = await redofs('addredo', redo)
    t.is(above.code, 1, describe(above))
    t.regex(above.stderr, /disk\.vmdk\.REDO: has no descriptor/)
    t.deepEqual((await readdir(vm)).sort(), ['disk.vmdk', 'disk.vmdk.REDO'])
    // committed into its raw base (which has no descriptor for a label or a CID); then once more,
    // killed before the REDO file is dropped: the next writable open finishes it; and failed
    // after its first chunk: the raw base cannot carry a partial-merge mark, so the journal stays
    for (const crash of [undefined, 'commit.drop', 'fail']) {
      const v = path.join(dir, 'store', `commit-${crash ?? 'plain'}`)
      await mkdir(v, { recursive: true })
      for (const f of ['disk.vmdk', 'disk.vmdk.REDO']) await copyFile(path.join(vm, f), path.join(v, f))
      const env = crash === undefined ? process.env : crash === 'fail' ? { ...process.env, REDOFS_FAIL_ONCE: 'commit.copy#2' } : { ...process.env, REDOFS_CRASH_AFTER: '1', REDOFS_CRASH_ONLY: crash }
      const c = await run(process.execPath, [REDOFS_BIN, 'commit', path.join(v, 'disk.vmdk.REDO'), 'level=0'], { env })
      if (crash === undefined) t.is(c.code, 0, describe(c))
      else {
        t.not(c.code, 0, 'the commit was not killed')
        if (crash === 'fail') {
          t.regex(c.stderr, /failed: .*injected I\/O error.*it is not undone: the next writable open finishes it/, describe(c))
          const exp = await redofs('export', `${path.join(v, 'disk.vmdk.REDO')}@0`, path.join(dir, 'mixed.raw'))
          t.regex(exp.stderr, /generation 0 is being merged with the one above by an interrupted commit/, describe(exp))
          // the REDO file masks what reached the base: generation 1 reads whole, journal or not
          await redofsOk('export', path.join(v, 'disk.vmdk.REDO'), path.join(dir, 'live-after-fail.raw'))
          t.is(await sha256File(path.join(dir, 'live-after-fail.raw')), await sha256File(path.join(dir, 'expected.raw')))
        }
        t.true((await readdir(v)).includes('disk.vmdk.redofs-commit'), 'no journal left by the killed commit')
        // the same command again is its repeat: it finishes the commit and stops there
        const again = await redofs('commit', path.join(v, 'disk.vmdk.REDO'), 'level=0')
        t.is(again.code, 0, describe(again))
        t.regex(again.stderr, /finished the interrupted commit of .*disk\.vmdk\.REDO into .*disk\.vmdk first/, describe(again))
      }
      t.deepEqual(await readdir(v), ['disk.vmdk'], `${crash ?? 'plain'}: the REDO file and the journal are gone`)
      t.is(await sha256File(path.join(v, 'disk.vmdk')), await sha256File(path.join(dir, 'expected.raw')), `${crash ?? 'plain'}: the base holds the content`)
    }
  })

  test.serial('an export of the live generation, started while a mount writes in an open session, fails if a write lands while its open reads the tables', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '16M')
    const vm = path.join(store, 'vm')
    await redofsOk('addredo', path.join(vm, 'disk'))
    const s = await env.mount(store, path.join(dir, 'mnt'))
    // the session is open (its CID stamped) before the export starts: no CID tells what follows
    await shOk('dd if=/dev/urandom of="$1" bs=64k count=4 conv=notrunc,fsync status=none', [s.img('vm', 'disk')])
    // the export stops once the top's tables are read, while it opens the base; meanwhile an
    // allocated grain is overwritten and a new one written through the mount
    const r = await stoppedReader(t, ['export', path.join(vm, 'disk-000001.vmdk'), path.join(dir, 'out.raw')], 'extent.open', path.join(vm, 'disk.vmdk'), async () => {
      await shOk('dd if=/dev/zero of="$1" bs=64k count=1 conv=notrunc,fsync status=none && dd if=/dev/zero of="$1" bs=64k seek=100 count=1 conv=notrunc,fsync status=none', [s.img('vm', 'disk')])
    })
    t.is(r.code, 1, r.stderr)
    t.regex(r.stderr, /^redofs: .*generation 1 changed while it was read \(.*disk-000001\.vmdk: written since it was opened\)/m, r.stderr)
    await s.stopClean(t)
  })

  test.serial('safe relink: re-stamps parentCID when the parent is unchanged where the child does not cover it, refuses otherwise', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '16M')
    const vm = path.join(store, 'vm')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 5 0 4M', path.join(vm, 'disk.vmdk')])
    await redofsOk('addredo', path.join(vm, 'disk'), 'record=1')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 6 1M 1M', path.join(vm, 'disk-000001.vmdk')])
    const restamp = async (file: string): Promise<void> => {
      // what copying with a tool that re-stamps CIDs does: same content, new CID. qemu writes
      // CIDs unpadded, so the new one keeps the old one's length (each digit + 1, mod 16)
      const b = await readFile(file)
      const i = b.indexOf('CID=') + 4
      let j = i
      while (/[0-9a-f]/i.test(String.fromCharCode(b[j]))) j++
      const old = b.toString('latin1', i, j)
      let next = [...old].map(c => ((parseInt(c, 16) + 1) % 16).toString(16)).join('')
      if (/^f+$/.test(next)) next = '1'.repeat(next.length)
      b.write(next, i, 'latin1')
      await writeFile(file, b)
    }
    const good = path.join(dir, 'good')
    await mkdir(path.join(good, 'vm'), { recursive: true })
    for (const f of await readdir(vm)) await copyFile(path.join(vm, f), path.join(good, 'vm', f))
    await restamp(path.join(good, 'vm', 'disk.vmdk'))
    const broken = await redofs('export', path.join(good, 'vm', 'disk'), path.join(dir, 'x.raw'))
    t.regex(broken.stderr, /does not match/)
    const r = await redofs('relink', path.join(good, 'vm', 'disk-000001.vmdk'))
    t.is(r.code, 0, describe(r))
    await mustRun('qemu-img', ['convert', '-O', 'raw', path.join(good, 'vm', 'disk-000001.vmdk'), path.join(dir, 'good.raw')])
    await redofsOk('export', path.join(vm, 'disk'), path.join(dir, 'orig.raw'))
    t.is(await sha256File(path.join(dir, 'good.raw')), await sha256File(path.join(dir, 'orig.raw')))
    // a parent changed where the child does not cover it: refused, saying where
    const bad = path.join(dir, 'bad')
    await mkdir(path.join(bad, 'vm'), { recursive: true })
    for (const f of await readdir(vm)) await copyFile(path.join(vm, f), path.join(bad, 'vm', f))
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 9 1M 4k', '-c', 'write -P 9 3M 4k', path.join(bad, 'vm', 'disk.vmdk')])
    const refused = await redofs('relink', path.join(bad, 'vm', 'disk-000001.vmdk'))
    t.is(refused.code, 1)
    t.regex(refused.stderr, /at byte 3145728\b/)
    t.notRegex(refused.stderr, /\b1048576\b/, 'a change the child covers was reported')
  })

  /**
   * A disk of `size` whose first redo log holds `written` of data under a second one, mounted,
   * with `commit level=1 freeze=0 wait=0` accepted and paused at once (one shell: no process
   * start between the two). `live`: the live file's hash before the commit.
   */
  const pausedCommit = async (size: string, written: string): Promise<{ s: Server, vm: string, live: string, store: string, dir: string }> => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', size)
    const vm = path.join(store, 'vm')
    await redofsOk('addredo', path.join(vm, 'disk'))
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', `write -P 7 0 ${written}`, path.join(vm, 'disk-000001.vmdk')])
    await redofsOk('addredo', path.join(vm, 'disk'))
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const live = await sha256File(s.img('vm', 'disk'))
    await shOk('echo "level=1 freeze=0 wait=0" > "$1/commit" && echo pause > "$1/job"', [path.join(s.mnt, '.ctl', 'vm', 'disk')])
    return { s, vm, live, store, dir }
  }

  test.serial('a commit into a generation whose content record is still being read stops that record: none is saved of content the commit changes', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    const vm = path.join(store, 'vm')
    await createDisk(store, 'vm', 'disk', '32M')
    await redofsOk('addredo', path.join(vm, 'disk'))
    // the record starts reading after 500 ms; the commit's chunks wait 1.5 s before copying
    const s = await env.mount(store, path.join(dir, 'mnt'), [], { REDOFS_DELAY: 'record:500,commit.chunk:1500' })
    await shOk('dd if=/dev/urandom of="$1" bs=1M count=4 conv=notrunc,fsync status=none', [s.img('vm', 'disk')])
    await s.commandOk('vm', 'disk', 'addredo', 'record=1') // records generation 1 (disk-000001) in the background
    await shOk('dd if=/dev/urandom of="$1" bs=1M count=12 conv=notrunc,fsync status=none', [s.img('vm', 'disk')])
    await s.commandOk('vm', 'disk', 'commit', 'level=0') // merges the new top into disk-000001
    await s.stopClean(t)
    t.false((await readdir(vm)).includes('disk-000001.vmdk.redofs-digest'), 'a record of disk-000001\'s old content outlived the commit that changed it')
  })

  test.serial('a freezing commit refuses pause from its start, also while it still waits for an earlier job\'s deletion', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'disk', '16M')
    // deleting the discarded redo log takes 3 s: the commit waits for it before it freezes I/O
    const s = await env.mount(store, path.join(dir, 'mnt'), [], { REDOFS_DELAY: 'reap:3000' })
    await s.commandOk('vm', 'disk', 'addredo')
    await s.commandOk('vm', 'disk', 'addredo')
    await s.commandOk('vm', 'disk', 'discard')
    await s.commandOk('vm', 'disk', 'commit', 'level=0 wait=0')
    const pause = await s.command('vm', 'disk', 'job', 'pause')
    t.not(pause.code, 0, 'a freezing commit was paused: live I/O would wait on it')
    t.regex(await s.errorText('vm', 'disk'), /it cannot be paused/)
    t.true(await waitFor(async () => (await status(s)).job === null, 200), 'the commit did not end')
    t.is((await status(s)).redoLogs, 0)
    await s.stopClean(t)
  })

  test.serial('commit control: pause, resume and cancel from .ctl; progress with rate and ETA; a progress bar on a terminal', async t => {
    t.timeout(180_000)
    const { s, vm, live } = await pausedCommit('1G', '768M')
    const p1 = (await status(s)).job as { state: string, done: number }
    t.is(p1.state, 'paused')
    await new Promise(resolve => setTimeout(resolve, 500))
    const p2 = (await status(s)).job as { state: string, done: number, total: number, rate: number }
    t.is(p2.done, p1.done, 'a paused commit made progress')
    t.true(p2.total > 0 && typeof p2.rate === 'number')
    // generation 0 is being merged into: its content is changing, so it does not open
    const busy = await sh('head -c 1 "$1"', [s.img('vm', 'disk', 0)])
    t.not(busy.code, 0, 'a generation a running commit changes was opened')
    t.regex(busy.stderr, /busy/i)
    await s.commandOk('vm', 'disk', 'job', 'resume')
    // cancelled once it has copied something (768 MiB take longer than the first chunks)
    for (let i = 0; i < 200 && ((await status(s)).job?.done as number | undefined ?? 1) === 0; i++) await new Promise(resolve => setTimeout(resolve, 20))
    await s.commandOk('vm', 'disk', 'job', 'cancel')
    for (let i = 0; i < 100 && (await status(s)).job !== null; i++) await new Promise(resolve => setTimeout(resolve, 100))
    const st = await status(s)
    t.is((st.lastJob as { state: string }).state, 'cancelled')
    t.is(st.redoLogs, 2, 'a cancelled commit changed the chain shape')
    t.is(await sha256File(s.img('vm', 'disk')), live, 'the live content changed')
    // generation 0 holds part of generation 1 now: it stays closed, and status says why
    const mixed = await sh('head -c 1 "$1"', [s.img('vm', 'disk', 0)])
    t.not(mixed.code, 0, 'a generation the cancelled commit had written into was opened')
    t.regex(mixed.stderr, /busy/i)
    t.regex(st.generations[0].inFlux ?? '', /generation 0 holds part of generation 1's changes/)
    t.deepEqual(st.generations.slice(1).map(g => g.inFlux), [null, null])
    t.true(st.notices.some(n => /generation 0 holds part of generation 1's changes.*does not open until/.test(n)), st.notices.join('\n'))
    // resumable: the same commit runs to the end afterwards
    await s.commandOk('vm', 'disk', 'commit', 'level=1 freeze=0')
    t.is((await status(s)).redoLogs, 1)
    t.is(await sha256File(s.img('vm', 'disk')), live)
    await s.stopClean(t)
    for (const f of (await readdir(vm)).filter(f => f.endsWith('.vmdk'))) {
      const q = await run('qemu-img', ['check', path.join(vm, f)])
      t.is(q.code, 0, describe(q))
    }
    // the CLI shows a progress bar on a terminal
    const top = (await redofsOk('addredo', path.join(vm, 'disk'))).stdout.trim()
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 8 0 64M', top])
    const tty = await run('script', ['-qec', `${process.execPath} ${REDOFS_BIN} commit ${path.join(vm, 'disk')} level=0`, '/dev/null'])
    t.is(tty.code, 0, describe(tty))
    t.regex(tty.stdout, /commit \[#*\.*\] +\d+% .*ETA/)
  })

  test.serial('unmount with a paused commit: the commit is cancelled, the server exits, the chain is as before', async t => {
    const { s, vm, live, store, dir } = await pausedCommit('256M', '192M')
    t.is(((await status(s)).job as { state: string }).state, 'paused')
    // nobody can resume it once the mount is gone: waiting for it would never end
    await s.stopClean(t, 30_000)
    t.deepEqual((await readdir(vm)).filter(f => f.includes('redofs-')), [], 'the stopped commit left its journal or dropped files')
    const again = await env.mount(store, path.join(dir, 'mnt2'))
    t.is((await status(again)).redoLogs, 2)
    t.is(await sha256File(again.img('vm', 'disk')), live)
    await again.stopClean(t)
  })

  test.serial('a disk whose name holds "@" is served under that name, its generations after a further "@"', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'data@2024', '16M')
    const s = await env.mount(store, path.join(dir, 'mnt'))
    const img = s.img('vm', 'data@2024')
    await shOk('printf hello | dd of="$1" bs=1 seek=4096 conv=notrunc status=none', [img])
    await s.commandOk('vm', 'data@2024', 'addredo')
    await shOk('printf world | dd of="$1" bs=1 seek=4096 conv=notrunc status=none', [img])
    t.deepEqual((await readdir(path.join(s.mnt, 'vm'))).sort(), ['data@2024.img', 'data@2024@0.img'])
    t.is((await sh('dd if="$1" bs=1 skip=4096 count=5 status=none', [img])).stdout, 'world')
    t.is((await sh('dd if="$1" bs=1 skip=4096 count=5 status=none', [s.img('vm', 'data@2024', 0)])).stdout, 'hello')
    await s.stopClean(t)
  })

  test.serial('a disk named "<another disk>@<x>" is left out with an error naming it: the name stays generation x of the other disk', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'a', '16M')
    await createDisk(store, 'vm', 'a@0', '16M')
    const s = await env.mount(store, path.join(dir, 'mnt'))
    await shOk('printf hello | dd of="$1" bs=1 seek=4096 conv=notrunc status=none', [s.img('vm', 'a')])
    await s.commandOk('vm', 'a', 'addredo')
    await shOk('printf world | dd of="$1" bs=1 seek=4096 conv=notrunc status=none', [s.img('vm', 'a')])
    t.deepEqual((await readdir(path.join(s.mnt, 'vm'))).sort(), ['a.img', 'a@0.img'], 'each name once')
    t.is((await sh('dd if="$1" bs=1 skip=4096 count=5 status=none', [s.img('vm', 'a', 0)])).stdout, 'hello', 'a@0.img is generation 0 of disk a')
    const w = await sh('printf x | dd of="$1" bs=1 seek=0 conv=notrunc status=none', [s.img('vm', 'a', 0)])
    t.not(w.code, 0, 'a@0.img took a write: it is not the frozen generation')
    const vmStatus = (await shOk('cat "$1"', [path.join(s.mnt, '.ctl', 'vm', 'status')])).stdout
    t.regex(vmStatus, /disk \\"a@0\\" left out: a@0\.img is the name of generation or label \\"0\\" of disk \\"a\\"/)
    await s.stopClean(t)
    // the command line: <disk>@0 is generation 0 as on the mount, the file a@0.vmdk itself
    const gen0 = JSON.parse((await redofsOk('map', path.join(store, 'vm', 'a@0'))).stdout) as Array<{ data: boolean }>
    t.true(gen0.some(e => e.data), 'a@0 is not generation 0 of disk a (which holds "hello")')
    const file = JSON.parse((await redofsOk('map', path.join(store, 'vm', 'a@0.vmdk'))).stdout) as Array<{ data: boolean }>
    t.false(file.some(e => e.data), 'a@0.vmdk was not taken as the (empty) disk file')
  })

  test.serial('a redo log whose header is destroyed keeps its disk out of the mount (its parent is not served as the live disk); the other disk stays', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'vm', 'a', '16M')
    await createDisk(store, 'vm', 'b', '16M')
    await mustRun(process.execPath, [REDOFS_BIN, 'addredo', path.join(store, 'vm', 'a')])
    const redo = path.join(store, 'vm', 'a-000001.vmdk')
    await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0xbb 0 2M', redo])
    await shOk('printf XXXX | dd of="$1" conv=notrunc status=none', [redo]) // no magic: it looks like extent data
    const before = await snapshotTree(store)
    const s = await env.mount(store, path.join(dir, 'mnt'))
    t.deepEqual((await readdir(path.join(s.mnt, 'vm'))).sort(), ['b.img'], 'disk a is served (from its parent)')
    const vmStatus = (await shOk('cat "$1"', [path.join(s.mnt, '.ctl', 'vm', 'status')])).stdout
    t.regex(vmStatus, /a-000001\.vmdk: not a VMDK file \(unknown magic 58585858\), and no descriptor beside it uses it as an extent/)
    await s.stopClean(t)
    t.deepEqual(await snapshotTree(store), before, 'a file of the store changed')
  })

  test.serial('a VM named "status", or a disk named like a VM\'s control file, is left out with an error: .ctl keeps its own files', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    await createDisk(store, 'status', 'd', '8M')
    for (const d of ['ok', 'status', 'commit']) await createDisk(store, 'vm', d, '8M')
    const s = await env.mount(store, path.join(dir, 'mnt'))
    t.deepEqual((await readdir(s.mnt)).sort(), ['.ctl', 'vm'])
    t.deepEqual((await readdir(path.join(s.mnt, 'vm'))).sort(), ['ok.img'])
    const top = JSON.parse(await readFile(path.join(s.mnt, '.ctl', 'status'), 'utf8')) as { errors: Array<{ message: string }>, vms: Array<{ name: string, errors: Array<{ message: string }> }> }
    t.regex(top.errors.map(e => e.message).join('\n'), /VM "status" left out: \.ctl\/status is the store's status file/)
    const vmErrors = top.vms.find(v => v.name === 'vm')?.errors.map(e => e.message).join('\n') ?? ''
    for (const d of ['status', 'commit']) t.regex(vmErrors, new RegExp(`disk "${d}" left out: \\.ctl/vm/${d} is the VM's own control file`))
    t.is((JSON.parse(await readFile(path.join(s.mnt, '.ctl', 'vm', 'status'), 'utf8')) as { name: string }).name, 'vm')
    await s.stopClean(t)
  })

  test.serial('a VM-wide discard is all or none: a generation open on one disk refuses it before any disk changes', async t => {
    const dir = await env.tmp()
    const store = path.join(dir, 'store')
    for (const d of ['a', 'b']) {
      await createDisk(store, 'vm', d, '16M')
      await redofsOk('addredo', path.join(store, 'vm', d))
    }
    const s = await env.mount(store, path.join(dir, 'mnt'))
    // a reader holds b@0.img open
    const holder = spawn('sh', ['-c', 'exec 3<"$1"; echo open; exec sleep 60', 'sh', s.img('vm', 'b', 0)], { stdio: ['ignore', 'pipe', 'inherit'] })
    t.teardown(() => { holder.kill() })
    await new Promise<void>(resolve => holder.stdout.once('data', () => resolve()))
    const r = await s.command('vm', undefined, 'discard')
    t.not(r.code, 0, 'the VM-wide discard succeeded with a generation open')
    t.regex(await s.errorText('vm'), /generation 0 is open; .* would take its file b@0\.img away/)
    t.is((await status(s, 'vm', 'a')).redoLogs, 1, 'disk a lost its redo log although the discard was refused')
    holder.kill()
    await new Promise(resolve => holder.once('exit', resolve))
    // the kernel sends RELEASE after the holder is gone, not before its exit is reported
    let again = await s.command('vm', undefined, 'discard')
    for (let i = 0; i < 50 && again.code !== 0; i++) {
      await new Promise(resolve => setTimeout(resolve, 100))
      again = await s.command('vm', undefined, 'discard')
    }
    t.is(again.code, 0, describe(again))
    t.is((await status(s, 'vm', 'a')).redoLogs, 0)
    t.is((await status(s, 'vm', 'b')).redoLogs, 0)
    await s.stopClean(t)
  })
}
