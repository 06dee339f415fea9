/** Mapping mount paths to store objects (SPEC §2). No I/O here. */
import type { Disk, Generation } from '../store/disk'
import type { Store, Vm } from '../store/store'
import { VM_COMMANDS } from '../store/tops'

export const DISK_COMMANDS = ['addredo', 'commit', 'discard', 'label', 'poweroff', 'job'] as const

export type Node =
  | { kind: 'dir', names: () => string[] }
  | { kind: 'image', disk: Disk, gen: Generation | 'live' }
  | { kind: 'command', command: string, disk?: Disk, vm: Vm }
  | { kind: 'info', text: () => string }
  | { kind: 'link', target: string }

const json = (v: unknown): string => JSON.stringify(v, null, 2) + '\n'

function imageNames (vm: Vm): string[] {
  const out: string[] = []
  for (const d of vm.disks.values()) {
    out.push(`${d.name}.img`)
    for (let g = 0; g < d.chain.redoCount; g++) out.push(`${d.name}@${g}.img`)
    for (const l of d.labels().keys()) out.push(`${d.name}@${l}.img`)
  }
  return out
}

export function resolvePath (store: Store, path: string): Node | undefined {
  const parts = path.split('/').filter(p => p !== '')
  if (parts.length === 0) return { kind: 'dir', names: () => ['.ctl', ...store.vms.keys()] }
  if (parts[0] === '.ctl') return resolveCtl(store, parts.slice(1))
  const vm = store.vms.get(parts[0])
  if (vm === undefined) return undefined
  if (parts.length === 1) return { kind: 'dir', names: () => imageNames(vm) }
  if (parts.length !== 2) return undefined
  if (!parts[1].endsWith('.img')) return undefined
  const stem = parts[1].slice(0, -'.img'.length)
  // a disk whose own name holds '@' is its live file; otherwise the last '@' names a generation
  const whole = vm.disks.get(stem)
  if (whole !== undefined) return { kind: 'image', disk: whole, gen: 'live' }
  const m = /^(.+)@([^@/]+)$/.exec(stem)
  if (m === null) return undefined
  const disk = vm.disks.get(m[1])
  if (disk === undefined) return undefined
  if (!/^\d+$/.test(m[2])) {
    const g = disk.labels().get(m[2])
    return g === undefined ? undefined : { kind: 'link', target: `${disk.name}@${g}.img` }
  }
  const gen = disk.generationAt(Number(m[2]))
  if (gen === undefined || String(Number(m[2])) !== m[2]) return undefined
  return { kind: 'image', disk, gen }
}

function resolveCtl (store: Store, parts: string[]): Node | undefined {
  if (parts.length === 0) return { kind: 'dir', names: () => ['status', ...store.vms.keys()] }
  if (parts.length === 1 && parts[0] === 'status') return { kind: 'info', text: () => json(store.status()) }
  const vm = store.vms.get(parts[0])
  if (vm === undefined) return undefined
  if (parts.length === 1) return { kind: 'dir', names: () => [...VM_COMMANDS, 'status', 'error', ...vm.disks.keys()] }
  const name = parts[1]
  if (parts.length === 2) {
    if ((VM_COMMANDS as readonly string[]).includes(name)) return { kind: 'command', command: name, vm }
    if (name === 'status') return { kind: 'info', text: () => json(store.vmStatus(vm)) }
    if (name === 'error') return { kind: 'info', text: () => vm.lastError === '' ? '' : vm.lastError + '\n' }
    const disk = vm.disks.get(name)
    if (disk === undefined) return undefined
    return {
      kind: 'dir',
      names: () => [...DISK_COMMANDS, 'status', 'map', ...Array.from({ length: disk.chain.redoCount }, (_, g) => `map@${g}`), 'error']
    }
  }
  if (parts.length !== 3) return undefined
  const disk = vm.disks.get(name)
  if (disk === undefined) return undefined
  const file = parts[2]
  if ((DISK_COMMANDS as readonly string[]).includes(file)) return { kind: 'command', command: file, disk, vm }
  if (file === 'status') return { kind: 'info', text: () => json(disk.status()) }
  if (file === 'error') return { kind: 'info', text: () => disk.lastError === '' ? '' : disk.lastError + '\n' }
  if (file === 'map') return { kind: 'info', text: () => json(disk.chain.map(disk.chain.redoCount)) }
  const mm = /^map@(\d+)$/.exec(file)
  if (mm !== null) {
    const g = Number(mm[1])
    if (g >= disk.chain.redoCount) return undefined
    return {
      kind: 'info',
      text: () => {
        const busy = disk.fluxRefusal(g)
        if (busy !== undefined) {
          disk.lastError = busy.message // as a refused image open does (mount.ts)
          throw busy
        }
        return json(disk.chain.map(g))
      }
    }
  }
  return undefined
}
