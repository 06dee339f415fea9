import { RedoError } from './errors'

export const SECTOR = 512

const SUFFIX: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 }

/** Parse "10G", "512K", "1048576", "1.5M" (binary units) into bytes. */
export function parseSize (text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpb]?)(?:i?b)?\s*$/i.exec(String(text))
  if (!m) throw new RedoError('EINVAL', `bad size "${text}": use a number with an optional K/M/G/T suffix`)
  const bytes = Math.round(Number(m[1]) * SUFFIX[m[2].toUpperCase()])
  if (!Number.isSafeInteger(bytes)) throw new RedoError('EINVAL', `size "${text}" is too large`)
  return bytes
}

export function formatSize (bytes: number): string {
  const units = ['B', 'K', 'M', 'G', 'T', 'P']
  let v = bytes
  let i = 0
  while (v >= 1024 && i < units.length - 1 && (v % 1024 === 0 || v >= 10240)) { v /= 1024; i++ }
  return `${Number.isInteger(v) ? v : v.toFixed(1)}${units[i]}`
}

export const ceilDiv = (a: number, b: number): number => Math.floor((a + b - 1) / b)
export const roundUp = (a: number, b: number): number => ceilDiv(a, b) * b
