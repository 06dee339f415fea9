/**
 * What the kernel says about mounts, from /proc/self/mountinfo — never from the mountpoint
 * itself (a process serving a mount must not make synchronous calls on it).
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { resolve } from 'node:path'
import { log } from '../log'

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

/**
 * Let the kernel read ahead up to `kib` KiB on the mount (its backing-device setting; FUSE
 * starts at 128). Each request stays ≤ 128 KiB (libfuse 2), but a larger window keeps several in
 * flight, which the server answers in parallel. Needs root; without it the default stays.
 */
export function setReadahead (mnt: string, kib: number): boolean {
  const dev = mountDevice(mnt)
  if (dev === undefined) return false
  try {
    writeFileSync(`/sys/class/bdi/${dev}/read_ahead_kb`, `${kib}\n`)
    return true
  } catch (e) {
    log.fs('read_ahead_kb of %s (%s) left as it is: %s', mnt, dev, (e as Error).message)
    return false
  }
}
