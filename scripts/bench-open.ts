/**
 * How fast and how small is opening a huge sparse chain? Builds a 2 TiB chain (base + one redo
 * log) with a little data scattered over it, then opens it in fresh processes and prints the
 * open time and memory. Usage: node dist/scripts/bench-open.js [--allocated MiB] [--runs N]
 * A measurement, not a test: figures go to README by hand.
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

const args = process.argv.slice(2)
const opt = (name: string, def: number): number => {
  const i = args.indexOf(`--${name}`)
  return i >= 0 ? Number(args[i + 1]) : def
}
const allocatedMiB = opt('allocated', 64)
const runs = opt('runs', 5)
const root = resolve(__dirname, '..', '..')
const redofs = join(root, 'bin', 'redofs')

const dir = mkdtempSync(join(tmpdir(), 'redofs-bench-open-'))
try {
  const vm = join(dir, 'vm')
  execFileSync(process.execPath, [redofs, 'create', join(vm, 'disk'), '--size', '2T'])
  execFileSync(process.execPath, [redofs, 'addredo', join(vm, 'disk')])
  // scatter 1 MiB writes over the whole capacity with qemu-io (one process, many commands)
  const cmds: string[] = []
  const step = Math.floor((2 * 2 ** 40) / allocatedMiB / 2 ** 20) * 2 ** 20
  for (let i = 0; i < allocatedMiB; i++) cmds.push('-c', `write -P ${(i % 250) + 1} ${i * step} 1M`)
  execFileSync('qemu-io', ['-f', 'vmdk', ...cmds, join(vm, 'disk-000001.vmdk')], { stdio: 'ignore', maxBuffer: 1 << 26 })
  const probe = `
    const { Chain } = require(${JSON.stringify(join(root, 'dist', 'src', 'chain', 'chain.js'))})
    const t0 = process.hrtime.bigint()
    Chain.open(${JSON.stringify(join(vm, 'disk-000001.vmdk'))}, { writable: true }).then(async c => {
      const ms = Number(process.hrtime.bigint() - t0) / 1e6
      const b = Buffer.alloc(65536); await c.read(1, b, 0, 0, b.length)
      const rss = process.memoryUsage().rss
      await c.close()
      console.log(JSON.stringify({ ms, rssMiB: rss / 2 ** 20, maxRssMiB: process.resourceUsage().maxRSS / 1024 }))
    })`
  const results: Array<{ ms: number, rssMiB: number, maxRssMiB: number }> = []
  for (let r = 0; r < runs; r++) {
    const out = spawnSync(process.execPath, ['-e', probe], { encoding: 'utf8' })
    if (out.status !== 0) throw new Error(out.stderr)
    results.push(JSON.parse(out.stdout))
  }
  const base = spawnSync(process.execPath, ['-e', 'console.log(JSON.stringify({ maxRssMiB: process.resourceUsage().maxRSS / 1024 }))'], { encoding: 'utf8' })
  const median = (xs: number[]): number => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)]
  const summary = {
    chain: '2 TiB monolithicSparse base + monolithicSparse redo log',
    allocatedMiB,
    runs,
    openMsMedian: Number(median(results.map(r => r.ms)).toFixed(1)),
    maxRssMiBMedian: Number(median(results.map(r => r.maxRssMiB)).toFixed(1)),
    nodeBaselineMaxRssMiB: Number(JSON.parse(base.stdout).maxRssMiB.toFixed(1))
  }
  console.log(JSON.stringify(summary, null, 2))
} finally {
  rmSync(dir, { recursive: true, force: true })
}
