import type { Argv } from 'yargs'
import { action, openDisk, readableGeneration, splitGeneration, type GlobalArgs } from '../common'

export const command = 'map <source>'
export const describe = 'allocation map of a generation as JSON (like qemu-img map), with the generation providing each extent'
export const builder = (y: Argv): Argv => y.positional('source', { type: 'string', describe: 'chain top .vmdk (or <store>/<vm>/<disk>), optionally @G or @LABEL' })

export const handler = action(async (a: GlobalArgs & { source: string }) => {
  const { file, gen } = splitGeneration(a.source)
  const chain = await openDisk(file, a)
  try {
    const g = readableGeneration(chain, gen, a.source)
    process.stdout.write(JSON.stringify(chain.map(g), null, 2) + '\n')
  } finally {
    await chain.close()
  }
})
