/**
 * E2E acceptance 1 (SPEC §2): every generation file of a qemu-made chain reads exactly like
 * `qemu-img convert -O raw` of that chain level, also for odd offsets and lengths.
 */
import test from 'ava'
import { readFile, stat } from 'node:fs/promises'
import path from 'node:path'
import { ddRange, e2e, mountInfo, preadInChild, requireFuse, type Server } from './helpers/mount'
import { describe, sameContent } from './helpers/qemu'
import { FOUR_LEVELS, convertAll, storeChain, type StoreChain } from './helpers/store'

requireFuse(test)
const ctx = e2e(test)

const M = 1024 * 1024
const SIZE = 16 * M
const G = 65536

let chain: StoreChain
let raws: string[] = []
let srv: Server

test.before(async () => {
  const root = await ctx.tmp()
  // base + 2 redo logs, overlapping unaligned writes across grain boundaries (incl. a zero write)
  chain = await storeChain(root, SIZE, [{ writes: FOUR_LEVELS[0] }, { writes: FOUR_LEVELS[1] }, { writes: FOUR_LEVELS[2] }])
  raws = await convertAll(chain.files, root, 'qemu')
  srv = await ctx.mount(chain.store, path.join(root, 'mnt'))
})

const genFile = (g: number): string => g === 2 ? srv.img('vm1', 'disk') : srv.img('vm1', 'disk', g)

test.serial('every generation file (disk@0.img, disk@1.img, disk.img) is byte-identical to qemu-img convert -O raw of its level', async t => {
  for (let g = 0; g <= 2; g++) {
    const f = genFile(g)
    const st = await stat(f)
    t.is(st.size, SIZE, `${path.basename(f)}: st_size is the capacity`)
    const c = await sameContent(f, raws[g])
    t.true(c.same, `generation ${g} (${path.basename(f)}) vs qemu-img convert of ${path.basename(chain.files[g])}: ${c.detail}`)
  }
})

/** [offset, length] reads: 1 byte, across the 64 KiB grain boundary, odd sizes, the end, past it. */
const RANGES: Array<[number, number]> = [
  [0, 1],
  [1, 1],
  [4095, 3],
  [G - 1, 1],
  [G - 1, 2],
  [G - 100, 200],
  [G - 50, 100],
  [2 * G - 7, G + 14],
  [3 * M + 7, 150001],
  [3 * M + G - 3, 6],
  [7 * M - 5, 200007],
  [7 * M + 100, 100],
  [12 * M + 1, 1],
  [SIZE - 513, 513],
  [SIZE - 1, 1],
  [SIZE - 1, 10], // only 1 byte left
  [SIZE - 300, 131072], // crosses the end
  [SIZE, 1], // at the end: 0 bytes
  [SIZE + 12345, 77] // past the end: 0 bytes
]

test.serial('dd reads at odd offsets and lengths (1 byte, across 65536, the last byte, past the end) return what the same dd returns on the converted raw file', async t => {
  for (let g = 0; g <= 2; g++) {
    for (const [pos, len] of RANGES) {
      const want = await ddRange(raws[g], pos, len)
      t.is(want.r.code, 0, describe(want.r))
      for (const bs of [1, 4096, 65536, 1048576]) {
        if (bs === 1 && len > 4096) continue
        const got = await ddRange(genFile(g), pos, len, bs)
        const what = `gen ${g}: dd bs=${bs} skip=${pos} count=${len} (bytes)`
        t.is(got.r.code, 0, `${what}\n${describe(got.r)}`)
        t.is(got.n, want.n, `${what}: byte count`)
        t.is(got.sha, want.sha, `${what}: content`)
      }
    }
    // sanity of the oracle itself: past-the-end reads are empty, the last byte is one byte
    t.is((await ddRange(raws[g], SIZE + 12345, 77)).n, 0)
    t.is((await ddRange(raws[g], SIZE - 1, 10)).n, 1)
  }
})

test.serial('a single pread(2) at odd offsets returns the same count and bytes as on the raw file (0 at and past the end)', async t => {
  for (let g = 0; g <= 2; g++) {
    const want = await preadInChild(raws[g], RANGES)
    const got = await preadInChild(genFile(g), RANGES)
    for (let i = 0; i < RANGES.length; i++) {
      const [pos, len] = RANGES[i]
      const what = `gen ${g}: pread(len=${len}, pos=${pos})`
      t.is(got[i].err, undefined, `${what}: ${got[i].err ?? ''}`)
      t.is(got[i].n, want[i].n, `${what}: byte count`)
      t.is(got[i].sha, want[i].sha, `${what}: content`)
    }
    t.is(got[RANGES.length - 1].n, 0, `gen ${g}: pread past the end returns 0 bytes`)
    t.is(got[RANGES.length - 2].n, 0, `gen ${g}: pread at the end returns 0 bytes`)
  }
})

async function readaheadKiB (mnt: string): Promise<number> {
  const info = mountInfo(mnt)
  if (info === undefined) throw new Error(`${mnt} is not mounted`)
  return Number((await readFile(`/sys/class/bdi/${info.dev}/read_ahead_kb`, 'utf8')).trim())
}

test.serial('the mount sets the kernel readahead window of its files: 1 MiB by default, --readahead SIZE, 0 keeps the kernel\'s 128 KiB', async t => {
  t.is(await readaheadKiB(srv.mnt), 1024, 'default mount')
  for (const [arg, kib] of [['256K', 256], ['0', 128]] as const) {
    const root = await ctx.tmp()
    const c = await storeChain(root, M, [{}])
    const s = await ctx.mount(c.store, path.join(root, 'mnt'), ['--readahead', arg])
    try {
      t.is(await readaheadKiB(s.mnt), kib, `--readahead ${arg}`)
    } finally {
      await s.stopClean(t)
    }
  }
})

test.serial('the server unmounts cleanly on SIGTERM', async t => {
  await srv.stopClean(t)
})
