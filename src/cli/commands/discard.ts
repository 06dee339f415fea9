import type { Argv } from 'yargs'
import { discard } from '../../chain/jobs'
import { resolveGeneration } from '../../chain/labels'
import { reapDroppedFreeingLater } from '../../formats/layer'
import { parseArgs } from '../../store/args'
import { action, refuseRenumbered, withWritableDisk, type GlobalArgs } from '../common'

export const command = 'discard <disk> [args..]'
export const describe = 'offline: delete the top redo log, or every redo log above generation G (to=G)'
export const builder = (y: Argv): Argv => y.positional('disk', { type: 'string', describe: '<store>/<vm>/<disk> or its top .vmdk' })

export const handler = action(async (a: GlobalArgs & { disk: string, args?: string[] }) => {
  const args = parseArgs(a.args ?? [], { to: 'gen', force: 'bool' }, 'discard')
  await withWritableDisk(a.disk, a, 'discard', async chain => {
    if (typeof args.to === 'number') refuseRenumbered(chain, a.disk, `to=${args.to}`)
    // the top itself moved when the finished commit merged the top away: the one meant is gone
    if (args.to === undefined && chain.recovered.some(j => j.above === null)) refuseRenumbered(chain, a.disk, 'the top')
    const r = await discard(chain, args.to !== undefined ? resolveGeneration(chain, args.to as number | string, 'discard') : undefined, { force: args.force === true, mixed: args.force === true })
    if (r.mixedLive !== undefined) process.stderr.write(`redofs: warning: ${r.mixedLive}\n`)
    await reapDroppedFreeingLater(r.files)
  })
})
