/** VMware file naming for chains: disk names and the next redo log name (VMDK.md §8.1). */
import { readdir } from 'node:fs/promises'
import { basename, join } from 'node:path'

/** `disk-000002.vmdk` → `disk`; `disk.vmdk.REDO` → `disk`; `disk.vmdk` → `disk`. */
export function diskNameOf (file: string): string {
  let n = basename(file)
  n = n.replace(/(\.REDO(_[A-Za-z0-9]+)?)+$/i, '')
  n = n.replace(/\.vmdk$/i, '')
  n = n.replace(/-\d{6}$/, '')
  return n
}

const escapeRe = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')

/** `<disk>-NNNNNN.vmdk` with NNNNNN one above every redo number already used in `dir`. */
export async function nextRedoPath (dir: string, disk: string): Promise<string> {
  const re = new RegExp(`^${escapeRe(disk)}-(\\d{6})(?:-[a-z]+\\d*)?\\.vmdk$`, 'i')
  let max = 0
  for (const n of await readdir(dir)) {
    const m = re.exec(n.replace(/^\./, '').replace(/\.redofs-new$/, ''))
    if (m !== null) max = Math.max(max, Number(m[1]))
  }
  return join(dir, `${disk}-${String(max + 1).padStart(6, '0')}.vmdk`)
}
