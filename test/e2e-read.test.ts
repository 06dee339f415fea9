/**
 * E2E acceptance 1 (SPEC §2): every generation file of a qemu-made chain reads exactly like
 * `qemu-img convert -O raw` of that chain level, also for odd offsets and lengths.
 */
import test from 'ava'
import { readFile, stat } from 'node:fs/promises'
import path from 'node:path'
import { ddRange, e2e, fuseWorkers, mountInfo, preadInChild, requireFuse, sh, type Server } from './helpers/mount'
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

/** O_DIRECT read of a whole file in a child: every byte is a request to the server. */
async function directRead (file: string): Promise<string> {
  const r = await sh('set -o pipefail; dd if="$1" bs=1M iflag=direct status=none | sha256sum', [file])
  if (r.code !== 0) throw new Error(`dd iflag=direct ${file}: ${describe(r)}`)
  return r.stdout.split(' ')[0]
}

test.serial('image reads are done by the FUSE worker threads themselves (they read the backing files); with --no-worker-reads they are not; both read what qemu-img convert reads', async t => {
  /** Bytes the workers read per file: generation 0, 1, then the live file. */
  const check = async (s: Server, label: string): Promise<number[]> => {
    const pid = s.proc.pid as number
    t.true((await fuseWorkers(pid)).threads > 0, `${label}: the server has threads named redofs-fuse (the patched addon's workers)`)
    const out: number[] = []
    for (let g = 0; g <= 2; g++) {
      const before = (await fuseWorkers(pid)).rchar
      const raw = (await sh('sha256sum "$1"', [raws[g]])).stdout.split(' ')[0]
      t.is(await directRead(genFile(g).replace(srv.mnt, s.mnt)), raw, `${label}: generation ${g} reads like qemu-img convert`)
      out.push((await fuseWorkers(pid)).rchar - before)
    }
    return out
  }
  // the workers read the data the layers hold (zeros they fill in: ~1.3 MiB per file here), or
  // only the requests' headers (~100 bytes per request of at most 128 KiB: ~13 KB per file)
  const planned = await check(srv, 'default')
  for (let g = 0; g <= 2; g++) t.true(planned[g] >= M, `default: the FUSE workers read ${planned[g]} bytes while generation ${g} (${SIZE} bytes) was read through the mount`)
  const root = await ctx.tmp()
  const c = await storeChain(root, SIZE, [{ writes: FOUR_LEVELS[0] }, { writes: FOUR_LEVELS[1] }, { writes: FOUR_LEVELS[2] }])
  // the option's old name, kept as an alias of --no-worker-io
  const s = await ctx.mount(c.store, path.join(root, 'mnt'), ['--no-worker-reads'])
  try {
    const ordinary = await check(s, '--no-worker-reads')
    for (let g = 0; g <= 2; g++) t.true(ordinary[g] < M / 8, `--no-worker-reads: the FUSE workers read ${ordinary[g]} bytes (request headers only) while generation ${g} was read`)
  } finally {
    await s.stopClean(t)
  }
})

test.serial('a redo log cut short under the mount: the worker-side read fails over to JS, which answers EIO naming the file; the rest still reads', async t => {
  const root = await ctx.tmp()
  const c = await storeChain(root, SIZE, [{ writes: FOUR_LEVELS[0] }, { writes: FOUR_LEVELS[1] }, { writes: FOUR_LEVELS[2] }])
  const top = c.files[c.files.length - 1]
  const m = await sh('qemu-img map --output=json -f vmdk "$1"', [top])
  t.is(m.code, 0, describe(m))
  const map = JSON.parse(m.stdout) as Array<{ start: number, length: number, depth: number, data: boolean, offset?: number }>
  const own = map.find(e => e.depth === 0 && e.data && e.offset !== undefined && e.length >= 4096)
  const lower = map.find(e => e.depth > 0 && e.data && e.length >= 4096)
  if (own === undefined || lower === undefined) throw new Error(`test chain lacks the ranges this test needs: ${m.stdout}`)
  const s = await ctx.mount(c.store, path.join(root, 'mnt'), [], { DEBUG: 'redofs:fs' })
  try {
    // the top's data from this grain on is gone; its grain table still points there
    await sh('truncate -s "$1" "$2"', [String(own.offset), top])
    const img = s.img('vm1', 'disk')
    const bad = await sh('dd if="$1" of=/dev/null bs=4096 skip="$2" count=1 iflag=direct,skip_bytes status=none', [img, String(own.start)])
    t.not(bad.code, 0, 'the cut range does not read (no zeros, no stale bytes)')
    t.regex(bad.stderr, /Input\/output error/, describe(bad))
    t.true(s.stderr.includes('a worker-side read of 4096 bytes at'), `the worker tried it first (stderr: ${s.stderr.slice(-2000)})`)
    t.true(s.stderr.includes(`${path.basename(top)}: short read`), `the server says which file is short (stderr: ${s.stderr.slice(-2000)})`)
    const got = await ddRange(img, lower.start, 4096, 4096)
    const want = await ddRange(raws[2], lower.start, 4096, 4096)
    t.is(got.r.code, 0, describe(got.r))
    t.is(got.sha, want.sha, 'a range the layers below provide still reads right')
  } finally {
    await s.stopClean(t)
  }
})

test.serial('the server unmounts cleanly on SIGTERM', async t => {
  await srv.stopClean(t)
})
