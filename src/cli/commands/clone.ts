import type { Argv } from 'yargs'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { addRedo } from '../../chain/jobs'
import { resolveGeneration } from '../../chain/labels'
import { diskNameOf } from '../../chain/names'
import { RedoError } from '../../errors'
import { createSparseLayer } from '../../formats/create'
import { parentHintFor } from '../../formats/layer'
import { action, splitGeneration, storeRoot, withWritableDisk, type GlobalArgs } from '../common'

export const command = 'clone <source> <vm>'
export const describe = 'linked clone: a new redo log in <store>/<vm>/ on top of a frozen generation of <store>/<vm0>/<disk>[@G]'
export const builder = (y: Argv): Argv => y
  .positional('source', { type: 'string', describe: '<store>/<vm>/<disk>[@G|@LABEL]; without @G the live generation is frozen first' })
  .positional('vm', { type: 'string', describe: 'name of the VM directory of the clone (in the same store)' })

export const handler = action(async (a: GlobalArgs & { source: string, vm: string }) => {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]*$/.test(a.vm)) throw new RedoError('EINVAL', `${a.vm}: not a VM directory name`)
  const { file, gen } = splitGeneration(a.source)
  const path = await withWritableDisk(file, a, 'clone', async chain => {
    let g: number
    if (gen === undefined) {
      // the live generation is writable: freeze it so clone and source share a layer nobody writes
      await addRedo(chain)
      g = chain.redoCount - 1
    } else {
      g = resolveGeneration(chain, gen, a.source)
      if (g >= chain.redoCount) throw new RedoError('EINVAL', `${a.source}: generation ${g} is live; clone a frozen generation (or omit @G)`)
    }
    const parent = chain.layers[g]
    const dir = join(storeRoot(chain.top.path, a), a.vm)
    await mkdir(dir, { recursive: true })
    const target = join(dir, `${diskNameOf(chain.top.path)}-000001.vmdk`)
    await createSparseLayer(target, parent.size, { hint: parentHintFor(dir, parent.path), cid: parent.cid })
    return target
  })
  process.stdout.write(`${path}\n`)
})
