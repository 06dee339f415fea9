import type { Argv } from 'yargs'
import { labelGeneration, resolveGeneration } from '../../chain/labels'
import { RedoError } from '../../errors'
import { parseArgs } from '../../store/args'
import { action, refuseRenumbered, withWritableDisk, type GlobalArgs } from '../common'

export const command = 'label <disk> [args..]'
export const describe = 'offline: name a frozen generation (gen=G name=NAME); <disk>@NAME then works everywhere'
export const builder = (y: Argv): Argv => y.positional('disk', { type: 'string', describe: '<store>/<vm>/<disk> or its top .vmdk' })

export const handler = action(async (a: GlobalArgs & { disk: string, args?: string[] }) => {
  const args = parseArgs(a.args ?? [], { gen: 'gen', name: 'name' }, 'label')
  if (args.gen === undefined || args.name === undefined) throw new RedoError('EINVAL', 'label: needs gen=G and name=NAME')
  await withWritableDisk(a.disk, a, 'label', async chain => {
    if (typeof args.gen === 'number') refuseRenumbered(chain, a.disk, `gen=${args.gen}`)
    await labelGeneration(chain, resolveGeneration(chain, args.gen as number | string, 'label'), args.name as string)
  })
})
