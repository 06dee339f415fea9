import type { Argv } from 'yargs'
import { execFile } from 'node:child_process'
import { realpath } from 'node:fs/promises'
import { promisify } from 'node:util'
import { RedoError } from '../../errors'
import { alive } from '../../store/lock'
import { isMounted, processStart, readServed } from '../serve'
import { action } from '../common'

export const command = 'umount <mnt>'
export const describe = 'unmount cleanly: the server flushes everything, powers disks off and exits'
export const builder = (y: Argv): Argv => y
  .positional('mnt', { type: 'string' })
  .option('timeout', { type: 'number', default: 600, describe: 'seconds to wait for the server to finish' })

export const handler = action(async (a: { mnt: string, timeout: number }) => {
  // mountinfo and the registry hold the canonical path: a path through a link is resolved first
  const mnt = await realpath(a.mnt).catch(() => a.mnt)
  if (!isMounted(mnt)) throw new RedoError('EINVAL', `${a.mnt}: not mounted`)
  const served = await readServed(mnt)
  // a server killed hard (SIGKILL, OOM) leaves its entry behind, and its pid can since belong
  // to any process: signal it only if it is still the process that registered (same start time)
  // and the path is mounted (checked above)
  if (served !== undefined && served.start !== undefined && processStart(served.pid) === served.start) {
    process.kill(served.pid, 'SIGTERM')
    const until = Date.now() + a.timeout * 1000
    while (alive(served.pid)) {
      if (Date.now() > until) throw new RedoError('EBUSY', `${a.mnt}: server pid ${served.pid} did not finish within ${a.timeout}s`)
      await new Promise(resolve => setTimeout(resolve, 100))
    }
    return
  }
  await promisify(execFile)('fusermount', ['-u', mnt]).catch((e: Error & { stderr?: string }) => {
    throw new RedoError('EBUSY', `${a.mnt}: ${(e.stderr ?? e.message).trim()}`)
  })
})
