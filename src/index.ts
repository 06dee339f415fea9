/** Public engine API: open a chain, read and write its generations, change its shape. */
import { Chain, type ChainOptions } from './chain/chain'

export { Chain, type ChainOptions, type View } from './chain/chain'
export { addRedo, commit, discard } from './chain/jobs'
export { createFlatLayer, createSparseLayer, importRaw } from './formats/create'
export { Descriptor } from './formats/descriptor'
export { Layer } from './formats/layer'
export { RedoError } from './errors'

export async function openChain (top: string, opts: ChainOptions = {}): Promise<Chain> {
  return await Chain.open(top, opts)
}
