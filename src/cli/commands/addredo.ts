import type { Argv } from 'yargs'
import { addRedo, type RedoFormat } from '../../chain/jobs'
import { parseArgs } from '../../store/args'
import { action, withWritableDisk, type GlobalArgs } from '../common'

export const command = 'addredo <disk> [args..]'
export const describe = 'offline: freeze the top and add an empty redo log (<disk>-NNNNNN.vmdk)'
export const builder = (y: Argv): Argv => y
  .positional('disk', { type: 'string', describe: '<store>/<vm>/<disk> or its top .vmdk' })
  .option('redo-format', { choices: ['sparse', 'cowd'], default: 'sparse', describe: 'monolithicSparse (hosted) or vmfsSparse (ESX COWD) redo log' })

export const handler = action(async (a: GlobalArgs & { disk: string, args?: string[], redoFormat: RedoFormat }) => {
  const args = parseArgs(a.args ?? [], { label: 'name', record: 'bool' }, 'addredo')
  const path = await withWritableDisk(a.disk, a, 'addredo', async chain => await addRedo(chain, { label: args.label as string | undefined, format: a.redoFormat, record: args.record === true }))
  process.stdout.write(`${path}\n`)
})
