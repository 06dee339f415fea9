/**
 * Generation metadata kept in the descriptor of the generation's top layer, under ddb keys
 * other tools ignore: a label and the time the generation was frozen. Only the descriptor is
 * rewritten; the layer's content and CID stay as they are.
 */
import { RedoError } from '../errors'
import type { Layer } from '../formats/layer'
import type { Chain } from './chain'

export const LABEL_KEY = 'ddb.redofs.label'
export const FROZEN_KEY = 'ddb.redofs.frozen'
/** On the first redo log of a nonpersistent or undoable disk's session (see the store's modes). */
export const SESSION_KEY = 'ddb.redofs.session'
/**
 * On a layer a failed or cancelled commit had written part of its child into: the child's path,
 * relative to the layer's directory. While that child is the layer right above, the layer's
 * generation is neither what it was nor the child's (Chain.inFlux); committing the child again
 * completes it.
 */
export const PART_OF_KEY = 'ddb.redofs.partOf'

/** The path (relative to the layer's directory) of the redo log this layer holds part of (PART_OF_KEY), if any. */
export function partOfOf (layer: Layer): string | undefined {
  const v = layer.descriptor.get(PART_OF_KEY)
  return v === undefined || v === '' ? undefined : v
}

export function labelOf (layer: Layer): string | undefined {
  const v = layer.descriptor.get(LABEL_KEY)
  return v === undefined || v === '' ? undefined : v
}

export function frozenAtOf (layer: Layer): Date | undefined {
  const v = layer.descriptor.get(FROZEN_KEY)
  if (v === undefined) return undefined
  const d = new Date(v)
  return Number.isNaN(d.getTime()) ? undefined : d
}

/** Set or clear (undefined) metadata keys of a layer's descriptor. */
export async function setMeta (layer: Layer, meta: { label?: string | null, frozen?: Date | null, partOf?: string | null }): Promise<void> {
  if (!layer.hasCids) throw new RedoError('ENOTSUP', `${layer.path}: this layer has no descriptor to hold a label`, layer.path)
  const d = layer.descriptor.clone()
  if (meta.label !== undefined) {
    if (meta.label === null) d.delete(LABEL_KEY)
    else d.set(LABEL_KEY, meta.label)
  }
  if (meta.frozen !== undefined) {
    if (meta.frozen === null) d.delete(FROZEN_KEY)
    else d.set(FROZEN_KEY, meta.frozen.toISOString())
  }
  if (meta.partOf !== undefined) {
    if (meta.partOf === null) d.delete(PART_OF_KEY)
    else d.set(PART_OF_KEY, meta.partOf)
  }
  if (d.toString() !== layer.descriptor.toString()) await layer.saveDescriptor(d)
}

/** The label of generation g: frozen generations only (one a crash left on the live top names nothing). */
export function generationLabel (chain: Chain, g: number): string | undefined {
  return g < chain.redoCount ? labelOf(chain.layers[g]) : undefined
}

/** Frozen generation number of a label, or undefined. */
export function findLabel (chain: Chain, name: string): number | undefined {
  const g = chain.layers.findIndex((_, k) => generationLabel(chain, k) === name)
  return g < 0 ? undefined : g
}

/** Name frozen generation g (0..N-1); a name already used elsewhere moves here. */
export async function labelGeneration (chain: Chain, g: number, name: string): Promise<void> {
  const N = chain.redoCount
  if (!Number.isInteger(g) || g < 0 || g >= N) throw new RedoError('EINVAL', `label: gen=${g} is not a frozen generation (0..${N - 1})`)
  const old = findLabel(chain, name)
  if (old !== undefined && old !== g) await setMeta(chain.layers[old], { label: null })
  await setMeta(chain.layers[g], { label: name })
}

/** Resolve a `to=`/`gen=` argument: a number, or a label. */
export function resolveGeneration (chain: Chain, v: number | string, what: string): number {
  if (typeof v === 'number') return v
  const g = findLabel(chain, v)
  if (g === undefined) throw new RedoError('EINVAL', `${what}: no generation is labelled "${v}"`)
  return g
}
