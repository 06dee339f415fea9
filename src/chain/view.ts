/**
 * Generation views. A frozen generation reads through a precomputed index: sorted segments,
 * each naming the topmost layer that holds it. The live generation asks its top layer first and
 * falls back to the index of the generation below, so writes never rebuild an index.
 */
import { RedoError } from '../errors'
import { settleAll, type ReadPlan, type Run } from '../formats/extent'
import type { Layer } from '../formats/layer'

export interface Segment {
  start: number
  end: number
  layer: number
  state: 'data' | 'zero' | 'bad'
}

export interface MapEntry {
  start: number
  length: number
  /** Generation (layer index) that provides the bytes; -1 when nothing does. */
  generation: number
  data: boolean
  zero: boolean
}

/** Paint `runs` of layer `layer` over `below` (both sorted, non-overlapping). O(n + m). */
export function overlay (below: Segment[], runs: Run[], layer: number): Segment[] {
  const out: Segment[] = []
  let i = 0
  const push = (s: Segment): void => {
    if (s.end <= s.start) return
    const last = out[out.length - 1]
    if (last !== undefined && last.layer === s.layer && last.state === s.state && last.end === s.start) last.end = s.end
    else out.push(s)
  }
  let cur: Segment | undefined = below[0] !== undefined ? { ...below[0] } : undefined
  for (const r of runs) {
    const rs = r.start
    const re = r.start + r.length
    // emit everything of `below` before this run
    while (cur !== undefined && cur.start < rs) {
      if (cur.end <= rs) { push(cur); i++; cur = below[i] !== undefined ? { ...below[i] } : undefined } else { push({ ...cur, end: rs }); cur.start = rs }
    }
    push({ start: rs, end: re, layer, state: r.state })
    // skip what the run hides
    while (cur !== undefined && cur.start < re) {
      if (cur.end <= re) { i++; cur = below[i] !== undefined ? { ...below[i] } : undefined } else cur.start = re
    }
  }
  while (cur !== undefined) { push(cur); i++; cur = below[i] !== undefined ? { ...below[i] } : undefined }
  return out
}

export class Index {
  constructor (readonly segments: Segment[]) {}

  static build (layers: Layer[], below?: Index): Index {
    let segs = below?.segments ?? []
    const first = below === undefined ? 0 : layers.length - 1
    for (let i = first; i < layers.length; i++) segs = overlay(segs, layers[i].runs(), i)
    return new Index(segs)
  }

  /** First segment whose end is after pos. */
  find (pos: number): number {
    const s = this.segments
    let lo = 0
    let hi = s.length
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      if (s[mid].end <= pos) lo = mid + 1
      else hi = mid
    }
    return lo
  }

  /**
   * Walk [pos, pos+len) segment by segment, in order: `visit(s, q, n)` for n bytes at q, with s
   * undefined in the gaps. Stops when visit returns false (and returns false).
   */
  private walk (pos: number, len: number, visit: (s: Segment | undefined, q: number, n: number) => boolean): boolean {
    const end = pos + len
    let q = pos
    for (let k = this.find(pos); q < end; k++) {
      const s = this.segments[k]
      if (s === undefined || s.start >= end) return visit(undefined, q, end - q)
      if (s.start > q) {
        if (!visit(undefined, q, s.start - q)) return false
        q = s.start
      }
      const n = Math.min(end, s.end) - q
      if (!visit(s, q, n)) return false
      q += n
    }
    return true
  }

  /** Read [pos, pos+len) through the layers: one read per segment, zeros in the gaps. */
  async read (layers: Layer[], buf: Buffer, off: number, pos: number, len: number): Promise<void> {
    const jobs: Array<Promise<void>> = []
    let err: RedoError | undefined
    this.walk(pos, len, (s, q, n) => {
      const at = off + q - pos
      if (s === undefined || s.state === 'zero') buf.fill(0, at, at + n)
      else if (s.state === 'data') jobs.push(layers[s.layer].read(buf, at, q, n))
      else {
        err = new RedoError('EIO', `${layers[s.layer].path}: damaged grain at byte ${q} of the disk`, layers[s.layer].path)
        return false
      }
      return true
    })
    await settleAll(jobs)
    if (err !== undefined) throw err
  }

  /** read() as a plan (Extent.plan); false where a damaged grain or a layer says no. */
  plan (layers: Layer[], p: ReadPlan, pos: number, len: number): boolean {
    return this.walk(pos, len, (s, q, n) => s === undefined || s.state === 'zero' ? p.zero(n) : s.state === 'data' && layers[s.layer].plan(p, q, n))
  }

  allocatedBytes (): number {
    let n = 0
    for (const s of this.segments) if (s.state === 'data') n += s.end - s.start
    return n
  }
}

/** Allocation map in the style of `qemu-img map --output=json`, with the providing generation. */
export function mapOf (segments: Segment[], size: number): MapEntry[] {
  const out: MapEntry[] = []
  let p = 0
  const push = (e: MapEntry): void => {
    const last = out[out.length - 1]
    if (last !== undefined && last.generation === e.generation && last.data === e.data && last.zero === e.zero && last.start + last.length === e.start) last.length += e.length
    else out.push(e)
  }
  for (const s of segments) {
    if (s.start > p) push({ start: p, length: s.start - p, generation: -1, data: false, zero: true })
    push({ start: s.start, length: s.end - s.start, generation: s.layer, data: s.state !== 'zero', zero: s.state === 'zero' })
    p = s.end
  }
  if (p < size) push({ start: p, length: size - p, generation: -1, data: false, zero: true })
  return out
}
