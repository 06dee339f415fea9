import type { Argv } from 'yargs'
import { mkdir } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { createFlatLayer, createSparseLayer } from '../../formats/create'
import { RedoError } from '../../errors'
import { parseSize } from '../../units'
import { action } from '../common'

export const command = 'create <disk>'
export const describe = 'create a new base disk <store>/<vm>/<disk>.vmdk'
export const builder = (y: Argv): Argv => y
  .positional('disk', { type: 'string', describe: '<store>/<vm>/<disk> (without .vmdk)' })
  .option('size', { type: 'string', demandOption: true, describe: 'capacity, with K/M/G/T suffix' })
  .option('format', { choices: ['flat', 'sparse'], default: 'sparse', describe: 'monolithicFlat or monolithicSparse' })

export const handler = action(async (a: { disk: string, size: string, format: string }) => {
  const path = resolve(a.disk.replace(/\.vmdk$/i, '') + '.vmdk')
  const size = parseSize(a.size)
  if (size <= 0) throw new RedoError('EINVAL', `--size must be positive`)
  await mkdir(dirname(path), { recursive: true })
  if (a.format === 'flat') await createFlatLayer(path, size)
  else await createSparseLayer(path, size)
  process.stdout.write(`${path}\n`)
})
