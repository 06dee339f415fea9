import type { Argv } from 'yargs'
import { mkdir } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { importRaw } from '../../formats/create'
import { action } from '../common'

export const command = 'import <raw> <disk>'
export const describe = 'make a raw image a base disk by writing a descriptor beside it (copies nothing)'
export const builder = (y: Argv): Argv => y
  .positional('raw', { type: 'string', describe: 'raw image file' })
  .positional('disk', { type: 'string', describe: '<store>/<vm>/<disk> (without .vmdk)' })

export const handler = action(async (a: { raw: string, disk: string }) => {
  const path = resolve(a.disk.replace(/\.vmdk$/i, '') + '.vmdk')
  await mkdir(dirname(path), { recursive: true })
  await importRaw(resolve(a.raw), path)
  process.stdout.write(`${path}\n`)
})
