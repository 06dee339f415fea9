/**
 * E2E acceptance 2 (SPEC §2): writes through <disk>.img with dd and cp land exactly, frozen
 * generations never change, the files left behind are what the mount served and pass
 * `qemu-img check`; the live file behaves like a block device (ENOSPC past the capacity,
 * truncate only to the capacity, O_TRUNC ignored) and frozen files refuse writers (EROFS).
 */
import test from 'ava'
import { randomBytes } from 'node:crypto'
import { copyFile, open, stat, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { createDisk, ddRange, e2e, requireFuse, sh, type Server } from './helpers/mount'
import { convertToRaw, describe, qemuCheck, qemuWrite, sameContent, sha256File, mustRun } from './helpers/qemu'

requireFuse(test)
const ctx = e2e(test)

const K = 1024
const M = 1024 * K
const SIZE = 64 * M

let root: string
let store: string
let vmDir: string
let srv: Server
let shadow: string // raw file receiving every write the test makes through the mount
let frozenHash: string
let base0Raw: string

test.before(async () => {
  root = await ctx.tmp()
  store = path.join(root, 'store')
  vmDir = path.join(store, 'vm1')
  // a monolithicFlat base made by redofs, data written by qemu, and a qemu-made redo log
  await createDisk(store, 'vm1', 'disk', '64M', 'flat')
  await qemuWrite(path.join(vmDir, 'disk.vmdk'), [
    { pattern: 0x5a, offset: 0, length: 3 * M + 17 },
    { pattern: 0x5b, offset: 40 * M - 5, length: 70000 },
    { pattern: 0x5c, offset: SIZE - 4096, length: 4096 }
  ])
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'disk.vmdk', '-F', 'vmdk', 'disk-000001.vmdk'], { cwd: vmDir })
  await qemuWrite(path.join(vmDir, 'disk-000001.vmdk'), [
    { pattern: 0x6a, offset: M - 3, length: 200000 },
    { pattern: 0x6b, offset: 50 * M, length: 65536 }
  ])
  base0Raw = path.join(root, 'gen0.raw')
  await convertToRaw(path.join(vmDir, 'disk.vmdk'), base0Raw)
  shadow = path.join(root, 'shadow.raw')
  await convertToRaw(path.join(vmDir, 'disk-000001.vmdk'), shadow)
  srv = await ctx.mount(store, path.join(root, 'mnt'))
  frozenHash = await sha256File(srv.img('vm1', 'disk', 0))
})

const live = (): string => srv.img('vm1', 'disk')

test.serial('cp image.raw disk.img (open with O_TRUNC) overwrites the disk in place: same size, content reads back exactly', async t => {
  const image = path.join(root, 'image.raw')
  await writeFile(image, randomBytes(SIZE))
  const r = await sh('cp "$1" "$2"', [image, live()])
  t.is(r.code, 0, describe(r))
  t.is((await stat(live())).size, SIZE, 'the live file keeps the capacity as its size')
  const c = await sameContent(live(), image)
  t.true(c.same, `disk.img after cp: ${c.detail}`)
  await copyFile(image, shadow)
})

interface DdWrite { bs: number, count: number, seek: number, skip: number }

const DD_WRITES: DdWrite[] = [
  { bs: 4096, count: 5, seek: 3 * 4096, skip: 0 },
  { bs: 4096, count: 3, seek: 12345, skip: 77 }, // unaligned
  { bs: 4096, count: 1, seek: SIZE - 4096, skip: 5000 }, // the last block
  { bs: 65536, count: 4, seek: 10 * 65536 - 1000, skip: 3 }, // across grains
  { bs: 65536, count: 1, seek: 20 * 65536 + 1, skip: 65537 },
  { bs: M, count: 3, seek: 5 * M + 777, skip: 11 },
  { bs: M, count: 2, seek: SIZE - 2 * M, skip: 123 }, // up to the last byte
  { bs: 13, count: 7, seek: 999983, skip: 1 }, // tiny, odd
  { bs: 1, count: 1, seek: 0, skip: 9 }
]

test.serial('dd writes into disk.img (bs 4k, 64k, 1M, unaligned offsets via seek_bytes) read back exactly', async t => {
  const src = path.join(root, 'src.bin')
  await writeFile(src, randomBytes(8 * M))
  for (const w of DD_WRITES) {
    const args = [src, live(), String(w.bs), String(w.count), String(w.seek), String(w.skip)]
    const dd = 'dd if="$1" of="$2" bs="$3" count="$4" seek="$5" skip="$6" iflag=skip_bytes oflag=seek_bytes conv=notrunc status=none'
    const r = await sh(dd, args)
    t.is(r.code, 0, describe(r))
    await sh(dd, [src, shadow, ...args.slice(2)]) // the same write on the shadow raw file
    const len = w.bs * w.count
    const want = await ddRange(src, w.skip, len)
    const got = await ddRange(live(), w.seek, len)
    t.is(got.n, len, `read back of ${JSON.stringify(w)}: count`)
    t.is(got.sha, want.sha, `read back of ${JSON.stringify(w)}: content`)
  }
  const c = await sameContent(live(), shadow)
  t.true(c.same, `whole disk.img vs the shadow raw copy that got the same writes: ${c.detail}`)
})

