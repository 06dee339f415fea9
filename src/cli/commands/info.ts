import type { Argv } from 'yargs'
import { relative } from 'node:path'
import { frozenAtOf, generationLabel } from '../../chain/labels'
import { cidHex } from '../../formats/descriptor'
import { formatSize } from '../../units'
import { childrenOf } from '../../chain/peek'
import { action, openDisk, storeRoot, type GlobalArgs } from '../common'

export const command = 'info <disk>'
export const describe = 'show the chain: one line per generation (file, format, capacity, allocated, CID links)'
export const builder = (y: Argv): Argv => y
  .positional('disk', { type: 'string', describe: 'a .vmdk chain top, or <store>/<vm>/<disk>' })
  .option('json', { type: 'boolean', default: false })

/** Relative to the working directory when that is shorter and does not climb out of it. */
function shortPath (p: string): string {
  const r = relative(process.cwd(), p)
  return r !== '' && !r.startsWith('..') ? r : p
}

export const handler = action(async (a: GlobalArgs & { disk: string, json: boolean }) => {
  const chain = await openDisk(a.disk, a)
  try {
    const layers = chain.layers.map((l, g) => ({
      generation: g,
      file: l.path,
      format: l.createType,
      capacity: l.size,
      allocated: l.allocatedBytes(),
      cid: l.hasCids ? cidHex(l.cid) : null,
      parentCID: l.hasParent && l.hasCids ? cidHex(l.parentCID) : null,
      live: g === chain.redoCount,
      label: generationLabel(chain, g) ?? null,
      frozenAt: g < chain.redoCount ? frozenAtOf(l)?.toISOString() ?? null : null,
      descriptorPending: l.descriptorPending,
      inFlux: chain.inFlux(g)?.text ?? null
    }))
    // linked clones: other files in the store that name a layer of this chain as their parent
    const root = storeRoot(chain.top.path, a)
    const others = await Promise.all(chain.layers.map(async (l, g) => {
      const next = chain.layers[g + 1]?.path
      return (await childrenOf(l.path, root)).filter(p => p !== next)
    }))
    layers.forEach((l, g) => { (l as typeof l & { otherChildren: string[] }).otherChildren = others[g] })
    if (a.json) {
      process.stdout.write(JSON.stringify({ layers }, null, 2) + '\n')
      return
    }
    for (const l of layers) {
      const link = l.generation === 0 ? 'base' : `parent ${l.parentCID ?? '-'}${chain.layers[l.generation - 1].hasCids && l.parentCID !== null && l.parentCID !== layers[l.generation - 1].cid ? ' (MISMATCH)' : ''}`
      process.stdout.write(`${l.live ? '*' : ' '}${String(l.generation).padStart(3)}  ${shortPath(l.file)}  ${l.format}  ${formatSize(l.capacity)}  allocated ${formatSize(l.allocated)}  CID ${l.cid ?? '-'}  ${link}${l.label !== null ? `  @${l.label}` : ''}${l.descriptorPending ? '  (descriptor rewrite pending: the next writable open finishes it)' : ''}${l.inFlux !== null ? `  (${l.inFlux.replace(/^generation \d+ /, '')})` : ''}\n`)
      for (const c of others[l.generation]) process.stdout.write(`        \`- also parent of ${shortPath(c)}\n`)
    }
  } finally {
    await chain.close()
  }
})
