/**
 * Worker-side read and write plans (src/fs/plans.ts): the bytes the patched addon decodes, the
 * epoch wait that keeps a layer from closing a descriptor a plan still names, and a flush that
 * waits for planned overwrites before it syncs. The addon's side runs in the e2e read and
 * worker-write tests; here the completion count is driven by hand to pin the ordering.
 */
import test from 'ava'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { createCowdLayer, createFlatLayer, createSparseLayer } from '../src/formats/create'
import { DataSync, setPlannedIo } from '../src/formats/extent'
import { countSyncs } from './helpers/spy'
import { Layer } from '../src/formats/layer'
import { WorkerIo } from '../src/fs/plans'

function entries (buf: Buffer): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = []
  for (let i = 0; i < buf.readUInt32LE(0); i++) {
    const at = 16 + i * 16
    out.push([buf.readUInt32LE(at) + buf.readUInt32LE(at + 4) * 2 ** 32, buf.readInt32LE(at + 8), buf.readUInt32LE(at + 12)])
  }
  return out
}

test('a plan is a header and (offset, fd, length) entries; neighbouring runs of one file and runs of zeros merge', t => {
  const w = new WorkerIo(() => 0)
  const buf = Buffer.alloc(4096, 0xee)
  const ok = w.plan(buf, 4096, p => {
    t.true(p.data(7, 5 * 2 ** 32 + 100, 10))
    t.true(p.data(7, 5 * 2 ** 32 + 110, 20)) // continues the previous run
    t.true(p.zero(3))
    t.true(p.zero(4)) // merges
    t.true(p.data(7, 0, 5)) // same fd, not contiguous
    t.true(p.data(8, 5, 6))
    return 10 + 20 + 3 + 4 + 5 + 6
  })
  t.true(ok)
  t.is(buf.readUInt32LE(4), 0, 'epoch 0')
  t.deepEqual(entries(buf), [[5 * 2 ** 32 + 100, 7, 30], [0, -1, 7], [0, 7, 5], [5, 8, 6]])
})

test('a plan is refused when it does not add up, names no descriptor, or outgrows the buffer', t => {
  const w = new WorkerIo(() => 0)
  t.false(w.plan(Buffer.alloc(4096), 4096, p => { p.zero(10); return 11 }), 'entries cover 10 bytes, 11 promised')
  t.false(w.plan(Buffer.alloc(4096), 4096, p => p.data(-1, 0, 10) ? 10 : -1), 'a closed descriptor (-1)')
  t.false(w.plan(Buffer.alloc(4096), 4096, () => -1), 'the disk said no')
  t.false(w.plan(Buffer.alloc(16), 16, p => { p.zero(16); return 16 }), 'too small for one entry')
  // 64 bytes hold the header and three entries
  t.false(w.plan(Buffer.alloc(64), 64, p => [0, 1, 2, 3].every(i => p.data(i, 0, 1)) ? 4 : -1), 'a fourth entry does not fit')
  t.true(w.plan(Buffer.alloc(64), 64, p => [0, 1, 2].every(i => p.data(i, 0, 1)) ? 3 : -1), 'three do')
})

test('drain() waits for every plan issued before it, and not for those issued after', async t => {
  const done = [0, 0]
  const w = new WorkerIo(epoch => done[epoch])
  const issue = (): number => {
    const buf = Buffer.alloc(64)
    t.true(w.plan(buf, 64, p => p.zero(8) ? 8 : -1))
    return buf.readUInt32LE(4)
  }
  t.is(issue(), 0)
  t.is(issue(), 0)
  let drained = false
  const d = w.drain().then(() => { drained = true })
  t.is(issue(), 1, 'plans after the drain started belong to the next epoch')
  await new Promise(resolve => setTimeout(resolve, 20))
  t.false(drained, 'two plans of epoch 0 outstanding')
  done[0] = 1
  await new Promise(resolve => setTimeout(resolve, 20))
  t.false(drained, 'one still outstanding')
  done[0] = 2
  await d
  t.true(drained, 'the epoch-1 plan did not hold it up')
  // the next drain waits for epoch 1, and epoch 0 takes new plans again
  let second = false
  const d2 = w.drain().then(() => { second = true })
  t.is(issue(), 0)
  await new Promise(resolve => setTimeout(resolve, 20))
  t.false(second)
  done[1] = 1
  await d2
  t.true(second)
})

