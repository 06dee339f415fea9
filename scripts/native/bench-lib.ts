/**
 * Shared by scripts/bench.ts and scripts/bench-soak.ts: child processes, the 2 GiB test chain,
 * servers (redofs, qemu-storage-daemon, the fuse-native passthrough), dd/fio runs, statistics.
 * Everything it creates lives under /tmp/redofs-bench-*; mounts are undone by stop() and, as a
 * last resort, by sweepMounts() from an exit hook.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, writeSync } from 'node:fs'
import { join, resolve } from 'node:path'

export const ROOT = resolve(__dirname, '..', '..', '..')
export const REDOFS = join(ROOT, 'bin', 'redofs')
export const BENCH_PREFIX = '/tmp/redofs-bench-'
export const MiB = 2 ** 20
export const GiB = 2 ** 30

export const log = (msg: string): void => { process.stderr.write(`${msg}\n`) }
export const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

export interface RunResult { code: number | null, signal: NodeJS.Signals | null, stdout: string, stderr: string }

/** Run a command to completion, capturing its output. Never throws. */
export async function run (cmd: string, args: string[], opts: { cwd?: string, env?: NodeJS.ProcessEnv, input?: string } = {}): Promise<RunResult> {
  return await new Promise(resolve => {
    const c = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    c.stdout?.setEncoding('utf8').on('data', (d: string) => { stdout += d })
    c.stderr?.setEncoding('utf8').on('data', (d: string) => { stderr += d })
    c.on('error', e => { stderr += String(e); resolve({ code: 127, signal: null, stdout, stderr }) })
    c.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }))
    if (opts.input !== undefined) {
      c.stdin?.on('error', () => {})
      c.stdin?.end(opts.input)
    }
  })
}

/** Run a command; throw with its stderr when it fails. */
export async function must (cmd: string, args: string[], opts: { cwd?: string, env?: NodeJS.ProcessEnv, input?: string } = {}): Promise<RunResult> {
  const r = await run(cmd, args, opts)
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ').slice(0, 300)} failed (${r.code ?? r.signal}): ${r.stderr.trim().slice(-2000)}`)
  return r
}

export const redofs = async (...args: string[]): Promise<RunResult> => await must(process.execPath, [REDOFS, ...args])

export function benchDir (tag: string): string {
  return mkdtempSync(`${BENCH_PREFIX}${tag}-`)
}

export function have (cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0
}

/** apt-get install what is missing, loudly; throws when that is impossible. */
export function ensureTools (tools: Record<string, string>): void {
  const missing = Object.entries(tools).filter(([cmd]) => !have(cmd))
  if (missing.length === 0) return
  const pkgs = [...new Set(missing.map(([, pkg]) => pkg))]
  log(`bench: ${missing.map(([c]) => c).join(', ')} missing: apt-get install -y ${pkgs.join(' ')}`)
  if (process.getuid?.() !== 0) throw new Error(`not root: run apt-get install -y ${pkgs.join(' ')}`)
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }
  let r = spawnSync('apt-get', ['install', '-y', '-qq', ...pkgs], { stdio: 'inherit', env })
  if (r.status !== 0) {
    spawnSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env })
    r = spawnSync('apt-get', ['install', '-y', '-qq', ...pkgs], { stdio: 'inherit', env })
  }
  const still = missing.filter(([cmd]) => !have(cmd))
  if (r.status !== 0 || still.length > 0) throw new Error(`could not install ${pkgs.join(' ')}`)
}

export function dropCaches (): void {
  spawnSync('sync')
  const fd = openSync('/proc/sys/vm/drop_caches', 'w')
  try { writeSync(fd, '3\n') } finally { closeSync(fd) }
}

export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  if (s.length === 0) return NaN
  return s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

