/**
 * Fault injection for the crash tests: with REDOFS_CRASH_AFTER=N the process kills itself
 * (SIGKILL, no cleanup) at the N-th fault point it passes. Fault points sit between the
 * metadata writes whose order matters (VMDK.md §9). REDOFS_CRASH_ONLY=a,b limits counting to
 * points whose name starts with one of the prefixes. Without the variable this is a no-op.
 */
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
