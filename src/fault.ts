/**
 * Fault injection for the crash tests: with REDOFS_CRASH_AFTER=N the process kills itself
 * (SIGKILL, no cleanup) at the N-th fault point it passes. Fault points sit between the
 * metadata writes whose order matters (VMDK.md §9). REDOFS_CRASH_ONLY=a,b limits counting to
 * points whose name starts with one of the prefixes. Without the variable this is a no-op.
 */
import { log } from './log'

let left = Number(process.env.REDOFS_CRASH_AFTER ?? '0')
const only = (process.env.REDOFS_CRASH_ONLY ?? '').split(',').filter(s => s !== '')

export function faultPoint (name: string): void {
  if (left <= 0) return
  if (only.length > 0 && !only.some(p => name.startsWith(p))) return
  left--
  if (left === 0) {
    process.stderr.write(`redofs: fault injection: crashing at ${name}\n`)
    process.kill(process.pid, 'SIGKILL')
  }
}

/**
 * REDOFS_FAIL_ONCE=a,b#3: the first failPoint named a, and the third named b, throws an EIO
 * error the way a failed system call would, for the tests of error paths. Without the variable
 * a no-op.
 */
const failAt = new Map((process.env.REDOFS_FAIL_ONCE ?? '').split(',').filter(s => s !== '').map(s => {
  const [name, nth] = s.split('#')
  return [name, Number(nth ?? '1')] as const
}))

export function failPoint (name: string): void {
  const n = failAt.get(name)
  if (n === undefined) return
  if (n > 1) { failAt.set(name, n - 1); return }
  failAt.delete(name)
  const e = new Error(`${name}: injected I/O error (REDOFS_FAIL_ONCE)`) as NodeJS.ErrnoException
  e.code = 'EIO'
  throw e
}

/**
 * REDOFS_DELAY=a:ms,b:ms: every delayPoint named a waits ms milliseconds, for the tests of work
 * that runs in the background (so a test can hold it open). Without the variable a no-op.
 */
const delays = new Map((process.env.REDOFS_DELAY ?? '').split(',').filter(s => s !== '').map(s => {
  const [name, ms] = s.split(':')
  return [name, Number(ms)] as const
}))

export async function delayPoint (name: string, what = ''): Promise<void> {
  const ms = delays.get(name)
  if (ms === undefined || ms <= 0) return
  log.fault('%s: waiting %d ms %s', name, ms, what)
  await new Promise(resolve => setTimeout(resolve, ms))
}
