/**
 * Minimal, independent VMDK inspection for tests (not the engine's code): read and patch
 * descriptors (embedded or stand-alone), locate KDMV grain-table entries, follow parent hints,
 * verify CID links and find chain tops in a VM directory.
 */
import { open, readdir, writeFile } from 'node:fs/promises'
import path from 'node:path'

const SECTOR = 512
const KDMV = 'KDMV'
const COWD = 'COWD'

export interface KdmvHeader {
  version: number
  flags: number
  capacity: number
  grainSize: number
  descriptorOffset: number
  descriptorSize: number
  numGTEsPerGT: number
  rgdOffset: number
  gdOffset: number
  overHead: number
}

async function readAt (file: string, pos: number, len: number): Promise<Buffer> {
  const fh = await open(file, 'r')
  try {
    const buf = Buffer.alloc(len)
    const { bytesRead } = await fh.read(buf, 0, len, pos)
    return buf.subarray(0, bytesRead)
  } finally {
    await fh.close()
  }
}

export async function writeAt (file: string, pos: number, data: Buffer): Promise<void> {
  const fh = await open(file, 'r+')
  try {
    await fh.write(data, 0, data.length, pos)
  } finally {
    await fh.close()
  }
}

export async function magicOf (file: string): Promise<string> {
  return (await readAt(file, 0, 4)).toString('latin1')
}

export async function readKdmvHeader (file: string): Promise<KdmvHeader> {
  const b = await readAt(file, 0, SECTOR)
  if (b.length < 80 || b.toString('latin1', 0, 4) !== KDMV) throw new Error(`${file}: not a KDMV file`)
  const n = (off: number): number => Number(b.readBigUInt64LE(off))
  return {
    version: b.readUInt32LE(4),
    flags: b.readUInt32LE(8),
    capacity: n(12),
    grainSize: n(20),
    descriptorOffset: n(28),
    descriptorSize: n(36),
    numGTEsPerGT: b.readUInt32LE(44),
    rgdOffset: n(48),
    gdOffset: n(56),
    overHead: n(64)
  }
}

/**
 * The descriptor text of a file: the embedded one of a KDMV file, the whole text of a stand-alone
 * descriptor; null for extent-only files (raw, COWD, split KDMV extents with an empty area).
 */
export async function readDescriptorText (file: string): Promise<string | null> {
  const head = await readAt(file, 0, SECTOR)
  const magic = head.toString('latin1', 0, 4)
  let text: string
  if (magic === KDMV) {
    const h = await readKdmvHeader(file)
    if (h.descriptorOffset === 0 || h.descriptorSize === 0) return null
    text = (await readAt(file, h.descriptorOffset * SECTOR, h.descriptorSize * SECTOR)).toString('latin1')
  } else if (magic === COWD) {
    return null
  } else {
    const start = head.toString('latin1', 0, 64).trimStart()
    if (!start.startsWith('#') && !start.startsWith('version=')) return null
    text = (await readAt(file, 0, 128 * 1024)).toString('latin1')
  }
  const nul = text.indexOf('\0')
  if (nul >= 0) text = text.slice(0, nul)
  return /createType\s*=/.test(text) ? text : null
}

export async function mustReadDescriptor (file: string): Promise<string> {
  const t = await readDescriptorText(file)
  if (t === null) throw new Error(`${file}: no descriptor`)
  return t
}

/** Value of a header key (quotes removed), undefined when absent. */
export function descriptorField (text: string, key: string): string | undefined {
  const m = new RegExp(`^\\s*${key}\\s*=\\s*"?([^"\\r\\n]*)"?\\s*$`, 'mi').exec(text)
  return m?.[1]
}

export interface LayerInfo {
  file: string
  cid: number
  parentCID: number
  hint?: string
  createType?: string
}

export async function layerInfo (file: string): Promise<LayerInfo> {
  const text = await mustReadDescriptor(file)
  const cid = descriptorField(text, 'CID')
  const pcid = descriptorField(text, 'parentCID')
  return {
    file,
    cid: cid === undefined ? NaN : parseInt(cid, 16),
    parentCID: pcid === undefined ? 0xffffffff : parseInt(pcid, 16),
    hint: descriptorField(text, 'parentFileNameHint'),
    createType: descriptorField(text, 'createType')
  }
}

/**
 * Rewrite a file's descriptor. KDMV: the embedded area is rewritten NUL-padded (must fit);
 * stand-alone descriptors are rewritten whole.
 */
