/**
 * E2E acceptance 7: a real filesystem on the disk. mkfs.ext4 on the live file, loop-mount it,
 * write files; addredo; change files through a new loop mount; the frozen generation,
 * loop-mounted read-only, still holds the old tree; `fsck.ext4 -n -f` is clean on every
 * generation file of the mount.
 */
import test, { type ExecutionContext } from 'ava'
import { randomBytes } from 'node:crypto'
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { createDisk, e2e, isMounted, requireFuse, requireTools, sh, trackMount, type Server } from './helpers/mount'
import { describe } from './helpers/qemu'

requireFuse(test, ['qemu-img'])
requireTools(test, ['mkfs.ext4', 'fsck.ext4', 'mount', 'umount', 'losetup'])
const ctx = e2e(test)

let root: string
let srv: Server
let lm: string // loop mountpoint
const gen0Files: Record<string, Buffer> = {}
const gen1Files: Record<string, Buffer> = {}

test.before(async () => {
  root = await ctx.tmp()
  const store = path.join(root, 'store')
  await createDisk(store, 'vm1', 'disk', '64M')
  srv = await ctx.mount(store, path.join(root, 'mnt'))
  lm = path.join(root, 'loop')
  await mkdir(lm)
  trackMount(lm)
})

async function loopMount (t: ExecutionContext, image: string, ro: boolean): Promise<void> {
  const r = await sh('mount -t ext4 -o "$3" "$1" "$2"', [image, lm, ro ? 'loop,ro' : 'loop'])
  t.is(r.code, 0, describe(r))
  t.true(isMounted(lm), `${lm} is not mounted\n${describe(r)}`)
}

async function loopUmount (t: ExecutionContext): Promise<void> {
  const r = await sh('sync -f "$1"/. 2>/dev/null; umount "$1"', [lm])
  t.is(r.code, 0, describe(r))
  t.false(isMounted(lm))
}

/** relative path → content of every regular file under the loop mount (lost+found excluded). */
async function tree (dir: string, rel = ''): Promise<Record<string, Buffer>> {
  const out: Record<string, Buffer> = {}
  for (const e of await readdir(path.join(dir, rel), { withFileTypes: true })) {
    const r = path.join(rel, e.name)
    if (r === 'lost+found') continue
    if (e.isDirectory()) Object.assign(out, await tree(dir, r))
    else if (e.isFile()) out[r] = await readFile(path.join(dir, r))
  }
  return out
}

function sameTree (t: ExecutionContext, got: Record<string, Buffer>, want: Record<string, Buffer>, what: string): void {
  t.deepEqual(Object.keys(got).sort(), Object.keys(want).sort(), `${what}: file names`)
  for (const k of Object.keys(want)) t.true(got[k]?.equals(want[k]) === true, `${what}: content of ${k}`)
}

test.serial('mkfs.ext4 on the live file, loop-mount it, write files, umount', async t => {
  const mk = await sh('mkfs.ext4 -q -F -E nodiscard -L redofs-e2e "$1"', [srv.img('vm1', 'disk')])
  t.is(mk.code, 0, describe(mk))
  await loopMount(t, srv.img('vm1', 'disk'), false)
  Object.assign(gen0Files, {
    'a.txt': Buffer.from('generation zero\n'),
    'c.txt': Buffer.from('removed later\n'),
    'dir/b.bin': randomBytes(3 * 1024 * 1024 + 17),
    'dir/sub/e.bin': randomBytes(70000)
  })
  for (const [k, v] of Object.entries(gen0Files)) {
    await mkdir(path.dirname(path.join(lm, k)), { recursive: true })
    await writeFile(path.join(lm, k), v)
  }
  sameTree(t, await tree(lm), gen0Files, 'before umount')
  await loopUmount(t)
})

test.serial('after addredo, loop-mount the live file again and change files', async t => {
  const a = await srv.command('vm1', 'disk', 'addredo')
  t.is(a.code, 0, describe(a))
  t.is((await srv.status('vm1', 'disk')).redoLogs, 1)
  await loopMount(t, srv.img('vm1', 'disk'), false)
  sameTree(t, await tree(lm), gen0Files, 'the live file right after addredo')
  Object.assign(gen1Files, gen0Files)
  gen1Files['a.txt'] = Buffer.from('generation one\n')
  delete gen1Files['c.txt']
  gen1Files['d.txt'] = Buffer.from('new in generation one\n')
  gen1Files['dir/b.bin'] = randomBytes(2 * 1024 * 1024 + 5)
  await writeFile(path.join(lm, 'a.txt'), gen1Files['a.txt'])
  const rm = await sh('rm "$1/c.txt"', [lm])
  t.is(rm.code, 0, describe(rm))
  await writeFile(path.join(lm, 'd.txt'), gen1Files['d.txt'])
  await writeFile(path.join(lm, 'dir/b.bin'), gen1Files['dir/b.bin'])
  sameTree(t, await tree(lm), gen1Files, 'after the changes')
  await loopUmount(t)
})

test.serial('the frozen generation disk@0.img, loop-mounted read-only, holds the old tree; the live file the new one', async t => {
  await loopMount(t, srv.img('vm1', 'disk', 0), true)
  sameTree(t, await tree(lm), gen0Files, 'disk@0.img')
  await loopUmount(t)
  await loopMount(t, srv.img('vm1', 'disk'), true)
  sameTree(t, await tree(lm), gen1Files, 'disk.img')
  await loopUmount(t)
})

test.serial('fsck.ext4 -n -f is clean on each generation file of the mount', async t => {
  for (const f of [srv.img('vm1', 'disk', 0), srv.img('vm1', 'disk')]) {
    const r = await sh('fsck.ext4 -n -f "$1"', [f])
    t.is(r.code, 0, `${path.basename(f)}\n${describe(r)}`)
  }
  await srv.stopClean(t)
})
