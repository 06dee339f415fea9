/** Stores laid out as <tmp>/store/<vm>/ with VMware-named chains built by qemu. */
import { mkdir } from 'node:fs/promises'
import path from 'node:path'
import { buildChain, convertToRaw, type LayerSpec, type QWrite } from './qemu'

export interface StoreChain {
  root: string
  store: string
  vmDir: string
  /** Chain files, base first: disk.vmdk, disk-000001.vmdk, ... */
  files: string[]
  /** `<store>/<vm>/disk`, the disk path the offline commands take. */
  disk: string
}

export function redoName (disk: string, n: number): string {
  return n === 0 ? `${disk}.vmdk` : `${disk}-${String(n).padStart(6, '0')}.vmdk`
}

/** Build base + redo logs in <root>/store/<vm>/ named disk.vmdk, disk-000001.vmdk, ... */
export async function storeChain (root: string, size: number, layers: Array<Omit<LayerSpec, 'name'>>,
  vm = 'vm1', disk = 'disk'): Promise<StoreChain> {
  const store = path.join(root, 'store')
  const vmDir = path.join(store, vm)
  await mkdir(vmDir, { recursive: true })
  const named = layers.map((l, i) => ({ ...l, name: redoName(disk, i) }))
  const files = await buildChain(vmDir, size, named)
  return { root, store, vmDir, files, disk: path.join(vmDir, disk) }
}

/** Writes for a 16 MiB base + 3 redo logs that overlap each other, unaligned, across grains. */
export const FOUR_LEVELS: QWrite[][] = [
  [
    { pattern: 0x10, offset: 0, length: 1024 * 1024 },
    { pattern: 0x11, offset: 7 * 1048576 - 3, length: 200000 },
    { pattern: 0x12, offset: 16 * 1048576 - 512, length: 512 }
  ],
  [
    { pattern: 0x20, offset: 65536 - 100, length: 200 },
    { pattern: 0x21, offset: 3 * 1048576 + 7, length: 150000 },
    { pattern: 'zero', offset: 7 * 1048576, length: 65536 }
  ],
  [
    { pattern: 0x30, offset: 65536 - 50, length: 100 },
    { pattern: 0x31, offset: 3 * 1048576 + 65536, length: 65536 },
    { pattern: 0x32, offset: 12 * 1048576 + 1, length: 1 },
    { pattern: 'zero', offset: 0, length: 4096 }
  ],
  [
    { pattern: 0x40, offset: 65536 - 10, length: 20 },
    { pattern: 0x41, offset: 7 * 1048576 + 100, length: 100 },
    { pattern: 0x42, offset: 15 * 1048576, length: 1048576 }
  ]
]

/** qemu-img convert of every chain file (generation g = file g) into <root>/<tag>-g<g>.raw. */
export async function convertAll (files: string[], root: string, tag: string): Promise<string[]> {
  const out: string[] = []
  for (let g = 0; g < files.length; g++) {
    const p = path.join(root, `${tag}-g${g}.raw`)
    await convertToRaw(files[g], p)
    out.push(p)
  }
  return out
}
