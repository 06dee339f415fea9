/**
 * Deleting dropped files (src/formats/layer.ts): reapDropped unlinks them; reapDroppedFreeingLater
 * (the offline commands' last step) removes the names at once and leaves freeing a large file's
 * blocks to a helper process that holds its last reference, so the command does not wait for the
 * file system; without a helper the caller frees them itself. unfinishedDrops (src/chain/peek.ts)
 * finds what a drop killed between its renames left under the old names.
 */
import test from 'ava'
import cp from 'node:child_process'
import { spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync, readlinkSync } from 'node:fs'
import { copyFile, open, readdir, readFile, readlink, realpath, rename, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { peek, unfinishedDrops } from '../src/chain/peek'
import { DROPPED, reapDropped, reapDroppedFreeingLater } from '../src/formats/layer'
import { mustRun } from './helpers/qemu'
import { waitFor } from './helpers/mount'
import { tmpDirs } from './helpers/tmp'

const tmp = tmpDirs(test)

/** Run `fn` in a temporary directory named by its real path (descriptor links in /proc name real paths). */
async function inTmp (fn: (dir: string) => Promise<void>): Promise<void> {
  await fn(await realpath(await tmp()))
}

const names = (link: string, p: string): boolean => link === p || link === `${p} (deleted)`

/** PIDs (this one included) with a descriptor on `p`, deleted or not. */
async function holders (p: string): Promise<number[]> {
  const out: number[] = []
  for (const pid of (await readdir('/proc')).filter(n => /^\d+$/.test(n))) {
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])
    for (const fd of fds) {
      if (names(await readlink(`/proc/${pid}/fd/${fd}`).catch(() => ''), p)) { out.push(Number(pid)); break }
    }
  }
  return out
}

/** A dropped file holding `mib` MiB of written blocks. */
async function droppedFile (dir: string, mib: number): Promise<string> {
  const p = path.join(dir, `disk-000001.vmdk${DROPPED}`)
  const fh = await open(p, 'w')
  try { for (let i = 0; i < mib; i++) await fh.write(Buffer.alloc(1 << 20, 7)) } finally { await fh.close() }
  return p
}

interface Spawned { cmd: string, child: ChildProcess, fd3: string }

/**
 * Run `fn` recording the processes spawned meanwhile and what each one's fd 3 names (read as
 * spawn returns: the child has exec'd by then). `redirect` replaces the command.
 */
async function spawned (fn: () => Promise<void>, redirect?: string): Promise<Spawned[]> {
  const calls: Spawned[] = []
  const real = cp.spawn
  ;(cp as { spawn: unknown }).spawn = (cmd: string, ...rest: unknown[]) => {
    const child = (real as (...a: unknown[]) => ChildProcess)(redirect ?? cmd, ...rest)
    let fd3 = ''
    try { fd3 = child.pid !== undefined ? readlinkSync(`/proc/${child.pid}/fd/3`) : '' } catch {}
    calls.push({ cmd, child, fd3 })
    return child
  }
  try { await fn() } finally { (cp as { spawn: unknown }).spawn = real }
  return calls
}

test.serial('the holder scan sees a descriptor on the file (control for the tests below)', async t => {
  await inTmp(async dir => {
    const p = await droppedFile(dir, 1)
    const fh = await open(p, 'r')
    try { t.true((await holders(p)).includes(process.pid)) } finally { await fh.close() }
    t.false((await holders(p)).includes(process.pid))
  })
})

test.serial('a large dropped file, freeing later: the name is gone on return, a helper holds the file and frees it, then nobody holds it', async t => {
  await inTmp(async dir => {
    const p = await droppedFile(dir, 40)
    const calls = await spawned(async () => await reapDroppedFreeingLater([p]))
    t.false(existsSync(p), 'the name is still there')
    t.false((await holders(p)).includes(process.pid), 'the caller kept a descriptor on the deleted file')
    t.deepEqual(calls.map(c => c.cmd), ['/bin/cat'], 'no helper took the file')
    t.true(names(calls[0].fd3, p), `the helper's fd 3 is ${calls[0].fd3}, not the file`)
    const helper = calls[0].child
    t.true(await waitFor(() => helper.exitCode !== null, 100, 100), 'the helper did not exit')
    t.deepEqual(await holders(p), [], 'a process still holds the deleted file')
  })
})