test('the addon counts for the whole process: a second mount starts from what an earlier one left', async t => {
  const done = [5, 3] // plans of an earlier mount in this process
  const w = new WorkerIo(epoch => done[epoch])
  await w.drain() // nothing issued by this one: returns at once
  const buf = Buffer.alloc(64)
  t.true(w.plan(buf, 64, p => p.zero(8) ? 8 : -1))
  const e = buf.readUInt32LE(4)
  let drained = false
  const d = w.drain().then(() => { drained = true })
  await new Promise(resolve => setTimeout(resolve, 20))
  t.false(drained, 'its own plan is outstanding')
  done[e]++
  await d
  t.true(drained)
})

test('write plans: a slot holds (state 1, count, epoch) and descriptor runs only; a busy slot is skipped; a table of the wrong size is not used', t => {
  const table = new ArrayBuffer(256 * 272)
  const w = new WorkerIo(() => 0, table)
  const view = Buffer.from(table)
  t.is(w.planWrite(20, p => (p.data(9, 4096, 8) && p.data(9, 4104, 12)) ? 20 : -1), 0, 'the first slot')
  t.is(view.readUInt32LE(0), 1, 'filled')
  t.is(view.readUInt32LE(4), 1, 'one entry: the two runs are contiguous')
  t.is(view.readUInt32LE(8), 0, 'epoch 0')
  t.deepEqual([view.readUInt32LE(16), view.readInt32LE(24), view.readUInt32LE(28)], [4096, 9, 20])
  t.is(w.planWrite(8, p => p.zero(8) ? 8 : -1), -1, 'zeros mean nothing in a write')
  t.is(w.planWrite(8, p => p.data(3, 0, 4) ? 4 : -1), -1, 'a plan must cover the whole write')
  t.is(w.planWrite(17 * 2, p => Array.from({ length: 17 }, (_, i) => p.data(3, i * 10, 2)).every(Boolean) ? 34 : -1), -1, 'at most 16 entries')
  // slot 0 still filled (no worker took it): the next plans go elsewhere, until a worker frees it
  const slots = new Set<number>()
  for (let i = 0; i < 255; i++) slots.add(w.planWrite(4, p => p.data(3, 0, 4) ? 4 : -1))
  t.false(slots.has(0))
  t.false(slots.has(-1))
  t.is(slots.size, 255)
  t.is(w.planWrite(4, p => p.data(3, 0, 4) ? 4 : -1), -1, 'every slot busy: the write is done the ordinary way')
  view.writeUInt32LE(0, 7 * 272) // a worker copied slot 7's plan out
  t.is(w.planWrite(4, p => p.data(3, 0, 4) ? 4 : -1), 7)
  t.is(new WorkerIo(() => 0, new ArrayBuffer(100)).planWrite(4, p => p.data(3, 0, 4) ? 4 : -1), -1)
  t.is(new WorkerIo(() => 0).planWrite(4, p => p.data(3, 0, 4) ? 4 : -1), -1, 'no table (patch level 4)')
})

test('drain() waits for write plans too', async t => {
  const done = [0, 0]
  const w = new WorkerIo(epoch => done[epoch], new ArrayBuffer(256 * 272))
  t.is(w.planWrite(4, p => p.data(3, 0, 4) ? 4 : -1), 0)
  let drained = false
  const d = w.drain().then(() => { drained = true })
  await new Promise(resolve => setTimeout(resolve, 20))
  t.false(drained, 'the planned write is outstanding')
  done[0] = 1
  await d
  t.true(drained)
})

// The layer tests below replace process-wide hooks (setPlannedIo, DataSync.prototype.sync):
// serial, so that no two of them run at once.
const redoKinds: Array<[string, (file: string) => Promise<void>]> = [
  ['monolithicSparse', async file => await createSparseLayer(file, 4 * 1024 * 1024)],
  ['vmfsSparse (COWD)', async file => await createCowdLayer(file, 4 * 1024 * 1024, { hint: 'parent.vmdk', cid: 0x1234 })]
]