export async function patchDescriptor (file: string, edit: (text: string) => string): Promise<void> {
  const text = await mustReadDescriptor(file)
  const next = edit(text)
  if ((await magicOf(file)) === KDMV) {
    const h = await readKdmvHeader(file)
    const area = Buffer.alloc(h.descriptorSize * SECTOR)
    if (Buffer.byteLength(next, 'latin1') > area.length) throw new Error(`${file}: descriptor does not fit`)
    area.write(next, 0, 'latin1')
    await writeAt(file, h.descriptorOffset * SECTOR, area)
  } else {
    await writeFile(file, next, 'latin1')
  }
}

/** Set (or add after createType) a header key in a descriptor text. */
export function setField (text: string, key: string, value: string, quoted: boolean): string {
  const v = quoted ? `"${value}"` : value
  const re = new RegExp(`^(\\s*${key}\\s*=).*$`, 'm')
  if (re.test(text)) return text.replace(re, `${key}=${v}`)
  return text.replace(/^(createType=.*)$/m, `$1\n${key}=${v}`)
}

export function cidText (cid: number): string {
  return cid.toString(16)
}

/** Chain files from the base to `top`, following parentFileNameHint (relative to each file). */
export async function chainFiles (top: string): Promise<string[]> {
  const out: string[] = []
  let cur: string | undefined = path.resolve(top)
  while (cur !== undefined) {
    if (out.includes(cur)) throw new Error(`loop at ${cur}`)
    out.unshift(cur)
    const info: LayerInfo = await layerInfo(cur)
    cur = info.hint !== undefined && info.parentCID !== 0xffffffff
      ? path.resolve(path.dirname(cur), info.hint)
      : undefined
  }
  return out
}

/** Problems in the CID links of the chain ending at `top` (empty when every link holds). */
export async function cidLinkProblems (top: string): Promise<string[]> {
  const files = await chainFiles(top)
  const problems: string[] = []
  for (let i = 1; i < files.length; i++) {
    const parent = await layerInfo(files[i - 1])
    const child = await layerInfo(files[i])
    if (child.parentCID !== parent.cid) {
      problems.push(`${path.basename(files[i])} parentCID ${cidText(child.parentCID)} != CID ${cidText(parent.cid)} of ${path.basename(files[i - 1])}`)
    }
  }
  const base = await layerInfo(files[0])
  if (base.parentCID !== 0xffffffff) problems.push(`${path.basename(files[0])} has parentCID ${cidText(base.parentCID)} but no parent`)
  return problems
}

/**
 * Descriptor files in `dir` that no other descriptor in `dir` names as its parent: the chain
 * tops. Extent-only files (-flat, -sNNN, -delta) are not layers and are skipped.
 */
export async function findTops (dir: string): Promise<string[]> {
  const layers: LayerInfo[] = []
  for (const name of (await readdir(dir)).sort()) {
    if (!name.endsWith('.vmdk')) continue
    const f = path.join(dir, name)
    if ((await readDescriptorText(f)) === null) continue
    layers.push(await layerInfo(f))
  }
  const parents = new Set(layers.filter(l => l.hint !== undefined).map(l => path.resolve(dir, l.hint as string)))
  return layers.map(l => l.file).filter(f => !parents.has(f))
}

// ---------------------------------------------------------------------------------------------
// KDMV grain tables

/** Byte position of the GTE of grain `grain` (extent-relative) in the primary or redundant GT. */
export async function gtePosition (file: string, grain: number, redundant = false): Promise<number> {
  const h = await readKdmvHeader(file)
  const gdi = Math.floor(grain / h.numGTEsPerGT)
  const gti = grain % h.numGTEsPerGT
  const gd = redundant ? h.rgdOffset : h.gdOffset
  const gdEntry = (await readAt(file, gd * SECTOR + gdi * 4, 4)).readUInt32LE(0)
  if (gdEntry === 0) throw new Error(`${file}: no GT for grain ${grain}`)
  return gdEntry * SECTOR + gti * 4
}

export async function readU32 (file: string, pos: number): Promise<number> {
  return (await readAt(file, pos, 4)).readUInt32LE(0)
}

export async function writeU32 (file: string, pos: number, value: number): Promise<void> {
  const b = Buffer.alloc(4)
  b.writeUInt32LE(value >>> 0, 0)
  await writeAt(file, pos, b)
}
