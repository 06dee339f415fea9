/**
 * What the kernel says about mounts, from /proc/self/mountinfo — never from the mountpoint
 * itself (a process serving a mount must not make synchronous calls on it).
 */
import { readFileSync } from 'node:fs'
import { resolve } from 'node:path'

/** The device ("major:minor") of the last mount at `mnt`, if something is mounted there. */
export function mountDevice (mnt: string): string | undefined {
  const target = resolve(mnt).replace(/\\/g, '\\134').replace(/ /g, '\\040').replace(/\t/g, '\\011').replace(/\n/g, '\\012')
  let text: string
  try {
    text = readFileSync('/proc/self/mountinfo', 'utf8')
  } catch {
    return undefined
  }
  let dev: string | undefined
  for (const line of text.split('\n')) {
    const f = line.split(' ')
    if (f[4] === target) dev = f[2]
  }
  return dev
}