/** Deterministic PRNG (mulberry32) so every run builds the same chain. */
export function prng (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

// ---------------------------------------------------------------------------------------------
// the chain

export const GRAIN = 64 * 1024

export interface TestChain {
  dir: string
  store: string
  vmDir: string
  /** <store>/vm/disk: the argument of redofs addredo/commit */
  disk: string
  size: number
  /** chain files, generation g = files[g] */
  files: string[]
  /** grains written into each redo log */
  grainsPerRedo: number[]
}

/**
 * Pick `fraction` of the grains of a `size`-byte disk as runs of 1..16 grains at random places,
 * merged into qemu-io write commands with a byte pattern per run.
 */
export function scatterWrites (size: number, fraction: number, seed: number): { cmds: string[], grains: number } {
  const total = size / GRAIN
  const want = Math.round(total * fraction)
  const taken = new Uint8Array(total)
  const rnd = prng(seed)
  let n = 0
  while (n < want) {
    const len = 1 + Math.floor(rnd() * 16)
    const start = Math.floor(rnd() * total)
    for (let g = start; g < Math.min(total, start + len) && n < want; g++) {
      if (taken[g] === 0) { taken[g] = 1; n++ }
    }
  }
  const cmds: string[] = []
  let g = 0
  while (g < total) {
    if (taken[g] === 0) { g++; continue }
    let e = g
    while (e < total && taken[e] === 1) e++
    cmds.push('-c', `write -P ${1 + ((g * 7 + seed) % 254)} ${g * GRAIN} ${(e - g) * GRAIN}`)
    g = e
  }
  return { cmds, grains: n }
}

/**
 * Build <dir>/store/vm/disk: a fully allocated monolithicSparse base (made by `redofs create`,
 * filled by qemu-io with a different byte pattern every 64 MiB) and one redo log per entry of
 * `redoFractions` (made by `redofs addredo`, each rewriting that fraction of the grains in runs
 * of 1..16 grains at random places).
 */
export async function buildChain (dir: string, opts: { size?: number, redoFractions?: number[], seed?: number } = {}): Promise<TestChain> {
  const size = opts.size ?? 2 * GiB
  const fractions = opts.redoFractions ?? [0.25, 0.10]
  const seed = opts.seed ?? 1
  const store = join(dir, 'store')
  const vmDir = join(store, 'vm')
  const disk = join(vmDir, 'disk')
  await redofs('create', disk, '--size', String(size))
  const files = [join(vmDir, 'disk.vmdk')]
  const fill: string[] = []
  const chunk = 64 * MiB
  for (let off = 0; off < size; off += chunk) fill.push('-c', `write -P ${0x10 + (off / chunk) % 200} ${off} ${Math.min(chunk, size - off)}`)
  await must('qemu-io', ['-t', 'unsafe', '-f', 'vmdk', ...fill, files[0]])
  const grainsPerRedo: number[] = []
  for (let i = 0; i < fractions.length; i++) {
    await redofs('addredo', disk)
    const top = join(vmDir, `disk-${String(i + 1).padStart(6, '0')}.vmdk`)
    if (!existsSync(top)) throw new Error(`addredo did not create ${top}`)
    files.push(top)
    const { cmds, grains } = scatterWrites(size, fractions[i], seed * 100 + i + 1)
    // one qemu-io process (one open, one CID change) per redo log; argv stays well below ARG_MAX
    await must('qemu-io', ['-t', 'unsafe', '-f', 'vmdk', ...cmds, top])
    grainsPerRedo.push(grains)
  }
  // qemu-io ran with cache=unsafe (no flushes: 10x faster to build); write it all out once
  await must('sync', [])
  return { dir, store, vmDir, disk, size, files, grainsPerRedo }
}

/** A raw copy of generation `g` (qemu-img convert of files[g]). */
export async function rawOf (chain: TestChain, g: number, out: string): Promise<string> {
  await must('qemu-img', ['convert', '-f', 'vmdk', '-O', 'raw', '-S', '0', chain.files[g], out])
  return out
}

// ---------------------------------------------------------------------------------------------
// servers

export interface Server {
  name: string
  child: ChildProcess
  /** the mountpoint (directory, or the regular file of a QSD export) */
  mnt: string
  stderr: () => string
  stop: () => Promise<void>
}

/** Is `path` a mountpoint right now? (mountinfo only; never touches the path) */
export function isMounted (path: string): boolean {
  const target = resolve(path).replace(/ /g, '\\040')
  try {
    return readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some(l => l.split(' ')[4] === target)
  } catch {
    return false
  }
}

/** fusermount -uz every FUSE mount under /tmp/redofs-bench-* (our own leftovers). */
export function sweepMounts (): void {
  let lines: string[] = []
  try { lines = readFileSync('/proc/self/mountinfo', 'utf8').split('\n') } catch { return }
  for (const l of lines) {
    const f = l.split(' ')
    const mp = f[4]
    if (mp === undefined || !mp.startsWith(BENCH_PREFIX)) continue
    spawnSync('fusermount', ['-uz', mp.replace(/\\040/g, ' ')], { stdio: 'ignore' })
  }
}

async function stopChild (child: ChildProcess, mnt: string, timeoutMs = 15000): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) {
    const exited = new Promise<void>(resolve => child.once('exit', () => resolve()))
    child.kill('SIGTERM')
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    await exited
    clearTimeout(t)
  }
  if (isMounted(mnt)) spawnSync('fusermount', ['-uz', mnt], { stdio: 'ignore' })
}

