/**
 * The VMDK text descriptor: parse, edit, write back. Unknown keys, comments and the change
 * tracking section survive a rewrite untouched; header keys are written `key=value`, DDB keys
 * `ddb.key = "value"`, extents one per line (VMDK.md §2).
 */
import { RedoError } from '../errors'

export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS'
export type ExtentType = 'FLAT' | 'SPARSE' | 'ZERO' | 'VMFS' | 'VMFSSPARSE' | 'SESPARSE' | 'VMFSRDM' | 'VMFSRAW'

export interface ExtentLine {
  access: ExtentAccess
  sectors: number
  type: ExtentType
  file?: string
  offset?: number
}

type Line =
  | { kind: 'header', key: string, value: string, quoted: boolean }
  | { kind: 'extent', extent: ExtentLine }
  | { kind: 'ddb', key: string, value: string }
  | { kind: 'text', text: string }

export const NO_PARENT_CID = 0xffffffff
const KNOWN_EXTENT_TYPES = new Set(['FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'SESPARSE', 'VMFSRDM', 'VMFSRAW'])
const KNOWN_CREATE_TYPES = new Set([
  'monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'vmfs', 'vmfsSparse',
  'seSparse', 'streamOptimized', 'vmfsRaw', 'vmfsRawDeviceMap', 'vmfsPassthroughRawDeviceMap', 'fullDevice',
  'partitionedDevice', 'custom', 'vmfsPreallocated', 'vmfsEagerZeroedThick', 'vmfsThin'
])
const BARE_HEADER_KEYS = new Set(['version', 'cid', 'parentcid'])

export class Descriptor {
  private lines: Line[]

  private constructor (lines: Line[]) {
    this.lines = lines
  }

  /** Parse descriptor text; `file` is only used in error messages. */
  static parse (text: string, file = 'descriptor'): Descriptor {
    const nul = text.indexOf('\0')
    if (nul >= 0) text = text.slice(0, nul)
    const lines: Line[] = []
    let sawVersion = false
    for (const raw of text.split(/\r?\n/)) {
      const line = raw.trim()
      if (line === '' || line.startsWith('#')) { lines.push({ kind: 'text', text: raw.replace(/\r$/, '') }); continue }
      const ext = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"((?:[^"\\]|\\.)*)"(?:\s+(\d+))?)?\s*$/.exec(line)
      if (ext) {
        const type = ext[3].toUpperCase()
        if (!Number.isSafeInteger(Number(ext[2])) || Number(ext[2]) > 2 ** 42) throw new RedoError('EINVAL', `${file}: extent of ${ext[2]} sectors is out of range`, file)
        if (!KNOWN_EXTENT_TYPES.has(type)) throw new RedoError('EINVAL', `${file}: unknown extent type "${ext[3]}"`, file)
        lines.push({
          kind: 'extent',
          extent: {
            access: ext[1] as ExtentAccess,
            sectors: Number(ext[2]),
            type: type as ExtentType,
            file: ext[4],
            offset: ext[5] !== undefined ? Number(ext[5]) : undefined
          }
        })
        continue
      }
      const kv = /^([A-Za-z0-9_.]+)\s*=\s*(.*)$/.exec(line)
      if (!kv) throw new RedoError('EINVAL', `${file}: descriptor line not understood: "${line.slice(0, 80)}"`, file)
      let value = kv[2].trim()
      const quoted = value.startsWith('"') && value.endsWith('"') && value.length >= 2
      if (quoted) value = value.slice(1, -1)
      if (/^ddb\./i.test(kv[1])) lines.push({ kind: 'ddb', key: kv[1], value })
      else {
        if (kv[1].toLowerCase() === 'version') sawVersion = true
        lines.push({ kind: 'header', key: kv[1], value, quoted })
      }
    }
    const d = new Descriptor(lines)
    if (!sawVersion) throw new RedoError('EINVAL', `${file}: not a VMDK descriptor (no version= line)`, file)
    if (d.extents.length === 0) throw new RedoError('EINVAL', `${file}: descriptor lists no extents`, file)
    const ct = d.createType
    if (ct === undefined) throw new RedoError('EINVAL', `${file}: descriptor has no createType`, file)
    if (!KNOWN_CREATE_TYPES.has(ct)) throw new RedoError('EINVAL', `${file}: unknown createType "${ct}"`, file)
    for (const k of ['CID', 'parentCID']) {
      const v = d.get(k)
      if (v !== undefined && !/^[0-9a-fA-F]{1,8}$/.test(v)) throw new RedoError('EINVAL', `${file}: bad ${k} "${v}"`, file)
    }
    return d
  }

  /** A fresh descriptor in the canonical layout. */
  static create (opts: { createType: string, cid: number, parentCID?: number, parentFileNameHint?: string, extents: ExtentLine[], ddb?: Record<string, string> }): Descriptor {
    const lines: Line[] = [
      { kind: 'text', text: '# Disk DescriptorFile' },
      { kind: 'header', key: 'version', value: '1', quoted: false },
      { kind: 'header', key: 'encoding', value: 'UTF-8', quoted: true },
      { kind: 'header', key: 'CID', value: cidHex(opts.cid), quoted: false },
      { kind: 'header', key: 'parentCID', value: cidHex(opts.parentCID ?? NO_PARENT_CID), quoted: false },
      { kind: 'header', key: 'isNativeSnapshot', value: 'no', quoted: true },
      { kind: 'header', key: 'createType', value: opts.createType, quoted: true }
    ]
    if (opts.parentFileNameHint !== undefined) lines.push({ kind: 'header', key: 'parentFileNameHint', value: opts.parentFileNameHint, quoted: true })
    lines.push({ kind: 'text', text: '' }, { kind: 'text', text: '# Extent description' })
    for (const e of opts.extents) lines.push({ kind: 'extent', extent: { ...e } })
    lines.push({ kind: 'text', text: '' }, { kind: 'text', text: '# The Disk Data Base' }, { kind: 'text', text: '#DDB' }, { kind: 'text', text: '' })
    for (const [k, v] of Object.entries(opts.ddb ?? {})) lines.push({ kind: 'ddb', key: k, value: v })
    return new Descriptor(lines)
  }

  clone (): Descriptor {
    return new Descriptor(this.lines.map(l => l.kind === 'extent' ? { kind: 'extent', extent: { ...l.extent } } : { ...l }))
  }

  /** Header or ddb value by key (case-insensitive). */
  get (key: string): string | undefined {
    const k = key.toLowerCase()
    for (const l of this.lines) if ((l.kind === 'header' || l.kind === 'ddb') && l.key.toLowerCase() === k) return l.value
    return undefined
  }

  /** Set a header key (or a ddb.* key); adds it in its section when missing. */
  set (key: string, value: string): void {
    const k = key.toLowerCase()
    for (const l of this.lines) {
      if ((l.kind === 'header' || l.kind === 'ddb') && l.key.toLowerCase() === k) { l.value = value; return }
    }
    if (/^ddb\./i.test(key)) { this.lines.push({ kind: 'ddb', key, value }); return }
    const quoted = !BARE_HEADER_KEYS.has(k)
    let at = -1
    this.lines.forEach((l, i) => { if (l.kind === 'header') at = i })
    this.lines.splice(at + 1, 0, { kind: 'header', key, value, quoted })
  }

  delete (key: string): void {
    const k = key.toLowerCase()
    this.lines = this.lines.filter(l => !((l.kind === 'header' || l.kind === 'ddb') && l.key.toLowerCase() === k))
  }

  /** All ddb keys with a given prefix. */
  ddbEntries (prefix = 'ddb.'): Array<[string, string]> {
    const p = prefix.toLowerCase()
    const out: Array<[string, string]> = []
    for (const l of this.lines) if (l.kind === 'ddb' && l.key.toLowerCase().startsWith(p)) out.push([l.key, l.value])
    return out
  }

  get extents (): ExtentLine[] {
    return this.lines.flatMap(l => l.kind === 'extent' ? [l.extent] : [])
  }

  setExtents (extents: ExtentLine[]): void {
    const first = this.lines.findIndex(l => l.kind === 'extent')
    this.lines = this.lines.filter(l => l.kind !== 'extent')
    this.lines.splice(first < 0 ? this.lines.length : first, 0, ...extents.map(e => ({ kind: 'extent' as const, extent: { ...e } })))
  }

  get createType (): string | undefined { return this.get('createType') }
  get cid (): number { return parseCid(this.get('CID')) }
  set cid (v: number) {
    this.set('CID', cidHex(v))
    const long = this.get('ddb.longContentID')
    if (long !== undefined && /^[0-9a-fA-F]{32}$/.test(long)) this.set('ddb.longContentID', long.slice(0, 24) + cidHex(v))
  }

  get parentCID (): number { return parseCid(this.get('parentCID')) }
  set parentCID (v: number) { this.set('parentCID', cidHex(v)) }
  get parentFileNameHint (): string | undefined { return this.get('parentFileNameHint') }
  set parentFileNameHint (v: string | undefined) {
    if (v === undefined) this.delete('parentFileNameHint')
    else this.set('parentFileNameHint', v)
  }

  /** A layer is a child when it names a parent and parentCID is not ffffffff (VMDK.md §2.3). */
  get hasParent (): boolean {
    return this.parentFileNameHint !== undefined && this.parentFileNameHint !== '' && this.parentCID !== NO_PARENT_CID
  }

  /** Capacity in sectors: the sum of the extent lines. */
  get sectors (): number {
    return this.extents.reduce((s, e) => s + e.sectors, 0)
  }

  toString (): string {
    const out: string[] = []
    for (const l of this.lines) {
      switch (l.kind) {
        case 'text': out.push(l.text); break
        case 'header': out.push(`${l.key}=${l.quoted ? `"${l.value}"` : l.value}`); break
        case 'ddb': out.push(`${l.key} = "${l.value}"`); break
        case 'extent': {
          const e = l.extent
          let s = `${e.access} ${e.sectors} ${e.type}`
          if (e.file !== undefined) s += ` "${e.file}"`
          if (e.offset !== undefined) s += ` ${e.offset}`
          out.push(s)
          break
        }
      }
    }
    while (out.length > 0 && out[out.length - 1] === '') out.pop()
    return out.join('\n') + '\n'
  }
}

