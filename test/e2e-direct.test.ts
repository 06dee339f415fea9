/**
 * With REDOFS_DIRECT=1 new grains of the live redo log are written around the page cache
 * (src/formats/direct.ts): the mounted file already caches what was written, so the redo log
 * keeps no second copy. Checked with fincore (util-linux) on the redo log after writing through
 * the mount, against a server left at the default (the page cache), which shows that the
 * measurement can tell the two apart. Both ways must leave the same bytes in files qemu-img
 * accepts.
 */
import test from 'ava'
import { randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import path from 'node:path'
import { createDisk, e2e, requireFuse, requireTools, sh } from './helpers/mount'
import { convertToRaw, describe, qemuCheck, sameContent } from './helpers/qemu'
import { redofsOk } from './helpers/redofs'

requireFuse(test)
requireTools(test, ['fincore'])
const ctx = e2e(test)

const M = 1024 * 1024
const WRITE = 32 * M

/** Bytes of `file` the kernel holds in its page cache. */
async function cachedBytes (file: string): Promise<number> {
  const r = await sh('fincore --bytes --noheadings --output RES "$1"', [file])
  if (r.code !== 0) throw new Error(`fincore failed\n${describe(r)}`)
  return Number(r.stdout.trim())
}

/** A 64 MiB disk with one empty redo log, 32 MiB of data written through the mount at 8 MiB. */
async function writeThrough (data: string, env: Record<string, string>): Promise<{ top: string, cached: number, root: string }> {
  const root = await ctx.tmp()
  const store = path.join(root, 'store')
  await createDisk(store, 'vm', 'disk', '64M')
  await redofsOk(['addredo', path.join(store, 'vm', 'disk')])
  const top = path.join(store, 'vm', 'disk-000001.vmdk')
  const srv = await ctx.mount(store, path.join(root, 'mnt'), [], env)
  const r = await sh('dd if="$1" of="$2" bs=1M seek=8 conv=notrunc,fsync status=none', [data, srv.img('vm', 'disk')])
  if (r.code !== 0) throw new Error(`dd failed\n${describe(r)}`)
  const cached = await cachedBytes(top)
  const back = await sh('cmp -n $((32 * 1024 * 1024)) -i 0:$((8 * 1024 * 1024)) "$1" "$2"', [data, srv.img('vm', 'disk')])
  if (back.code !== 0) throw new Error(`the mount does not read back what was written\n${describe(back)}`)
  await srv.shutdown()
  return { top, cached, root }
}

test('REDOFS_DIRECT=1: new grains bypass the page cache, the redo log keeps no second cached copy of what was written', async t => {
  const root = await ctx.tmp()
  const data = path.join(root, 'data.bin')
  await writeFile(data, randomBytes(WRITE))
  const direct = await writeThrough(data, { REDOFS_DIRECT: '1' })
  const buffered = await writeThrough(data, {})
  t.log(`redo log cached after a ${WRITE / M} MiB write: ${(direct.cached / M).toFixed(1)} MiB with REDOFS_DIRECT=1, ${(buffered.cached / M).toFixed(1)} MiB by default`)
  t.true(buffered.cached >= WRITE * 0.75, 'by default the written grains stay cached (else this test could not tell)')
  t.true(direct.cached <= WRITE * 0.1, 'written directly, the grains are not cached a second time')
  for (const top of [direct.top, buffered.top]) {
    const c = await qemuCheck(top)
    t.is(c.code, 0, describe(c))
  }
  const [a, b] = [path.join(root, 'direct.raw'), path.join(root, 'buffered.raw')]
  await convertToRaw(direct.top, a)
  await convertToRaw(buffered.top, b)
  const same = await sameContent(a, b)
  t.true(same.same, same.detail)
})
