import type { Argv } from 'yargs'
import { stat } from 'node:fs/promises'
import { Chain } from '../../chain/chain'
import { differences, loadDigest } from '../../chain/digest'
import { parentCandidates } from '../../chain/peek'
import { RedoError } from '../../errors'
import { cidHex } from '../../formats/descriptor'
import { Layer } from '../../formats/layer'
import { action, lockStore, storeRoot, type GlobalArgs } from '../common'

export const command = 'relink <child>'
export const describe = 're-stamp parentCID after checking that the parent still holds what it held (CID mismatch after moving files)'
export const builder = (y: Argv): Argv => y.positional('child', { type: 'string', describe: 'the .vmdk whose parentCID no longer matches' })

export const handler = action(async (a: GlobalArgs & { child: string }) => {
  if (!await stat(a.child).then(s => s.isFile(), () => false)) throw new RedoError('ENOENT', `${a.child}: no such file`, a.child)
  const root = storeRoot(a.child, a)
  const lock = await lockStore(a.child, a, 'relink')
  try {
    const child = await Layer.open(a.child, { root })
    let parentPath: string | undefined
    let childSize: number
    try {
      const hint = child.parentHint
      if (!child.hasParent || hint === undefined) throw new RedoError('EINVAL', `${a.child}: has no parent to re-link to`, a.child)
      for (const c of parentCandidates(child.path, hint)) if (await stat(c).then(() => true, () => false)) { parentPath = c; break }
      if (parentPath === undefined) throw new RedoError('ENOENT', `${a.child}: parent ${parentCandidates(child.path, hint)[0]} not found`, a.child)
      childSize = child.size
    } catch (e) {
      await child.close()
      throw e
    }
    const parent = await Chain.open(parentPath, { root, ignoreCid: a.ignoreCid === true })
    try {
      if (parent.size !== childSize) throw new RedoError('EINVAL', `${a.child}: capacity ${childSize} differs from its parent ${parentPath} (${parent.size})`, a.child)
      if (child.parentCID === parent.top.cid) {
        process.stdout.write(`${a.child}: already linked (parentCID ${cidHex(parent.top.cid)})\n`)
        return
      }
      const record = await loadDigest(parentPath)
      if (record === undefined) {
        throw new RedoError('ENOENT', `${parentPath}: no content record (addredo record=1 makes one when it freezes a generation), so its content cannot be verified; not re-linking ${a.child}`, parentPath)
      }
      if (record.capacity !== parent.size) throw new RedoError('EINVAL', `${parentPath}: content record is for ${record.capacity} bytes, the disk has ${parent.size}`, parentPath)
      // blocks the child covers completely do not matter: it hides them
      const covered = (pos: number, len: number): boolean => {
        const r = child.lookup(pos, len)
        return (r.state === 'data' || r.state === 'zero') && r.length >= len
      }
      const g = parent.redoCount
      const diff = await differences(record, async (buf, pos, len) => { await parent.read(g, buf, 0, pos, len) }, covered)
      if (diff.length > 0) {
        throw new RedoError('EINVAL', `${parentPath}: content changed since it was frozen, where ${a.child} does not cover it: at byte ${diff.slice(0, 5).join(', ')}${diff.length > 5 ? ' ...' : ''} (1 MiB blocks); not re-linking`, parentPath)
      }
      await child.close()
      const w = await Layer.open(a.child, { root, writable: true })
      try {
        await w.setParent(w.parentHint as string, parent.top.cid)
      } finally {
        await w.close()
      }
      process.stdout.write(`${a.child}: parentCID ${cidHex(child.parentCID)} -> ${cidHex(parent.top.cid)} (content verified)\n`)
    } finally {
      await child.close().catch(() => {})
      await parent.close()
    }
  } finally {
    await lock.release()
  }
})
