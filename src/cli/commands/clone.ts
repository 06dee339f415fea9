import type { Argv } from 'yargs'
import { mkdir, readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { addRedo } from '../../chain/jobs'
import { resolveGeneration } from '../../chain/labels'
import { diskNameOf } from '../../chain/names'
import { RedoError } from '../../errors'
import { createSparseLayer } from '../../formats/create'
import { parentHintFor } from '../../formats/layer'
import { action, refuseInFlux, refuseRenumbered, splitGeneration, storeRoot, withWritableDisk, type GlobalArgs } from '../common'

export const command = 'clone <source> <vm>'
export const describe = 'linked clone: a new redo log in <store>/<vm>/ on top of a frozen generation of <store>/<vm0>/<disk>[@G]'
export const builder = (y: Argv): Argv => y
  .positional('source', { type: 'string', describe: '<store>/<vm>/<disk>[@G|@LABEL]; without @G the live generation is frozen first' })
  .positional('vm', { type: 'string', describe: 'name of the VM directory of the clone (in the same store)' })

export const handler = action(async (a: GlobalArgs & { source: string, vm: string }) => {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]*$/.test(a.vm)) throw new RedoError('EINVAL', `${a.vm}: not a VM directory name`)
  const { file, gen } = splitGeneration(a.source)
  const path = await withWritableDisk(file, a, 'clone', async chain => {
    if (typeof gen === 'number') refuseRenumbered(chain, a.source, `@${gen}`)
    // every refusal before the source changes (without @G the live generation is frozen first)
    const g = gen === undefined ? chain.redoCount : resolveGeneration(chain, gen, a.source)
    if (gen !== undefined && g >= chain.redoCount) throw new RedoError('EINVAL', `${a.source}: generation ${g} is live; clone a frozen generation (or omit @G)`)
    refuseInFlux(chain, g, a.source)
    const from = chain.layers[g]
    if (!from.hasCids) throw new RedoError('EINVAL', `${from.path}: has no descriptor (ESX 2.x), so a clone could not name it as its parent`, from.path)
    const disk = diskNameOf(chain.top.path)
    const dir = join(storeRoot(chain.top.path, a), a.vm)
    const taken = (await readdir(dir).catch(() => [] as string[])).find(f => /\.vmdk$/i.test(f) && diskNameOf(f) === disk)
    if (taken !== undefined) throw new RedoError('EEXIST', `${join(dir, taken)}: VM ${a.vm} already has a disk "${disk}"`, join(dir, taken))
    // the live generation is writable: freeze it so clone and source share a layer nobody writes
    if (gen === undefined) await addRedo(chain)
    const parent = chain.layers[g]
    await mkdir(dir, { recursive: true })
    const target = join(dir, `${disk}-000001.vmdk`)
    await createSparseLayer(target, parent.size, { hint: parentHintFor(dir, parent.path), cid: parent.cid })
    return target
  })
  process.stdout.write(`${path}\n`)
})
