/**
 * Damaged inputs (SPEC §6, VMDK.md addendum), each built in <root>/store/vm1 (plus <root>/outside
 * for the store-escape case). Shared by bad-input.test.ts (export/info refuse) and
 * check.test.ts (check lists the problems).
 */
import { mkdir, rm, truncate } from 'node:fs/promises'
import path from 'node:path'
import { applyQWrites } from './model'
import { buildChain, createBase, createChild, qemuWrite, type QWrite } from './qemu'
import { cidText, gtePosition, layerInfo, patchDescriptor, readKdmvHeader, readU32, setField, writeAt, writeU32 } from './vmdk'
import type { ErrorExpectation } from './redofs'

const M = 1024 * 1024

export interface Damaged {
  /** The file to pass to export/info/check. */
  top: string
  /** The directory whose files must not change (the whole test root). */
  root: string
  /** What the one-line error must contain. */
  error: ErrorExpectation
  /** What `redofs check` output must match, when check can open the chain and list problems. */
  checkProblem?: { mustNameOneOf: string[], keyword: RegExp }
  /** Expected image of the top with --ignore-cid (CID case only). */
  ignoreCidImage?: Buffer
}

export interface DamageCase {
  title: string
  /** Part of the acceptance list (export AND info must refuse); extras only require export. */
  infoRefuses: boolean
  build: (root: string) => Promise<Damaged>
}

const BASE: QWrite[] = [
  { pattern: 0x11, offset: 0, length: 300 * 1024 },
  { pattern: 0x12, offset: 8 * M - 1000, length: 5000 },
  { pattern: 0x13, offset: 16 * M - 512, length: 512 }
]
const CHILD: QWrite[] = [
  { pattern: 0x21, offset: 100 * 1024 + 3, length: 70 * 1024 },
  { pattern: 0x22, offset: 4 * M, length: 128 * 1024 }
]

async function vmDir (root: string): Promise<string> {
  const d = path.join(root, 'store', 'vm1')
  await mkdir(d, { recursive: true })
  return d
}

/** base disk.vmdk (monolithicSparse unless told) + disk-000001.vmdk, both with data. */
async function twoLevels (root: string, baseFormat: 'monolithicSparse' | 'monolithicFlat' = 'monolithicSparse'): Promise<{ dir: string, base: string, child: string }> {
  const dir = await vmDir(root)
  const [base, child] = await buildChain(dir, 16 * M, [
    { name: 'disk.vmdk', format: baseFormat, writes: BASE },
    { name: 'disk-000001.vmdk', writes: CHILD }
  ])
  return { dir, base, child }
}

const MISSING = /missing|not found|no such|ENOENT|does not exist|cannot find|can't find/i

