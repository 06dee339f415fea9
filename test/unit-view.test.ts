import test from 'ava'
import { mapOf, overlay, type Segment } from '../src/chain/view'

test('overlay paints runs over the layers below and merges neighbours', t => {
  const base: Segment[] = [{ start: 0, end: 100, layer: 0, state: 'data' }]
  const one = overlay(base, [{ start: 10, length: 20, state: 'data' }, { start: 50, length: 10, state: 'zero' }], 1)
  t.deepEqual(one, [
    { start: 0, end: 10, layer: 0, state: 'data' },
    { start: 10, end: 30, layer: 1, state: 'data' },
    { start: 30, end: 50, layer: 0, state: 'data' },
    { start: 50, end: 60, layer: 1, state: 'zero' },
    { start: 60, end: 100, layer: 0, state: 'data' }
  ])
  const two = overlay(one, [{ start: 0, length: 55, state: 'data' }, { start: 120, length: 8, state: 'data' }], 2)
  t.deepEqual(two, [
    { start: 0, end: 55, layer: 2, state: 'data' },
    { start: 55, end: 60, layer: 1, state: 'zero' },
    { start: 60, end: 100, layer: 0, state: 'data' },
    { start: 120, end: 128, layer: 2, state: 'data' }
  ])
})

test('overlay on an empty chain keeps the runs and leaves gaps', t => {
  t.deepEqual(overlay([], [{ start: 8, length: 8, state: 'data' }], 0), [{ start: 8, end: 16, layer: 0, state: 'data' }])
})

test('mapOf covers the whole capacity, unallocated ranges as zero with generation -1', t => {
  const m = mapOf([{ start: 10, end: 20, layer: 1, state: 'data' }, { start: 20, end: 30, layer: 2, state: 'zero' }], 40)
  t.deepEqual(m, [
    { start: 0, length: 10, generation: -1, data: false, zero: true },
    { start: 10, length: 10, generation: 1, data: true, zero: false },
    { start: 20, length: 10, generation: 2, data: false, zero: true },
    { start: 30, length: 10, generation: -1, data: false, zero: true }
  ])
})
