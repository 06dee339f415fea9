/**
 * The order of a flush's writes and syncs (VMDK.md §9.1): data durable before the tables that
 * point at it, the primary grain tables durable before their redundant copies are written, the
 * redundant copies durable before the file is marked clean, and a COWD directory that names
 * only tables whose zeroing is already on the disk. The tests spy on shared functions
 * (DataSync.prototype.sync, writeExact) and run serially.
 */
import test from 'ava'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { createCowdLayer, createSparseLayer } from '../src/formats/create'
import { DataSync } from '../src/formats/extent'
import { Layer } from '../src/formats/layer'
import { countSyncs, traceIo } from './helpers/spy'
import { gtePosition, readU32, writeAt, writeU32 } from './helpers/vmdk'

const zeros = async (b: Buffer, o: number, _p: number, l: number): Promise<void> => { b.fill(0, o, o + l) }

async function inTmp (fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'redofs-test-'))
  try { await fn(dir) } finally { await rm(dir, { recursive: true, force: true }) }
}

const redoKinds: Array<[string, (file: string) => Promise<void>]> = [
  ['monolithicSparse', async file => await createSparseLayer(file, 4 * 1024 * 1024)],
  ['vmfsSparse (COWD)', async file => await createCowdLayer(file, 4 * 1024 * 1024, { hint: 'parent.vmdk', cid: 0x1234 })]
]

for (const [kind, create] of redoKinds) {
  test.serial(`a ${kind} layer: a flush after overwrites costs one fdatasync, after an allocation two`, async t => {
    await inTmp(async dir => {
      const file = path.join(dir, 'd.vmdk')
      await create(file)
      const layer = await Layer.open(file, { writable: true })
      const syncs = countSyncs()
      try {
        await layer.write(Buffer.alloc(128 * 1024, 1), 0, 0, 128 * 1024, zeros)
        await layer.flush()
        await layer.write(Buffer.alloc(4096, 2), 0, 8192, 4096, zeros)
        let before = syncs.n
        await layer.flush()
        t.is(syncs.n - before, 1, 'an overwrite in place: one fdatasync')
        before = syncs.n
        await layer.flush()
        t.is(syncs.n - before, 0, 'nothing dirty: none')
        await layer.write(Buffer.alloc(64 * 1024, 3), 0, 1024 * 1024, 64 * 1024, zeros)
        before = syncs.n
        await layer.flush()
        t.is(syncs.n - before, 2, 'an allocation: one sync for the data, one for the tables')
      } finally {
        syncs.restore()
        await layer.close()
      }
      const again = await Layer.open(file)
      try {
        const b = Buffer.alloc(64 * 1024)
        await again.read(b, 0, 1024 * 1024, b.length)
        t.true(b.every(x => x === 3), 'the allocated grain reads back after reopening')
        await again.read(b, 0, 0, b.length)
        t.is(b[8192], 2)
        t.is(b[8192 + 4096], 1)
      } finally {
        await again.close()
      }
    })
  })
}

test.serial('monolithicSparse: the primary tables are synced before the redundant copies are written, and those are synced before the file is marked clean', async t => {
  await inTmp(async dir => {
    const file = path.join(dir, 'd.vmdk')
    await createSparseLayer(file, 4 * 1024 * 1024)
    const primary = await gtePosition(file, 0)
    const redundant = await gtePosition(file, 0, true)
    const layer = await Layer.open(file, { writable: true })
    const io = traceIo()
    const named = (): string[] => io.events.map(e => e === 'sync' ? 'sync' : e === primary ? 'primary' : e === redundant ? 'redundant' : e === 0 ? 'header' : `write@${e}`)
    try {
      await layer.write(Buffer.alloc(64 * 1024, 7), 0, 0, 64 * 1024, zeros)
      io.events.length = 0
      await layer.flush()
      t.deepEqual(named(), ['sync', 'primary', 'sync', 'redundant'], 'data, primary, then the redundant copy')
      io.events.length = 0
      await layer.endSession()
      const ev = named()
      t.true(ev.includes('header'), `the session ends with the clean flag (${ev.join(', ')})`)
      t.is(ev[0], 'sync', `the redundant copy is synced before anything else, the clean header included (${ev.join(', ')})`)
    } finally {
      io.restore()
      await layer.close()
    }
    t.is(await readU32(file, primary), await readU32(file, redundant), 'both copies hold the entry')
    t.not(await readU32(file, primary), 0)
  })
})

