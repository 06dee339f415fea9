import type { Argv } from 'yargs'
import { toRedoError } from '../../errors'
import { action, openDisk, type GlobalArgs } from '../common'

export const command = 'check <disk>'
export const describe = 'structural check of every file of the chain (exit 0 clean, 1 with a list of problems)'
export const builder = (y: Argv): Argv => y.positional('disk', { type: 'string', describe: 'a .vmdk chain top, or <store>/<vm>/<disk>' })

export const handler = action(async (a: GlobalArgs & { disk: string }) => {
  let problems: string[]
  try {
    const chain = await openDisk(a.disk, { ...a, ignoreCid: true }, { lenient: true })
    try {
      problems = await chain.check()
    } finally {
      await chain.close()
    }
  } catch (e) {
    problems = [toRedoError(e).message]
  }
  if (problems.length === 0) {
    process.stdout.write('clean\n')
    return 0
  }
  for (const p of problems) process.stdout.write(`${p}\n`)
  return 1
})
