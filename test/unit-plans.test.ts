/**
 * Worker-side read plans (src/fs/plans.ts): the bytes the patched addon decodes, and the epoch
 * wait that keeps a layer from closing a descriptor a plan still names. The addon's side runs
 * in every e2e read test; here the completion count is driven by hand to pin the ordering.
 */
import test from 'ava'
import { WorkerReads } from '../src/fs/plans'

function entries (buf: Buffer): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = []
  for (let i = 0; i < buf.readUInt32LE(0); i++) {
    const at = 16 + i * 16
    out.push([buf.readUInt32LE(at) + buf.readUInt32LE(at + 4) * 2 ** 32, buf.readInt32LE(at + 8), buf.readUInt32LE(at + 12)])
  }
  return out
}

test('a plan is a header and (offset, fd, length) entries; neighbouring runs of one file and runs of zeros merge', t => {
  const w = new WorkerReads(() => 0)
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
  const w = new WorkerReads(() => 0)
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
  const w = new WorkerReads(epoch => done[epoch])
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
  const w = new WorkerReads(epoch => done[epoch])
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