export const damageCases: DamageCase[] = [
  {
    title: 'truncated header (redo log cut to 300 bytes)',
    infoRefuses: true,
    build: async root => {
      const { child } = await twoLevels(root)
      await truncate(child, 300)
      return {
        top: child,
        root,
        error: { mustName: ['disk-000001.vmdk'], keyword: /truncat|short|header|too small|end of file|EOF/i }
      }
    }
  },
  {
    title: 'wrong magic in the parent (KDMV overwritten)',
    infoRefuses: true,
    build: async root => {
      const { base, child } = await twoLevels(root)
      await writeAt(base, 0, Buffer.from('XXXX', 'latin1'))
      return {
        top: child,
        root,
        error: { mustName: ['disk.vmdk'], keyword: /magic|not a vmdk|unrecogni[sz]ed|unknown|not a descriptor|format/i }
      }
    }
  },
  {
    title: 'grain table entry past end of file',
    infoRefuses: true,
    build: async root => {
      const { child } = await twoLevels(root)
      // grain 64 = byte 4 MiB, allocated in the child by CHILD[1]
      for (const redundant of [false, true]) await writeU32(child, await gtePosition(child, 64, redundant), 0x00f00000)
      const keyword = /EOF|end of file|past|beyond|outside|after/i
      return { top: child, root, error: { mustName: ['disk-000001.vmdk'], keyword }, checkProblem: { mustNameOneOf: ['disk-000001.vmdk'], keyword } }
    }
  },
  {
    title: 'grain table entry pointing into the metadata area',
    infoRefuses: true,
    build: async root => {
      const { child } = await twoLevels(root)
      // grain 64 "stored" on the grain directory: a write there would overwrite the directory
      const gd = (await readKdmvHeader(child)).gdOffset
      for (const redundant of [false, true]) await writeU32(child, await gtePosition(child, 64, redundant), gd)
      const keyword = /metadata/i
      return { top: child, root, error: { mustName: ['disk-000001.vmdk'], keyword }, checkProblem: { mustNameOneOf: ['disk-000001.vmdk'], keyword } }
    }
  },
  {
    title: 'two grain table entries pointing at the same grain',
    infoRefuses: true,
    build: async root => {
      const { child } = await twoLevels(root)
      // grain 64 shares grain 1's sectors: writing either would change both
      for (const redundant of [false, true]) await writeU32(child, await gtePosition(child, 64, redundant), await readU32(child, await gtePosition(child, 1)))
      const keyword = /another grain/i
      return { top: child, root, error: { mustName: ['disk-000001.vmdk'], keyword }, checkProblem: { mustNameOneOf: ['disk-000001.vmdk'], keyword } }
    }
  },
  {
    title: 'descriptor naming a missing extent',
    infoRefuses: true,
    build: async root => {
      const { dir, child } = await twoLevels(root, 'monolithicFlat')
      await rm(path.join(dir, 'disk-flat.vmdk'))
      return { top: child, root, error: { mustName: ['disk-flat.vmdk'], keyword: MISSING } }
    }
  },
  {
    title: 'missing parent',
    infoRefuses: true,
    build: async root => {
      const { base, child } = await twoLevels(root)
      await rm(base)
      return { top: child, root, error: { mustName: ['disk-000001.vmdk', 'disk.vmdk'], keyword: MISSING } }
    }
  },
  {
    title: 'CID mismatch (parent written after the child was made)',
    infoRefuses: true,
    build: async root => {
      const { base, child } = await twoLevels(root)
      const modify: QWrite[] = [{ pattern: 0x77, offset: 12 * M, length: 200 * 1024 }]
      await qemuWrite(base, modify) // new CID in the parent, child's parentCID now stale
      const b = await layerInfo(base)
      const c = await layerInfo(child)
      if (b.cid === c.parentCID) throw new Error('setup: CIDs still match')
      const image = Buffer.alloc(16 * M)
      applyQWrites(image, BASE)
      applyQWrites(image, modify)
      applyQWrites(image, CHILD)
      return {
        top: child,
        root,
        error: { mustName: ['disk.vmdk', 'disk-000001.vmdk', cidText(b.cid), cidText(c.parentCID)], keyword: /CID|content ?id/i },
        checkProblem: { mustNameOneOf: ['disk.vmdk', 'disk-000001.vmdk'], keyword: /CID|content ?id/i },
        ignoreCidImage: image
      }
    }
  },
  {
    title: 'parent loop',
    infoRefuses: true,
    build: async root => {
      const dir = await vmDir(root)
      const [, c1, c2] = await buildChain(dir, 16 * M, [
        { name: 'disk.vmdk', writes: BASE },
        { name: 'disk-000001.vmdk', writes: CHILD },
        { name: 'disk-000002.vmdk', writes: [{ pattern: 0x33, offset: 0, length: 512 }] }
      ])
      const c2cid = (await layerInfo(c2)).cid
      await patchDescriptor(c1, t => setField(setField(t, 'parentFileNameHint', 'disk-000002.vmdk', true), 'parentCID', cidText(c2cid), false))
      return {
        top: c2,
        root,
        error: { mustNameOneOf: ['disk-000001.vmdk', 'disk-000002.vmdk'], keyword: /loop|cycl|circular|recurs/i }
      }
    }
  },
  {
    title: 'capacity mismatch between parent and child',
    infoRefuses: true,
    build: async root => {
      const dir = await vmDir(root)
      await createBase('disk.vmdk', 32 * M, 'monolithicSparse', dir)
      await createChild('disk-000001.vmdk', 'disk.vmdk', 'monolithicSparse', dir)
      await qemuWrite('disk-000001.vmdk', [{ pattern: 0x44, offset: 20 * M, length: 65536 }], dir)
      await rm(path.join(dir, 'disk.vmdk'))
      await createBase('disk.vmdk', 16 * M, 'monolithicSparse', dir)
      await qemuWrite('disk.vmdk', BASE, dir)
      const base = path.join(dir, 'disk.vmdk')
      const child = path.join(dir, 'disk-000001.vmdk')
      const cid = (await layerInfo(base)).cid
      await patchDescriptor(child, t => setField(t, 'parentCID', cidText(cid), false))
      const keyword = /capacity|size/i
      return {
        top: child,
        root,
        error: { mustName: ['disk-000001.vmdk'], keyword },
        checkProblem: { mustNameOneOf: ['disk-000001.vmdk', 'disk.vmdk'], keyword }
      }
    }
  },
  {
    title: 'parentFileNameHint leaving the store',
    infoRefuses: true,
    build: async root => {
      const outside = path.join(root, 'outside')
      await mkdir(outside, { recursive: true })
      await createBase('base.vmdk', 16 * M, 'monolithicSparse', outside)
      await qemuWrite('base.vmdk', BASE, outside)
      const dir = path.join(root, 'store', 'vm')
      await mkdir(dir, { recursive: true })
      await createChild('child.vmdk', '../../outside/base.vmdk', 'monolithicSparse', dir)
      return {
        top: path.join(dir, 'child.vmdk'),
        root,
        error: { mustName: ['child.vmdk'], keyword: /outside|store|escap|leav|contain/i }
      }
    }
  },
  // --- extras from VMDK.md's addendum (export must refuse; info may list the problem instead)
  {
    title: 'flat extent shorter than its descriptor line',
    infoRefuses: false,
    build: async root => {
      const { dir, child } = await twoLevels(root, 'monolithicFlat')
      await truncate(path.join(dir, 'disk-flat.vmdk'), 6 * M)
      const keyword = /short|truncat|EOF|end of file|smaller|ends before|missing/i
      return {
        top: child,
        root,
        error: { mustNameOneOf: ['disk-flat.vmdk', 'disk.vmdk'], keyword },
        checkProblem: { mustNameOneOf: ['disk-flat.vmdk', 'disk.vmdk'], keyword }
      }
    }
  },
  {
    title: 'grain directory entry past end of file',
    infoRefuses: false,
    build: async root => {
      const { child } = await twoLevels(root)
      const h = await readKdmvHeader(child)
      for (const gd of [h.gdOffset, h.rgdOffset]) await writeU32(child, gd * 512, 0x00f00000)
      const keyword = /EOF|end of file|past|beyond|outside|after/i
      return { top: child, root, error: { mustName: ['disk-000001.vmdk'], keyword }, checkProblem: { mustNameOneOf: ['disk-000001.vmdk'], keyword } }
    }
  },
  {
    title: 'parent sparse extent truncated below the grains it points to',
    infoRefuses: false,
    build: async root => {
      const { base, child } = await twoLevels(root)
      // the base's last grain (16 MiB - 512) is its highest allocation: cut the file inside it
      const last = await readU32(base, await gtePosition(base, 255))
      if (last === 0) throw new Error('setup: last grain not allocated')
      await truncate(base, last * 512 + 1024)
      const keyword = /short|truncat|EOF|end of file|past|beyond|ends before|outside/i
      return { top: child, root, error: { mustName: ['disk.vmdk'], keyword }, checkProblem: { mustNameOneOf: ['disk.vmdk'], keyword } }
    }
  },
  {
    title: 'unknown createType',
    infoRefuses: false,
    build: async root => {
      const { base, child } = await twoLevels(root, 'monolithicFlat')
      await patchDescriptor(base, t => setField(t, 'createType', 'bogusDiskType', true))
      return { top: child, root, error: { mustName: ['disk.vmdk'], keyword: /createType|bogusDiskType|unknown|unsupported/i } }
    }
  }
]

/** Damage that only `check` is asked to find (the chain still reads). */
export const checkOnlyCases: DamageCase[] = [
  {
    title: 'redundant grain table differing from the primary',
    infoRefuses: false,
    build: async root => {
      const { child } = await twoLevels(root)
      await writeU32(child, await gtePosition(child, 64, true), 0)
      const keyword = /redundant|backup|RGD|RGT|secondary|differ|mismatch|inconsisten/i
      return { top: child, root, error: { mustName: ['disk-000001.vmdk'], keyword }, checkProblem: { mustNameOneOf: ['disk-000001.vmdk'], keyword } }
    }
  },
  {
    title: 'grain table entry of 1 (a zeroed grain) in a file without the zeroed-grain flag',
    infoRefuses: false,
    build: async root => {
      const { child } = await twoLevels(root)
      for (const redundant of [false, true]) await writeU32(child, await gtePosition(child, 64, redundant), 1)
      const keyword = /1 grain table entry is 1 \(a zeroed grain\) but the zeroed-grain flag is not set; read as zeros/
      return { top: child, root, error: { mustName: ['disk-000001.vmdk'], keyword }, checkProblem: { mustNameOneOf: ['disk-000001.vmdk'], keyword } }
    }
  }
]
