/**
 * Deleting dropped files (src/formats/layer.ts reapDropped): the name goes at once; a large
 * file's blocks are freed by a helper process that holds its last reference, so the caller does
 * not wait for the file system to free them; without a helper the caller frees them itself.
 */
import test from 'ava'
import cp from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdtemp, open, readdir, readlink, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { DROPPED, reapDropped } from '../src/formats/layer'
import { waitFor } from './helpers/mount'

async function inTmp (fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'redofs-test-'))
  try { await fn(dir) } finally { await rm(dir, { recursive: true, force: true }) }
}

/** PIDs (this one included) with a descriptor on `p` after it was deleted. */
async function holders (p: string): Promise<number[]> {
  const out: number[] = []
  for (const pid of (await readdir('/proc')).filter(n => /^\d+$/.test(n))) {
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])
    for (const fd of fds) {
      if (await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '') === `${p} (deleted)`) { out.push(Number(pid)); break }
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

/** Run `fn` recording the processes spawned meanwhile. */
async function spawned (fn: () => Promise<void>): Promise<Array<{ cmd: string, child: ChildProcess }>> {
  const calls: Array<{ cmd: string, child: ChildProcess }> = []
  const real = cp.spawn
  ;(cp as { spawn: unknown }).spawn = (cmd: string, ...rest: unknown[]) => {
    const child = (real as (...a: unknown[]) => ChildProcess)(cmd, ...rest)
    calls.push({ cmd, child })
    return child
  }
  try { await fn() } finally { (cp as { spawn: unknown }).spawn = real }
  return calls
}

test.serial('a large dropped file: the name is gone on return, a helper frees the blocks, then nobody holds it', async t => {
  await inTmp(async dir => {
    const p = await droppedFile(dir, 40)
    const calls = await spawned(async () => await reapDropped([p]))
    t.false(existsSync(p), 'the name is still there')
    t.false((await holders(p)).includes(process.pid), 'the caller kept a descriptor on the deleted file')
    t.deepEqual(calls.map(c => c.cmd), ['cat'], 'no helper took the file')
    const helper = calls[0].child
    t.true(await waitFor(() => helper.exitCode !== null, 100, 100), 'the helper did not exit')
    t.deepEqual(await holders(p), [], 'a process still holds the deleted file')
  })
})

test.serial('without a helper (no cat on PATH) the caller frees the file itself', async t => {
  await inTmp(async dir => {
    const p = await droppedFile(dir, 40)
    const empty = await mkdtemp(path.join(dir, 'bin-'))
    const saved = process.env.PATH
    process.env.PATH = empty
    try {
      await reapDropped([p])
    } finally {
      process.env.PATH = saved
    }
    t.false(existsSync(p), 'the name is still there')
    t.deepEqual(await holders(p), [], 'a process still holds the deleted file')
  })
})

test.serial('a small dropped file is just unlinked; missing ones are fine; other names are refused', async t => {
  await inTmp(async dir => {
    const p = path.join(dir, `small.vmdk${DROPPED}`)
    await writeFile(p, 'x')
    const calls = await spawned(async () => await reapDropped([p, path.join(dir, `gone.vmdk${DROPPED}`)]))
    t.false(existsSync(p))
    t.deepEqual(calls, [], 'a helper was started for a small file')
    await t.throwsAsync(reapDropped([path.join(dir, 'disk.vmdk')]), { message: /not a dropped file/ })
  })
})
