import type { Argv } from 'yargs'
import { delayPoint } from '../../fault'
import { action, openForReading, readableGeneration, splitGeneration, type GlobalArgs } from '../common'

export const command = 'map <source>'
export const describe = 'allocation map of a generation as JSON (like qemu-img map), with the generation providing each extent'
export const builder = (y: Argv): Argv => y.positional('source', { type: 'string', describe: 'chain top .vmdk (or <store>/<vm>/<disk>), optionally @G or @LABEL' })

export const handler = action(async (a: GlobalArgs & { source: string }) => {
  const { file, gen } = splitGeneration(a.source)
  const { chain, unchanged } = await openForReading(file, a)
  try {
    const g = readableGeneration(chain, gen, a.source)
    await delayPoint('reader')
    const map = chain.map(g)
    await unchanged(g, a.source)
    process.stdout.write(JSON.stringify(map, null, 2) + '\n')
  } finally {
    await chain.close()
  }
})
