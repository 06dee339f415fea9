import { resolve } from 'node:path'
import type { Argv } from 'yargs'
import { commit } from '../../chain/jobs'
import { reapDroppedFreeingLater } from '../../formats/layer'
import { parseArgs } from '../../store/args'
import { action, progressBar, refuseRenumbered, withWritableDisk, type GlobalArgs } from '../common'

export const command = 'commit <disk> [args..]'
export const describe = 'offline: merge a redo log into its parent (level=K from the top, or level=all)'
export const builder = (y: Argv): Argv => y.positional('disk', { type: 'string', describe: '<store>/<vm>/<disk> or its top .vmdk' })

export const handler = action(async (a: GlobalArgs & { disk: string, args?: string[] }) => {
  const args = parseArgs(a.args ?? [], { level: 'level', force: 'bool', freeze: 'bool', wait: 'bool' }, 'commit')
  const bar = progressBar('commit')
  try {
    await withWritableDisk(a.disk, a, 'commit', async chain => {
      const level = args.level ?? 0
      if (level !== 'all' && chain.recovered.length > 0) {
        // the open finished an interrupted commit: when it merged the level this one asks for,
        // this is its repeat, done now; any other level has moved
        const merged = chain.redoCount - chain.layers.findIndex(l => resolve(l.path) === resolve(chain.recovered[0].parent))
        if (chain.recovered.length === 1 && merged === level) return
        refuseRenumbered(chain, a.disk, `level=${level}`)
      }
      const force = args.force === true
      const onProgress = (p: { done: number, total: number }): void => bar.update(p.done, p.total)
      // the last merged file is deleted here, its blocks freed after the command (the levels
      // before delete theirs within the job: the next level's space check must see that space)
      let dropped: string[] = []
      const last = { reap: (files: string[]) => { dropped = files } }
      if (level === 'all') {
        while (chain.redoCount > 0) await commit(chain, chain.redoCount - 1, { force, onProgress, ...(chain.redoCount === 1 ? last : {}) })
      } else {
        await commit(chain, level as number, { force, onProgress, ...last })
      }
      await reapDroppedFreeingLater(dropped)
    })
  } finally {
    bar.end()
  }
})