test.serial('freeing later without a helper (it cannot start): the caller frees the file itself', async t => {
  await inTmp(async dir => {
    const p = await droppedFile(dir, 40)
    const calls = await spawned(async () => await reapDroppedFreeingLater([p]), path.join(dir, 'no-such-cat'))
    t.is(calls.length, 1, 'no helper was tried')
    t.false(existsSync(p), 'the name is still there')
    t.deepEqual(await holders(p), [], 'a process still holds the deleted file')
  })
})

test.serial('reapDropped unlinks without a helper (the space is free on return); small files are just unlinked; missing ones are fine; other names are refused', async t => {
  await inTmp(async dir => {
    const big = await droppedFile(dir, 40)
    const small = path.join(dir, `small.vmdk${DROPPED}`)
    await writeFile(small, 'x')
    t.deepEqual(await spawned(async () => await reapDropped([big])), [], 'reapDropped started a helper')
    t.false(existsSync(big))
    t.deepEqual(await holders(big), [])
    const calls = await spawned(async () => await reapDroppedFreeingLater([small, path.join(dir, `gone.vmdk${DROPPED}`)]))
    t.false(existsSync(small))
    t.deepEqual(calls, [], 'a helper was started for a small file')
    // a FIFO named like a dropped file: removed, not waited on
    const fifo = path.join(dir, `fifo.vmdk${DROPPED}`)
    t.is(spawnSync('mkfifo', [fifo]).status, 0, 'mkfifo failed')
    await reapDroppedFreeingLater([fifo])
    t.false(existsSync(fifo))
    await t.throwsAsync(reapDroppedFreeingLater([path.join(dir, 'disk.vmdk')]), { message: /not a dropped file/ })
    await t.throwsAsync(reapDropped([path.join(dir, 'disk.vmdk')]), { message: /not a dropped file/ })
  })
})

test.serial('unfinishedDrops: only a dropped stand-alone descriptor\'s unused extents and side files, never an extent another descriptor uses, a descriptor, or a name a dropped embedded descriptor still spells', async t => {
  await inTmp(async dir => {
    const at = (n: string): string => path.join(dir, n)
    const split = async (name: string): Promise<void> => { await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', at(name), '8M']) }
    // a drop killed after renaming its descriptor: its extent and content record stayed behind
    await split('gone.vmdk')
    await rename(at('gone.vmdk'), at(`gone.vmdk${DROPPED}`))
    await writeFile(at('gone.vmdk.redofs-digest'), '{}')
    // a dropped descriptor whose extent keep.vmdk (a live descriptor) still uses
    await split('keep.vmdk')
    await copyFile(at('keep.vmdk'), at(`shared.vmdk${DROPPED}`))
    // a dropped descriptor naming a file that is a descriptor itself
    await writeFile(at(`odd.vmdk${DROPPED}`), (await readFile(at('keep.vmdk'), 'latin1')).replace('keep-s001.vmdk', 'keep.vmdk'))
    // a monolithicSparse file renamed (its embedded descriptor still spells old.vmdk), then
    // dropped; a flat extent's data now carries the old name
    await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', at('old.vmdk'), '8M'])
    await rename(at('old.vmdk'), at(`new.vmdk${DROPPED}`))
    await writeFile(at('old.vmdk'), Buffer.alloc(2 << 20, 7))
    t.true((await peek(at('old.vmdk')))?.extentOnly, 'old.vmdk does not look like an extent (the test exercises nothing)')
    const before = (await readdir(dir)).sort()
    t.deepEqual((await unfinishedDrops(dir)).sort(), [at('gone-s001.vmdk'), at('gone.vmdk.redofs-digest')])
    t.deepEqual((await readdir(dir)).sort(), before, 'unfinishedDrops changed the directory')
  })
})
