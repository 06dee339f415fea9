/** Deterministic test data: a seeded PRNG and write plans with an in-memory expected image. */
import type { QWrite } from './qemu'

/** mulberry32: small, seeded, reproducible. */
export function prng (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let x = a
    x = Math.imul(x ^ (x >>> 15), x | 1)
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61)
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

export function randomBytes (rnd: () => number, len: number): Buffer {
  const b = Buffer.alloc(len)
  for (let i = 0; i < len; i++) b[i] = Math.floor(rnd() * 256)
  return b
}

export interface DataWrite {
  pos: number
  data: Buffer
}

/**
 * A varied write plan for a disk of `size` bytes with 64 KiB grains: unaligned writes across
 * grain boundaries, sub-sector writes, multi-grain writes, overlapping writes, first and last byte.
 */
export function writePlan (seed: number, size: number): DataWrite[] {
  const rnd = prng(seed)
  const G = 65536
  const grains = Math.floor(size / G)
  const plan: Array<[number, number]> = [
    [0, 1],
    [size - 1, 1],
    [G - 10, 20],
    [3 * G + 511, 2],
    [5 * G - 700, 3 * G + 1400],
    [5 * G + 100, 50], // overlaps the previous one
    [size - G - 5, G + 5]
  ]
  for (let i = 0; i < 12; i++) {
    const g = Math.floor(rnd() * (grains - 4))
    const start = g * G + Math.floor(rnd() * G)
    const len = 1 + Math.floor(rnd() * 2.5 * G)
    plan.push([start, Math.min(len, size - start)])
  }
  return plan.map(([pos, len]) => ({ pos, data: randomBytes(rnd, len) }))
}

/** Apply writes to an in-memory image (later writes win). */
export function applyWrites (image: Buffer, writes: DataWrite[]): void {
  for (const w of writes) w.data.copy(image, w.pos)
}

/** Apply qemu-io style pattern writes to an in-memory image. */
export function applyQWrites (image: Buffer, writes: QWrite[]): void {
  for (const w of writes) image.fill(w.pattern === 'zero' ? 0 : w.pattern, w.offset, w.offset + w.length)
}

/** First differing byte offset, or -1. */
export function firstDifference (a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length)
  if (a.equals(b)) return -1
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i
  return -1
}