/** Spawn a server and wait until `ready(stdout+stderr so far)` holds or it dies. */
async function startServer (name: string, cmd: string, args: string[], mnt: string, ready: (out: string) => boolean, opts: { env?: NodeJS.ProcessEnv, timeoutMs?: number } = {}): Promise<Server> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env })
  let out = ''
  child.stdout?.setEncoding('utf8').on('data', (d: string) => { out += d })
  child.stderr?.setEncoding('utf8').on('data', (d: string) => { out += d })
  const t0 = Date.now()
  const limit = opts.timeoutMs ?? 30000
  while (!ready(out)) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${name} exited (${child.exitCode ?? child.signalCode}): ${out.trim().slice(-2000)}`)
    if (Date.now() - t0 > limit) {
      await stopChild(child, mnt)
      throw new Error(`${name} not ready after ${limit} ms: ${out.trim().slice(-2000)}`)
    }
    await sleep(5)
  }
  return { name, child, mnt, stderr: () => out, stop: async () => await stopChild(child, mnt) }
}

export interface RedofsServerOptions {
  /** extra node flags, e.g. --cpu-prof */
  nodeArgs?: string[]
  env?: NodeJS.ProcessEnv
}

/** `redofs mount store mnt`, ready when it prints "mounted". */
export async function mountRedofs (store: string, mnt: string, opts: RedofsServerOptions = {}): Promise<Server & { readyMs: number }> {
  const t0 = process.hrtime.bigint()
  const s = await startServer('redofs', process.execPath, [...(opts.nodeArgs ?? []), REDOFS, 'mount', store, mnt], mnt, out => /mounted .* at /.test(out), { env: opts.env })
  return { ...s, readyMs: Number(process.hrtime.bigint() - t0) / 1e6 }
}

/**
 * qemu-storage-daemon exporting the vmdk chain whose top is `top` through FUSE at `file` (a
 * regular file that must exist). Ready when the export shows up in mountinfo.
 */
export async function mountQsd (top: string, file: string, writable: boolean): Promise<Server> {
  if (!existsSync(file)) closeSync(openSync(file, 'w'))
  // read-only nodes take shared locks only, so several daemons (and redofs) can open the chain
  const ro = writable ? '' : ',read-only=on'
  const args = [
    '--blockdev', `driver=file,node-name=f,filename=${top}${ro}`,
    '--blockdev', `driver=vmdk,node-name=v,file=f${ro}`,
    '--export', `type=fuse,id=e,node-name=v,mountpoint=${file},writable=${writable ? 'on' : 'off'}`
  ]
  return await startServer('qsd', 'qemu-storage-daemon', args, file, () => isMounted(file))
}

/** The fuse-native passthrough of one raw file (dist/scripts/bench-passthrough.js): <mnt>/disk.img; cached: no direct_io, kernel_cache. */
export async function mountPassthrough (raw: string, mnt: string, opts: { cached?: boolean, env?: NodeJS.ProcessEnv } = {}): Promise<Server> {
  const script = join(ROOT, 'dist', 'scripts', 'bench-passthrough.js')
  const args = [script, raw, mnt]
  if (opts.cached === true) args.push('--cached')
  return await startServer('passthrough', process.execPath, args, mnt, out => out.includes('READY'), { env: opts.env })
}

// ---------------------------------------------------------------------------------------------
// load

export interface Xfer { bytes: number, seconds: number, MBps: number }

/** dd; figures from dd's own summary line (MB = 10^6 bytes). */
export async function dd (args: string[]): Promise<Xfer> {
  const r = await must('dd', args)
  const m = /(\d+) bytes .* copied, ([\d.e+-]+) s/.exec(r.stderr)
  if (m === null) throw new Error(`dd: no summary in ${r.stderr}`)
  const bytes = Number(m[1])
  const seconds = Number(m[2])
  return { bytes, seconds, MBps: bytes / seconds / 1e6 }
}

/** Sequential read of `bytes` from `file` at offset 0 with block size `bs`. */
export async function ddRead (file: string, bs: number, bytes: number, direct = false): Promise<Xfer> {
  const args = [`if=${file}`, 'of=/dev/null', `bs=${bs}`, `count=${Math.floor(bytes / bs)}`]
  if (direct) args.push('iflag=direct')
  return await dd(args)
}

/** Sequential write of `bytes` from `src` (a file in page cache) into `file` at byte `offset`. */
export async function ddWrite (src: string, file: string, bs: number, bytes: number, offset: number, extra: string[] = []): Promise<Xfer> {
  if (offset % bs !== 0) throw new Error('offset must be a multiple of bs')
  return await dd([`if=${src}`, `of=${file}`, `bs=${bs}`, `count=${Math.floor(bytes / bs)}`, `seek=${offset / bs}`, 'conv=notrunc', ...extra])
}

export interface FioResult { iops: number, MBps: number, latUsMean: number }

/** fio random 4k reads for `seconds` over the whole file (O_DIRECT unless told otherwise). */
export async function fioRandRead (file: string, opts: { seconds: number, jobs?: number, iodepth?: number, direct?: boolean, size?: number }): Promise<FioResult> {
  const args = [
    '--name=rr', `--filename=${file}`, '--rw=randread', '--bs=4k', '--ioengine=psync',
    `--direct=${opts.direct === false ? 0 : 1}`, `--numjobs=${opts.jobs ?? 1}`, '--group_reporting',
    '--time_based', `--runtime=${opts.seconds}`, '--output-format=json', '--randrepeat=1', '--norandommap'
  ]
  if (opts.size !== undefined) args.push(`--size=${opts.size}`)
  const r = await must('fio', args)
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')))
  const read = j.jobs[0].read
  return { iops: read.iops, MBps: read.bw_bytes / 1e6, latUsMean: read.lat_ns.mean / 1000 }
}

/**
 * fio random 4k writes, each followed by fsync (a database's pattern), for `seconds` over
 * [offset, offset + size) of the file, through the page cache. iops counts writes; latUsMean is
 * the mean fsync latency.
 */
export async function fioSyncedWrite (file: string, opts: { seconds: number, offset: number, size: number }): Promise<FioResult> {
  const r = await must('fio', [
    '--name=sw', `--filename=${file}`, '--rw=randwrite', '--bs=4k', '--ioengine=psync', '--direct=0', '--fsync=1',
    `--offset=${opts.offset}`, `--size=${opts.size}`, '--time_based', `--runtime=${opts.seconds}`,
    '--output-format=json', '--randrepeat=1'
  ])
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')))
  const w = j.jobs[0].write
  return { iops: w.iops, MBps: w.bw_bytes / 1e6, latUsMean: j.jobs[0].sync.lat_ns.mean / 1000 }
}

/** Resident set of a process, in MiB: current and peak. */
export function rssOf (pid: number): { rssMiB: number, hwmMiB: number } {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8')
  const kb = (k: string): number => Number((new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(s) ?? [0, 0])[1])
  return { rssMiB: kb('VmRSS') / 1024, hwmMiB: kb('VmHWM') / 1024 }
}

/** Number of threads of a process. */
export function threadsOf (pid: number): number {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8')
  return Number((/^Threads:\s+(\d+)/m.exec(s) ?? [0, 0])[1])
}
