/**
 * Acceptance 1 (and the clean half of 7): for chains built with qemu-img/qemu-io, `redofs export
 * <top>@G` of every generation is byte-identical to `qemu-img convert -O raw` of the file of level
 * G; `redofs check` reports each clean chain clean; `redofs info --json` lists the chain.
 */
import test from 'ava'
import { open, readFile, stat, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { requireEnv } from './helpers/env'
import { applyQWrites, firstDifference, prng } from './helpers/model'
import { buildChain, convertToRaw, describe, mustRun, sameContent, sha256File, virtualSize, type LayerSpec, type QWrite } from './helpers/qemu'
import { cidValue, exportGen, infoJson, redofs } from './helpers/redofs'
import { openChain } from '../src/index'
import { tmpDirs } from './helpers/tmp'
import { layerInfo } from './helpers/vmdk'

requireEnv(test)
const tmp = tmpDirs(test)

const K = 1024
const M = 1024 * K
const G = 1024 * M

interface ChainCase {
  name: string
  size: number
  layers: LayerSpec[]
  /** Expected sha256 of the top's raw image, when known independently of qemu. */
  topSha256?: string
  /** Assert the exported file is sparse (allocated bytes well below capacity). */
  checkSparse?: boolean
  /** Expected top image, independent of qemu: these writes applied to zeros. */
  topModel?: QWrite[]
}

const cases: ChainCase[] = [
  {
    // VMDK.md §7.1 make-chain.sh, verbatim
    name: 'make-chain (§7.1): monolithicSparse base + 2 children',
    size: 16 * M,
    topSha256: 'c7a5b96e15265d8b61bb24525c5ae93051e13261f8634bf1c2e61dbbacb84f14',
    layers: [
      { name: 'base.vmdk', writes: [{ pattern: 0xab, offset: 0, length: 64 * K }, { pattern: 0xcd, offset: 1 * M, length: 4 * K }, { pattern: 0xef, offset: 15 * M, length: 1 * M }] },
      { name: 'c1.vmdk', writes: [{ pattern: 0x11, offset: 4 * K, length: 4 * K }, { pattern: 0x12, offset: 2 * M, length: 64 * K }, { pattern: 'zero', offset: 15 * M, length: 64 * K }] },
      { name: 'c2.vmdk', writes: [{ pattern: 0x22, offset: 2129920, length: 512 }, { pattern: 0x23, offset: 8 * M, length: 128 * K }, { pattern: 0x24, offset: 16773632, length: 512 }] }
    ]
  },
  {
    // capacity not a multiple of the grain: the last grain is partial
    name: 'monolithicFlat base + 3 children, unaligned overlapping writes',
    size: 24 * M + 1536,
    layers: [
      {
        name: 'disk.vmdk',
        format: 'monolithicFlat',
        writes: [
          { pattern: 0x10, offset: 0, length: 3 * M + 333 },
          { pattern: 0x11, offset: 10 * M - 7, length: 131072 + 14 },
          { pattern: 0x12, offset: 24 * M + 1536 - 4000, length: 4000 }
        ]
      },
      {
        name: 'disk-000001.vmdk',
        writes: [
          { pattern: 0x20, offset: 65536 - 100, length: 200 }, // across a grain boundary
          { pattern: 0x21, offset: 1 * M + 1, length: 3 * 65536 }, // three grains, unaligned
          { pattern: 'zero', offset: 10 * M, length: 65536 }, // zeros masking the base
          { pattern: 0x22, offset: 20 * M + 12345, length: 777 } // where the base is empty
        ]
      },
      {
        name: 'disk-000002.vmdk',
        writes: [
          { pattern: 0x30, offset: 65536 - 50, length: 100 }, // inside c1's grains
          { pattern: 0x31, offset: 1 * M + 65536 + 3, length: 65536 }, // overlaps c1 write, spans 2 grains
          { pattern: 0x32, offset: 24 * M + 1536 - 512, length: 512 }, // last sector, partial grain
          { pattern: 0x33, offset: 5 * M + 511, length: 2 } // a sector boundary inside a grain
        ]
      },
      {
        name: 'disk-000003.vmdk',
        writes: [
          { pattern: 0x40, offset: 0, length: 1 }, // first byte
          { pattern: 0x41, offset: 10 * M + 4096, length: 100000 }, // over c1's zero grain and base data
          { pattern: 0x42, offset: 65536 - 25, length: 50 }
        ]
      }
    ]
  },
  {
    name: 'twoGbMaxExtentSparse 6 GiB base, data past 4 GiB, monolithicSparse + split children',
    size: 6 * G,
    checkSparse: true,
    layers: [
      {
        name: 'big.vmdk',
        format: 'twoGbMaxExtentSparse',
        writes: [
          { pattern: 0x50, offset: 0, length: 65536 },
          { pattern: 0x51, offset: 2147450880, length: 65536 }, // across the 2 GiB extent boundary
          { pattern: 0x52, offset: 4 * G - 1000, length: 3000 }, // across the 4 GiB extent boundary
          { pattern: 0x53, offset: 5 * G + 12345, length: 70000 }, // past 4 GiB
          { pattern: 0x54, offset: 6 * G - 512, length: 512 } // last sector
        ]
      },
      {
        name: 'big-000001.vmdk',
        writes: [
          { pattern: 0x60, offset: 2 * G - 300, length: 600 }, // unaligned, across the base's extent boundary
          { pattern: 0x61, offset: 4 * G + 65536 - 10, length: 20 },
          { pattern: 0x62, offset: 5 * G + 12345 + 69000, length: 5000 } // overlaps the base's tail
        ]
      },
      {
        name: 'big-000002.vmdk',
        format: 'twoGbMaxExtentSparse',
        writes: [
          { pattern: 0x70, offset: 2 * G - 1, length: 2 }, // the byte pair straddling 2 GiB
          { pattern: 0x71, offset: 4 * G - 65536, length: 131072 }, // two grains across 4 GiB
          { pattern: 'zero', offset: 6 * G - 65536, length: 65536 } // zeros the base's last sector
        ]
      }
    ]
  },
  {
    // VMDK.md §7.2 zeroed-grain vector, plus a child that COWs from a zeroed grain
    name: 'zeroed-grain (GTE=1) layers: zeros mask the parent, COW copies zeros',
    size: 10 * M,
    layers: [
      { name: 'zg.vmdk', options: 'zeroed_grain=on', writes: [{ pattern: 0xee, offset: 0, length: 256 * K }] },
      { name: 'zg-000001.vmdk', options: 'zeroed_grain=on', writes: [{ pattern: 'zero', offset: 64 * K, length: 128 * K }] },
      { name: 'zg-000002.vmdk', writes: [{ pattern: 0x99, offset: 64 * K + 100, length: 10 }] }
    ],
    topModel: [
      { pattern: 0xee, offset: 0, length: 256 * K },
      { pattern: 'zero', offset: 64 * K, length: 128 * K },
      { pattern: 0x99, offset: 64 * K + 100, length: 10 }
    ]
  },
  {
    name: 'streamOptimized base (qemu layout) + 2 children',
    size: 16 * M,
    layers: [
      {
        name: 'so.vmdk',
        format: 'streamOptimized',
        writes: [
          { pattern: 0x61, offset: 100, length: 1000 },
          { pattern: 0x62, offset: 1 * M, length: 200 * K },
          { pattern: 0x63, offset: 16 * M - 1216, length: 1216 }
        ]
      },
      { name: 'so-000001.vmdk', writes: [{ pattern: 0x71, offset: 500, length: 100 }, { pattern: 0x72, offset: 1 * M + 190 * K, length: 20 * K }] },
      { name: 'so-000002.vmdk', writes: [{ pattern: 'zero', offset: 16 * M - 65536, length: 65536 }] }
    ],
    topModel: [
      { pattern: 0x61, offset: 100, length: 1000 },
      { pattern: 0x62, offset: 1 * M, length: 200 * K },
      { pattern: 0x63, offset: 16 * M - 1216, length: 1216 },
      { pattern: 0x71, offset: 500, length: 100 },
      { pattern: 0x72, offset: 1 * M + 190 * K, length: 20 * K },
      { pattern: 'zero', offset: 16 * M - 65536, length: 65536 }
    ]
  },
  {
    name: 'twoGbMaxExtentFlat base across 2 GiB + 2 children',
    size: 2 * G + 8 * M,
    checkSparse: true,
    layers: [
      {
        name: 'flat.vmdk',
        format: 'twoGbMaxExtentFlat',
        writes: [
          { pattern: 0x80, offset: 2147450880, length: 65536 },
          { pattern: 0x81, offset: 2 * G + 8 * M - 512, length: 512 },
          { pattern: 0x82, offset: 100, length: 100 }
        ]
      },
      {
        name: 'flat-000001.vmdk',
        writes: [{ pattern: 0x90, offset: 2 * G - 4096 - 7, length: 8192 + 14 }]
      },
      {
        name: 'flat-000002.vmdk',
        format: 'twoGbMaxExtentSparse',
        writes: [{ pattern: 0xa0, offset: 2 * G + 1, length: 3 }, { pattern: 0xa1, offset: 50, length: 100 }]
      }
    ]
  }
]

interface Built {
  dir: string
  files: string[]
  out: string
}

const built = new Map<string, Promise<Built>>()
function build (c: ChainCase): Promise<Built> {
  let p = built.get(c.name)
  if (!p) {
    p = (async () => {
      const root = await tmp()
      const dir = path.join(root, 'store', 'vm1')
      const out = path.join(root, 'out')
      await mustRun('mkdir', ['-p', dir, out])
      const files = await buildChain(dir, c.size, c.layers)
      return { dir, files, out }
    })()
    built.set(c.name, p)
  }
  return p
}

for (const c of cases) {
  for (let g = 0; g < c.layers.length; g++) {
    test(`${c.name}: export @${g} equals qemu-img convert of ${c.layers[g].name}`, async t => {
      const b = await build(c)
      const top = b.files[b.files.length - 1]
      const ref = path.join(b.out, `ref${g}.raw`)
      const got = path.join(b.out, `got${g}.raw`)
      await convertToRaw(b.files[g], ref)
      const r = await exportGen(top, g, got)
      t.is(r.code, 0, describe(r))
      if (r.code !== 0) return
      const st = await stat(got)
      t.is(st.size, c.size, 'export is exactly the capacity')
      const cmp = await sameContent(got, ref)
      t.true(cmp.same, cmp.detail)
      if (c.checkSparse) t.true(st.blocks * 512 < 256 * M, `export should be sparse, has ${st.blocks * 512} bytes allocated`)
    })
  }

  test(`${c.name}: export without @G is the top`, async t => {
    const b = await build(c)
    const top = b.files[b.files.length - 1]
    const ref = path.join(b.out, 'ref-top.raw')
    const got = path.join(b.out, 'got-top.raw')
    await convertToRaw(top, ref)
    const r = await exportGen(top, undefined, got)
    t.is(r.code, 0, describe(r))
    if (r.code !== 0) return
    const cmp = await sameContent(got, ref)
    t.true(cmp.same, cmp.detail)
    if (c.topSha256 !== undefined) {
      t.is(await sha256File(ref), c.topSha256, 'qemu oracle matches the known hash')
      t.is(await sha256File(got), c.topSha256, 'redofs export matches the known hash')
    }
    if (c.topModel !== undefined) {
      const model = Buffer.alloc(c.size)
      applyQWrites(model, c.topModel)
      const d = firstDifference(await readFile(got), model)
      t.is(d, -1, `redofs export differs from the expected image at byte ${d}`)
    }
  })

  test(`${c.name}: redofs check reports clean`, async t => {
    const b = await build(c)
    const r = await redofs(['check', b.files[b.files.length - 1]])
    t.is(r.code, 0, describe(r))
    t.regex(r.stdout, /\bclean\b/, describe(r))
  })

  test(`${c.name}: info --json lists every generation with its CID links`, async t => {
    const b = await build(c)
    const top = b.files[b.files.length - 1]
    const info = await infoJson(top)
    t.is(info.layers.length, b.files.length, JSON.stringify(info))
    const capacity = await virtualSize(top)
    for (let g = 0; g < b.files.length; g++) {
      const l = info.layers.find(x => x.generation === g)
      t.truthy(l, `generation ${g} missing in ${JSON.stringify(info)}`)
      if (!l) continue
      t.is(path.basename(l.file), path.basename(b.files[g]))
      t.is(l.capacity, capacity, `capacity of generation ${g}`)
      const d = await layerInfo(b.files[g])
      t.is(cidValue(l.cid), d.cid, `CID of generation ${g}`)
      if (g > 0) t.is(cidValue(l.parentCID), d.parentCID, `parentCID of generation ${g}`)
    }
  })
}

test('export @G past the top generation is refused with a one-line error', async t => {
  const b = await build(cases[0])
  const top = b.files[b.files.length - 1]
  const r = await exportGen(top, b.files.length, path.join(b.out, 'nope.raw'))
  t.is(r.code, 1, describe(r))
  t.false(r.stderr.trim().includes('\n'), describe(r))
  t.regex(r.stderr, /^redofs: /, describe(r))
})

test('random reads through the engine API of every generation match qemu-img convert (and stop at the capacity)', async t => {
  const c = cases[1] // monolithicFlat + 3 children, capacity not grain-aligned
  const b = await build(c)
  const refs: Buffer[] = []
  for (let g = 0; g < b.files.length; g++) {
    const p = path.join(b.out, `api-ref${g}.raw`)
    await convertToRaw(b.files[g], p)
    refs.push(await readFile(p))
  }
  const rnd = prng(7)
  const chain = await openChain(b.files[b.files.length - 1], {})
  try {
    t.is(chain.generations, b.files.length)
    for (let g = 0; g < b.files.length; g++) {
      const v = chain.view(g)
      t.is(v.size, c.size)
      for (let i = 0; i < 150; i++) {
        const pos = i === 0 ? c.size - 100 : Math.floor(rnd() * c.size)
        const len = i === 0 ? 1000 : 1 + Math.floor(rnd() * (i % 10 === 0 ? 3 * M : 140 * K))
        const buf = Buffer.alloc(len, 0x5c)
        const n = await v.read(buf, 0, pos, len)
        const want = Math.min(len, c.size - pos)
        if (typeof n === 'number') t.is(n, want, `read count at ${pos}+${len}`)
        if (!buf.subarray(0, want).equals(refs[g].subarray(pos, pos + want))) {
          t.fail(`generation ${g}: read at ${pos} length ${len} differs from qemu`)
          return
        }
      }
      const past = Buffer.alloc(10)
      const n = await v.read(past, 0, c.size, 10)
      if (typeof n === 'number') t.is(n, 0, 'a read at the capacity returns 0 bytes')
    }
    // a generation a discard has just taken away (getattr of its file while the discard runs)
    // counts what is left instead of failing
    const top = b.files.length - 1
    t.is(chain.allocatedBytes(top + 2), chain.allocatedBytes(top))
  } finally {
    await chain.close()
  }
})

test('info (human) prints one line per generation naming each file', async t => {
  const b = await build(cases[1])
  const r = await redofs(['info', b.files[b.files.length - 1]])
  t.is(r.code, 0, describe(r))
  const lines = r.stdout.split('\n').filter(l => l.trim() !== '')
  t.is(lines.length, b.files.length, r.stdout)
  for (const f of b.files) t.true(lines.some(l => l.includes(path.basename(f))), `${path.basename(f)} listed\n${r.stdout}`)
})

test('export over an existing, larger file leaves exactly the generation (truncated, no stale bytes)', async t => {
  const b = await build(cases[0])
  const top = b.files[b.files.length - 1]
  const out = path.join(b.out, 'reused.raw')
  await writeFile(out, Buffer.alloc(20 * M, 0x7f))
  const ref = path.join(b.out, 'reused-ref.raw')
  await convertToRaw(b.files[1], ref)
  const r = await exportGen(top, 1, out)
  t.is(r.code, 0, describe(r))
  const cmp = await sameContent(out, ref)
  t.true(cmp.same, cmp.detail)
})

test('a descriptor file qemu rewrote in place with a shorter CID (old bytes left after its NUL) opens, exports and takes writes', async t => {
  // qemu's vmdk driver rewrites a descriptor file in place when it changes the CID; a CID with
  // fewer hex digits than the old one leaves the old text's last bytes after the NUL (1 in 16
  // CIDs). qemu and VMware read up to the NUL, so must we.
  const root = await tmp()
  const dir = path.join(root, 'store', 'vm1')
  await mustRun('mkdir', ['-p', dir])
  const files = await buildChain(dir, 3 * G, [
    { name: 'tail.vmdk', format: 'twoGbMaxExtentSparse', writes: [{ pattern: 0x31, offset: 2 * G - 4096, length: 8192 }] },
    { name: 'tail-000001.vmdk', format: 'twoGbMaxExtentSparse', writes: [{ pattern: 0x32, offset: 2 * G - 100, length: 50 }] }
  ])
  const top = files[1]
  const text = (await readFile(top, 'latin1')).replace(/\0[\s\S]*$/, '')
  const short = text.replace(/^CID=[0-9a-f]+$/m, 'CID=7')
  t.not(short, text, 'the CID line was rewritten')
  const padded = Buffer.alloc(512)
  padded.write(short + '\0' + text.slice(short.length + 1), 0, 'latin1') // what qemu leaves behind
  t.true(padded.indexOf(0) < padded.lastIndexOf(0x0a), 'text follows the NUL, as in the file qemu wrote')
  await writeFile(top, padded)

  const ref = path.join(root, 'ref.raw')
  await convertToRaw(top, ref) // qemu itself reads the file
  const got = path.join(root, 'got.raw')
  const r = await exportGen(top, 1, got)
  t.is(r.code, 0, describe(r))
  const cmp = await sameContent(got, ref)
  t.true(cmp.same, cmp.detail)

  const chain = await openChain(top, { writable: true })
  try {
    await chain.view(1).write(Buffer.alloc(300, 0x33), 0, 2 * G - 150, 300)
  } finally {
    await chain.close()
  }
  const after = path.join(root, 'after.raw')
  await convertToRaw(top, after)
  const back = Buffer.alloc(300)
  const fh = await open(after, 'r')
  try { await fh.read(back, 0, 300, 2 * G - 150) } finally { await fh.close() }
  t.is(firstDifference(back, Buffer.alloc(300, 0x33)), -1, 'qemu reads the engine write back')
})
