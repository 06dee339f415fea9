/**
 * The VMware .vmx file: which disks a VM has and in which mode. redofs rewrites only the
 * `fileName` value of a disk whose chain top changed and keeps every other byte as it found it.
 */
import { readdir } from 'node:fs/promises'
import { dirname, join, relative, resolve } from 'node:path'
import { Mutex, readStoreFile, realOrResolved, writeFileDurable } from './extent'

export type DiskMode = 'persistent' | 'nonpersistent' | 'undoable' | 'append'

export interface VmxDisk {
  /** Device key, e.g. "scsi0:0". */
  device: string
  fileName: string
  mode: DiskMode
}

const DEVICE_RE = /^\s*((?:scsi|ide|sata|nvme)\d+:\d+)\.(fileName|mode|present|deviceType)\s*=\s*"([^"]*)"\s*$/i

export function parseMode (v: string | undefined): DiskMode {
  switch ((v ?? '').toLowerCase()) {
    case 'nonpersistent':
    case 'independent-nonpersistent':
      return 'nonpersistent'
    case 'undoable':
      return 'undoable'
    case 'append':
      return 'append'
    default:
      return 'persistent'
  }
}

export class Vmx {
  /** One rewrite at a time: every rewrite goes through the same temporary file. */
  private readonly writing = new Mutex()

  constructor (readonly path: string, private lines: string[]) {}

  static async read (path: string): Promise<Vmx> {
    const text = (await readStoreFile(path)).toString('utf8')
    return new Vmx(path, text.split('\n'))
  }

  disks (): VmxDisk[] {
    const dev = new Map<string, Record<string, string>>()
    for (const l of this.lines) {
      const m = DEVICE_RE.exec(l)
      if (m === null) continue
      const d = dev.get(m[1].toLowerCase()) ?? {}
      d[m[2].toLowerCase()] = m[3]
      dev.set(m[1].toLowerCase(), d)
    }
    const out: VmxDisk[] = []
    for (const [device, d] of dev) {
      if (d.filename === undefined || !/\.vmdk$/i.test(d.filename)) continue
      if (d.present !== undefined && d.present.toUpperCase() === 'FALSE') continue
      if (d.devicetype !== undefined && /cdrom/i.test(d.devicetype)) continue
      out.push({ device, fileName: d.filename, mode: parseMode(d.mode) })
    }
    return out
  }

  /** Point `device`'s fileName at `fileName`, durably; other lines are untouched. */
  async setFileName (device: string, fileName: string): Promise<void> {
    await this.writing.run(async () => await this.rewrite(device, fileName))
  }

  private async rewrite (device: string, fileName: string): Promise<void> {
    let changed = false
    this.lines = this.lines.map(l => {
      const m = DEVICE_RE.exec(l)
      if (m === null || m[1].toLowerCase() !== device.toLowerCase() || m[2].toLowerCase() !== 'filename') return l
      if (m[3] === fileName) return l
      changed = true
      return l.replace(/"[^"]*"(\s*)$/, (_all, tail: string) => `"${fileName}"${tail}`) // a function: '$' in names stays literal
    })
    if (changed) await writeFileDurable(this.path, this.lines.join('\n'))
  }
}

/**
 * After an offline command changed a chain: every .vmx in `top`'s directory with a disk naming
 * a file of the chain as it was (`before`, its layers' paths) names the new top. Returns the
 * .vmx files rewritten.
 */
export async function pointVmxAt (before: string[], top: string): Promise<string[]> {
  const dir = dirname(top)
  const was = new Set(await Promise.all(before.map(realOrResolved)))
  const now = await realOrResolved(top)
  const out: string[] = []
  for (const f of (await readdir(dir)).filter(n => /\.vmx$/i.test(n))) {
    const vmx = await Vmx.read(join(dir, f))
    for (const d of vmx.disks()) {
      const named = await realOrResolved(resolve(dir, d.fileName))
      if (named === now || !was.has(named)) continue
      await vmx.setFileName(d.device, relative(dir, top))
      if (!out.includes(vmx.path)) out.push(vmx.path)
    }
  }
  return out
}