test.serial('writing past the capacity fails with ENOSPC (at the end and across it) and changes nothing', async t => {
  const atEnd = await sh('dd if=/dev/urandom of="$1" bs=4096 count=1 seek="$2" oflag=seek_bytes conv=notrunc status=none', [live(), String(SIZE)])
  t.not(atEnd.code, 0, describe(atEnd))
  t.regex(atEnd.stderr, /No space left on device/, describe(atEnd))
  // a write straddling the end carries the bytes already there, so a short write would not change them either
  const tail = path.join(root, 'tail.bin')
  const fh = await open(shadow, 'r')
  const cur = Buffer.alloc(100)
  await fh.read(cur, 0, 100, SIZE - 100)
  await fh.close()
  await writeFile(tail, Buffer.concat([cur, randomBytes(100)]))
  const across = await sh('dd if="$1" of="$2" bs=200 count=1 seek="$3" oflag=seek_bytes conv=notrunc status=none', [tail, live(), String(SIZE - 100)])
  t.not(across.code, 0, describe(across))
  t.regex(across.stderr, /No space left on device/, describe(across))
  t.is((await stat(live())).size, SIZE, 'the size did not grow')
  const c = await sameContent(live(), shadow)
  t.true(c.same, `content after the refused writes: ${c.detail}`)
})

test.serial('truncate -s to another size fails (EPERM) and leaves size and content; truncate to the capacity is a no-op', async t => {
  for (const s of [String(32 * M), String(SIZE + M), '0']) {
    const r = await sh('truncate -s "$2" "$1"', [live(), s])
    t.not(r.code, 0, `truncate -s ${s}\n${describe(r)}`)
    t.regex(r.stderr, /Operation not permitted/, describe(r))
  }
  const same = await sh('truncate -s "$2" "$1"', [live(), String(SIZE)])
  t.is(same.code, 0, describe(same))
  t.is((await stat(live())).size, SIZE)
  const c = await sameContent(live(), shadow)
  t.true(c.same, `content after the truncates: ${c.detail}`)
})

test.serial('opening a frozen generation for writing fails with EROFS', async t => {
  const frozen = srv.img('vm1', 'disk', 0)
  const dd = await sh('dd if=/dev/zero of="$1" bs=4096 count=1 conv=notrunc status=none', [frozen])
  t.not(dd.code, 0, describe(dd))
  t.regex(dd.stderr, /Read-only file system/, describe(dd))
  const rw = await sh('exec 3<>"$1"', [frozen])
  t.not(rw.code, 0, describe(rw))
  t.regex(rw.stderr, /Read-only file system/, describe(rw))
  for (const flags of ['r+', 'w', 'a']) {
    const err = await open(frozen, flags).then(async fh => { await fh.close(); return null }, (e: NodeJS.ErrnoException) => e)
    t.is(err?.code, 'EROFS', `open(disk@0.img, "${flags}")`)
  }
})

test.serial('the frozen generation disk@0.img did not change through all the writes (hash before/after, = qemu-img convert of the base)', async t => {
  t.is(await sha256File(srv.img('vm1', 'disk', 0)), frozenHash)
  const c = await sameContent(srv.img('vm1', 'disk', 0), base0Raw)
  t.true(c.same, c.detail)
})

test.serial('after unmount, qemu-img convert of the top equals what the mount served, and qemu-img check passes on every file', async t => {
  const served = path.join(root, 'served.raw')
  const r = await sh('cp "$1" "$2"', [live(), served])
  t.is(r.code, 0, describe(r))
  await srv.stopClean(t)
  const top = path.join(vmDir, 'disk-000001.vmdk')
  const after = path.join(root, 'after.raw')
  await convertToRaw(top, after)
  const c = await sameContent(after, served)
  t.true(c.same, `qemu-img convert ${path.basename(top)} vs what the mount served: ${c.detail}`)
  const c2 = await sameContent(after, shadow)
  t.true(c2.same, `qemu-img convert ${path.basename(top)} vs the shadow raw copy: ${c2.detail}`)
  const base = path.join(root, 'base-after.raw')
  await convertToRaw(path.join(vmDir, 'disk.vmdk'), base)
  t.true((await sameContent(base, base0Raw)).same, 'the base file was not written')
  for (const f of ['disk.vmdk', 'disk-000001.vmdk']) {
    const chk = await qemuCheck(path.join(vmDir, f))
    t.is(chk.code, 0, `qemu-img check ${f}\n${describe(chk)}`)
  }
})
