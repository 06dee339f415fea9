import type { Argv } from 'yargs'
import type { RedoFormat } from '../../chain/jobs'
import { parseSize } from '../../units'
import { serve } from '../serve'
import { action, type GlobalArgs } from '../common'

export const command = 'mount <store> <mnt>'
export const describe = 'mount a datastore (foreground, until SIGINT/SIGTERM or redofs umount)'
export const builder = (y: Argv): Argv => y
  .positional('store', { type: 'string' })
  .positional('mnt', { type: 'string' })
  .option('max-redos', { type: 'number', default: 32, describe: 'addredo fails with EBUSY beyond this many redo logs' })
  .option('redo-limit', { type: 'string', describe: 'warn in status when a redo log grows past SIZE' })
  .option('redo-limit-hard', { type: 'boolean', default: false, describe: 'writes past --redo-limit fail with ENOSPC' })
  .option('allow-other', { type: 'boolean', default: false, describe: 'let other users reach the files (as their modes permit)' })
  .option('read-only', { type: 'boolean', default: false })
  .option('redo-format', { choices: ['sparse', 'cowd'], default: 'sparse', describe: 'format of the redo logs addredo creates' })
  .option('readahead', { type: 'string', describe: 'kernel readahead window of the mounted files (SIZE, default 1M; 0 keeps the kernel\'s 128K); needs root' })
  .option('worker-io', { type: 'boolean', default: true, alias: 'worker-reads', describe: 'let the FUSE worker threads read the backing files and overwrite data in place (--no-worker-io: the JS thread does all I/O)' })

export const handler = action(async (a: GlobalArgs & { store: string, mnt: string, maxRedos: number, redoLimit?: string, redoLimitHard: boolean, allowOther: boolean, readOnly: boolean, redoFormat: RedoFormat, readahead?: string, workerIo: boolean }) => {
  await serve(a.store, a.mnt, {
    readOnly: a.readOnly,
    ignoreCid: a.ignoreCid === true,
    maxRedos: a.maxRedos,
    redoLimit: a.redoLimit !== undefined ? parseSize(a.redoLimit) : undefined,
    redoLimitHard: a.redoLimitHard,
    redoFormat: a.redoFormat
  }, { allowOther: a.allowOther, workerIo: a.workerIo, readahead: a.readahead !== undefined ? parseSize(a.readahead) : undefined }, msg => process.stdout.write(`${msg}\n`))
  // keep running: the FUSE loop and signal handlers hold the process
  return await new Promise<number>(() => {})
})