test.serial('monolithicSparse: recovery after an unclean shutdown syncs the repaired redundant copies before it marks the file clean', async t => {
  await inTmp(async dir => {
    const file = path.join(dir, 'd.vmdk')
    await createSparseLayer(file, 4 * 1024 * 1024)
    const w = await Layer.open(file, { writable: true })
    await w.write(Buffer.alloc(64 * 1024, 5), 0, 0, 64 * 1024, zeros)
    await w.close()
    const primary = await gtePosition(file, 0)
    const redundant = await gtePosition(file, 0, true)
    const entry = await readU32(file, primary)
    await writeU32(file, redundant, 0) // the redundant copy lost its entry
    await writeAt(file, 72, Buffer.from([1])) // uncleanShutdown
    const io = traceIo()
    let ev: string[]
    try {
      const layer = await Layer.open(file, { writable: true })
      ev = io.events.map(e => e === 'sync' ? 'sync' : e === primary ? 'primary' : e === redundant ? 'redundant' : e === 0 ? 'header' : `write@${e}`)
      await layer.close()
    } finally {
      io.restore()
    }
    const r = ev.lastIndexOf('redundant')
    const h = ev.indexOf('header', r)
    t.true(r >= 0 && h > r, `recovery rewrote the redundant copy, then cleared the flag (${ev.join(', ')})`)
    t.true(ev.slice(r + 1, h).includes('sync'), `a sync between them (${ev.join(', ')})`)
    t.is(await readU32(file, redundant), entry, 'the redundant copy has its entry back')
  })
})

test.serial('vmfsSparse (COWD): freeSector covering new grains is on the disk before any table names them', async t => {
  // a tool that allocates at freeSector (VMware) must never find a durable table entry at or
  // above it: the header goes out with the data, before the sync that precedes the tables
  await inTmp(async dir => {
    const file = path.join(dir, 'd.vmdk')
    await createCowdLayer(file, 4 * 1024 * 1024, { hint: 'parent.vmdk', cid: 0x1234 })
    const delta = path.join(dir, 'd-delta.vmdk')
    const layer = await Layer.open(file, { writable: true })
    try {
      await layer.beginSession()
      const io = traceIo()
      try {
        await layer.write(Buffer.alloc(65536, 7), 0, 1024 * 1024, 65536, zeros)
        await layer.flush()
      } finally {
        io.restore()
      }
      const ev = io.events
      const header = ev.indexOf(0)
      const firstSync = ev.indexOf('sync')
      const table = ev.findIndex((e, i) => i > firstSync && typeof e === 'number' && e > 0)
      t.true(header >= 0 && header < firstSync, `the header is written before the first sync (${ev.join(', ')})`)
      t.true(table > firstSync && ev.indexOf('sync', table) > table, `the table after it, then a sync (${ev.join(', ')})`)
      const [free, grainSize, gdOffset] = [await readU32(delta, 28), await readU32(delta, 16), await readU32(delta, 20)]
      const last = (1024 * 1024 + 65536) / (grainSize * 512) - 1 // the write's last grain
      const gt = await readU32(delta, gdOffset * 512 + Math.floor(last / 4096) * 4)
      const entry = await readU32(delta, gt * 512 + (last % 4096) * 4)
      t.true(entry > 0 && free >= entry + grainSize, `freeSector ${free} lies past the write's last grain at ${entry}`)
    } finally {
      await layer.endSession()
      await layer.close()
    }
  })
})

test.serial('vmfsSparse (COWD): a grain table allocated while a flush runs is named in the directory only by the next flush', async t => {
  await inTmp(async dir => {
    const file = path.join(dir, 'd.vmdk')
    await createCowdLayer(file, 4 * 1024 * 1024, { hint: 'parent.vmdk', cid: 0x1234 })
    const delta = path.join(dir, 'd-delta.vmdk')
    const GD = 4 * 512 // the directory's sector (createCowdLayer); each table covers 2 MiB
    const layer = await Layer.open(file, { writable: true })
    const orig = DataSync.prototype.sync
    try {
      await layer.write(Buffer.alloc(4096, 1), 0, 0, 4096, zeros)
      let first = true
      DataSync.prototype.sync = async function (this: DataSync) {
        if (first) {
          first = false
          // while the flush's first sync runs: a write that needs table 1
          await layer.write(Buffer.alloc(4096, 2), 0, 2 * 1024 * 1024, 4096, zeros)
        }
        return await orig.call(this)
      }
      await layer.flush()
      DataSync.prototype.sync = orig
      t.false(first, 'the write ran inside the flush')
      t.not(await readU32(delta, GD), 0, 'table 0, allocated before the flush, is in the directory')
      t.is(await readU32(delta, GD + 4), 0, 'table 1 is not: the sync that covers its zeroing has not run')
      await layer.flush()
      t.not(await readU32(delta, GD + 4), 0, 'the next flush names it')
    } finally {
      DataSync.prototype.sync = orig
      await layer.close()
    }
    const again = await Layer.open(file)
    try {
      const b = Buffer.alloc(4096)
      await again.read(b, 0, 2 * 1024 * 1024, b.length)
      t.true(b.every(x => x === 2))
    } finally {
      await again.close()
    }
  })
})