for (const [kind, create] of redoKinds) {
test.serial(`a ${kind} layer plans overwrites only of allocated grains and only in a started session; its flush waits for the planned writes before it syncs`, async t => {
  const dir = await mkdtemp(path.join(tmpdir(), 'redofs-test-'))
  try {
    const file = path.join(dir, 'd.vmdk')
    await create(file)
    const first = await Layer.open(file, { writable: true })
    await first.write(Buffer.alloc(128 * 1024, 1), 0, 0, 128 * 1024, async (b, o, _p, l) => { b.fill(0, o, o + l) })
    await first.close()
    const layer = await Layer.open(file, { writable: true })
    const runs: Array<[number, number, number]> = []
    const plan = { data: (fd: number, pos: number, len: number) => { runs.push([fd, pos, len]); return true }, zero: () => false }
    t.false(layer.planWrite(plan, 4096, 8192), 'allocated, but no write session yet (its first change must reach the disk first)')
    t.is(runs.length, 0)
    await layer.write(Buffer.alloc(64 * 1024, 3), 0, 256 * 1024, 64 * 1024, async (b, o, _p, l) => { b.fill(0, o, o + l) })
    t.false(layer.planWrite(plan, 1024 * 1024, 4096), 'in the session, but nothing allocated there')
    t.true(layer.planWrite(plan, 4096, 8192), 'inside the grains just written')
    t.is(runs.length, 1)
    t.is(runs[0][2], 8192)
    t.false(layer.planWrite(plan, 120 * 1024, 16 * 1024), 'runs past the allocated grains')
    // the flush must wait for the planned write's worker
    let release!: () => void
    let drains = 0
    setPlannedIo(async () => { drains++; await new Promise<void>(resolve => { release = resolve }) })
    try {
      let flushed = false
      const f = layer.flush().then(() => { flushed = true })
      await new Promise(resolve => setTimeout(resolve, 50))
      t.is(drains, 1, 'the flush asked for the planned writes to be done')
      t.false(flushed, 'and does not go on (to the sync) before they are')
      release()
      await f
      t.true(flushed)
      setPlannedIo(async () => { drains++ })
      await layer.flush()
      t.is(drains, 1, 'no planned write since: the next flush does not wait')
      // a write planned while a flush waits for the earlier ones may land after that flush's
      // sync: the next flush must wait for it and sync again
      const syncs = countSyncs()
      try {
        t.true(layer.planWrite(plan, 4096, 8192))
        let hold!: () => void
        let entered!: () => void
        const waiting = new Promise<void>(resolve => { entered = resolve })
        setPlannedIo(async () => { entered(); await new Promise<void>(resolve => { hold = resolve }) })
        const a = layer.flush()
        await waiting
        t.true(layer.planWrite(plan, 16384, 4096), 'planned while the flush waits')
        hold()
        await a
        const before = syncs.n
        let waited = false
        setPlannedIo(async () => { waited = true })
        await layer.flush()
        t.true(waited, 'the next flush waits for the write planned during the last one')
        t.true(syncs.n > before, 'and syncs again')
      } finally {
        syncs.restore()
      }
      await layer.endSession()
      t.false(layer.planWrite(plan, 4096, 8192), 'the session ended: the next write starts a new one first')
    } finally {
      setPlannedIo(undefined)
      await layer.close()
    }
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})
}

test.serial('a flat layer: overwrites plan inside the file; two flushes at once both return only after the sync that covers them', async t => {
  const dir = await mkdtemp(path.join(tmpdir(), 'redofs-test-'))
  const orig = DataSync.prototype.sync
  try {
    const file = path.join(dir, 'f.vmdk')
    await createFlatLayer(file, 1024 * 1024)
    const layer = await Layer.open(file, { writable: true })
    try {
      await layer.write(Buffer.alloc(4096, 2), 0, 0, 4096, async () => {})
      const plan = { data: () => true, zero: () => false }
      t.true(layer.planWrite(plan, 8192, 4096), 'the flat file has room for it')
      t.false(layer.planWrite(plan, 1024 * 1024 - 4096, 8192), 'not past the capacity')
      let synced = false
      DataSync.prototype.sync = async function (this: DataSync) {
        await new Promise(resolve => setTimeout(resolve, 50))
        await orig.call(this)
        synced = true
      }
      const a = layer.flush()
      await new Promise(resolve => setTimeout(resolve, 10)) // the first flush is in its sync now
      const b = layer.flush().then(() => synced)
      await a
      t.true(await b, 'the second flush found the flag taken by the first and still waited for its sync')
    } finally {
      DataSync.prototype.sync = orig
      await layer.close()
    }
  } finally {
    DataSync.prototype.sync = orig
    await rm(dir, { recursive: true, force: true })
  }
})