export function parseCid (v: string | undefined): number {
  if (v === undefined) return NO_PARENT_CID
  return parseInt(v, 16) >>> 0
}

export function cidHex (v: number): string {
  return (v >>> 0).toString(16).padStart(8, '0')
}

/** A random CID that is neither ffffffff nor fffffffe nor `avoid` (VMDK.md §2.8). */
export function newCid (avoid?: number): number {
  for (;;) {
    const v = (Math.random() * 0x100000000) >>> 0
    if (v !== 0xffffffff && v !== 0xfffffffe && v !== avoid) return v
  }
}

/** qemu-like geometry for a capacity in sectors (lsilogic: 255 heads, 63 sectors). */
export function defaultDdb (sectors: number, cid: number): Record<string, string> {
  const heads = 255
  const spt = 63
  const cyl = Math.min(Math.max(1, Math.ceil(sectors / (heads * spt))), 65535)
  const rnd = (): string => ((Math.random() * 0x100000000) >>> 0).toString(16).padStart(8, '0')
  return {
    'ddb.adapterType': 'lsilogic',
    'ddb.geometry.cylinders': String(cyl),
    'ddb.geometry.heads': String(heads),
    'ddb.geometry.sectors': String(spt),
    'ddb.longContentID': rnd() + rnd() + rnd() + cidHex(cid),
    'ddb.virtualHWVersion': '4'
  }
}
