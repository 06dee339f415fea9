/**
 * End-to-end mounts: the redofs server runs as a CHILD process (`node bin/redofs mount ...`), so
 * the test process may use async fs calls and child processes on the mount. Everything lives
 * under /tmp/redofs-test-* (CI sweeps leftover mounts with that prefix).
 *
 * Teardown never depends on the server's cooperation: after.always sends SIGTERM, waits up to
 * 10 s, SIGKILLs, then unmounts synchronously from /proc/self/mountinfo (fusermount -u, -uz, and
 * the fusectl abort file as a last resort). The same fallback runs in process.on('exit').
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { closeSync, constants, existsSync, openSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { mkdir, open, readdir, readFile, readlink, rm, writeFile } from 'node:fs/promises'
import path from 'node:path'
import type { ExecutionContext, TestFn } from 'ava'
import { REDOFS_BIN, onPath, requireEnv } from './env'
import { describe, run, type RunResult } from './qemu'
import { makeTmpDir } from './tmp'

export const FUSE_INSTALL_HINT = 'install FUSE 2 as root: "apt-get install -y libfuse2 fuse" (bookworm; libfuse2t64 on trixie), ' +
  'then re-run npm ci so fuse-native loads against it'

const ROOT = path.resolve(__dirname, '..', '..', '..')

// ---------------------------------------------------------------------------------------------
// environment

let fuseProblemCache: string | null | undefined

/** Why FUSE cannot be used here, or null when /dev/fuse, fusermount and libfuse2 are usable. */
export function fuseProblem (): string | null {
  if (fuseProblemCache !== undefined) return fuseProblemCache
  const problems: string[] = []
  try {
    if (!statSync('/dev/fuse').isCharacterDevice()) throw new Error('not a character device')
    closeSync(openSync('/dev/fuse', constants.O_RDWR))
  } catch (e) {
    problems.push(`/dev/fuse cannot be opened read-write (${(e as Error).message})`)
  }
  if (!onPath('fusermount')) problems.push('fusermount is not on PATH (package "fuse")')
  // load the binding in a throw-away child: it links against the system libfuse.so.2
  const r = spawnSync(process.execPath, ['-e', "require('fuse-native')"], { cwd: ROOT, encoding: 'utf8', timeout: 30_000 })
  if (r.status !== 0) {
    const first = `${r.stderr ?? ''}`.split('\n').find(l => /libfuse|Error|error/.test(l)) ?? `exit ${String(r.status)}`
    problems.push(`require('fuse-native') fails (libfuse2 missing?): ${first.trim()}`)
  }
  fuseProblemCache = problems.length > 0 ? problems.join('; ') : null
  return fuseProblemCache
}

/**
 * Call once at the top of an e2e file. Registers a FAILING test (with the install hint) for a
 * missing FUSE or a missing qemu-img/CLI; only SKIP_FUSE_TESTS=1 turns the FUSE one into a visible
 * skip. Returns true when the file's tests can run.
 */
export function requireFuse (test: TestFn, tools: Array<'qemu-img' | 'qemu-io' | 'vmdkinfo'> = ['qemu-img', 'qemu-io']): boolean {
  const envOk = requireEnv(test, { tools })
  const problem = fuseProblem()
  if (problem === null) return envOk
  if (process.env.SKIP_FUSE_TESTS === '1') test.skip(`FUSE skipped (SKIP_FUSE_TESTS=1): ${problem}`, () => {})
  else test('environment: FUSE is usable (/dev/fuse, fusermount, libfuse2)', t => { t.fail(`${problem}\n${FUSE_INSTALL_HINT}`) })
  return false
}

/** A failing test (with an apt-get hint) for each command missing from PATH. */
export function requireTools (test: TestFn, cmds: string[], pkg = 'e2fsprogs mount util-linux'): boolean {
  const missing = cmds.filter(c => !onPath(c))
  if (missing.length === 0) return true
  test(`environment: ${missing.join(', ')} installed`, t => { t.fail(`missing ${missing.join(', ')}: apt-get install -y ${pkg}`) })
  return false
}

// ---------------------------------------------------------------------------------------------
// mount table

interface MountInfo {
  minor: string
  /** major:minor, the name of the mount's backing device info under /sys/class/bdi */
  dev: string
  fstype: string
}

function unescapeMountPath (s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)))
}

/** The mountinfo entry of `mnt` (never stats the path itself). */
export function mountInfo (mnt: string): MountInfo | undefined {
  const target = path.resolve(mnt)
  let text = ''
  try {
    text = readFileSync('/proc/self/mountinfo', 'utf8')
  } catch {
    return undefined
  }
  let found: MountInfo | undefined
  for (const line of text.split('\n')) {
    const f = line.split(' ')
    if (f.length < 5 || unescapeMountPath(f[4]) !== target) continue
    const dash = f.indexOf('-')
    found = { minor: f[2].split(':')[1] ?? '', dev: f[2], fstype: dash >= 0 ? f[dash + 1] ?? '' : '' }
  }
  return found
}

export function isMounted (mnt: string): boolean {
  return mountInfo(mnt) !== undefined
}

/** Abort FUSE connection `minor` (its pending requests fail), mounting fusectl if needed. */
function abortConnection (minor: string): void {
  const dir = '/sys/fs/fuse/connections'
  if (!existsSync(`${dir}/${minor}`) && readdirSync(dir).length === 0) spawnSync('mount', ['-t', 'fusectl', 'none', dir], { timeout: 10_000 })
  try { writeFileSync(`${dir}/${minor}/abort`, '1') } catch {}
}

/** Synchronous, daemon-independent unmount (safe in exit hooks). */
export function forceUnmountSync (mnt: string): void {
  for (let i = 0; i < 3 && isMounted(mnt); i++) {
    const info = mountInfo(mnt)
    if (info !== undefined && !info.fstype.startsWith('fuse')) {
      spawnSync('umount', ['-l', mnt], { timeout: 10_000 }) // a loop mount left by a test
      continue
    }
    spawnSync('fusermount', ['-u', mnt], { timeout: 10_000 })
    if (!isMounted(mnt)) return
    // busy: detach it, and abort its connection, or a server stuck on its own mount (and every
    // process waiting on it) stays stuck after the detach
    const minor = mountInfo(mnt)?.minor
    spawnSync('fusermount', ['-uz', mnt], { timeout: 10_000 })
    if (minor !== undefined && minor !== '') abortConnection(minor)
    if (!isMounted(mnt)) return
    spawnSync('fusermount', ['-uz', mnt], { timeout: 10_000 })
  }
}

// process-wide registry for the exit hook
const liveServers = new Set<Server>()
const knownMounts = new Set<string>()
let exitHookInstalled = false

function installExitHook (): void {
  if (exitHookInstalled) return
  exitHookInstalled = true
  process.on('exit', () => {
    for (const s of liveServers) {
      try { s.proc.kill('SIGKILL') } catch {}
    }
    // inner (loop) mounts first: longest paths first
    for (const m of [...knownMounts].sort((a, b) => b.length - a.length)) forceUnmountSync(m)
  })
}

/** Remember a mountpoint made by a test (loop mounts too) so teardown unmounts it. */
export function trackMount (mnt: string): void {
  installExitHook()
  knownMounts.add(path.resolve(mnt))
}

// ---------------------------------------------------------------------------------------------
// the server

export interface Exit {
  code: number | null
  signal: NodeJS.Signals | null
}

export class Server {
  stdout = ''
  stderr = ''
  exit: Exit | null = null
  readonly exited: Promise<Exit>

  constructor (readonly store: string, readonly mnt: string, readonly args: string[], readonly proc: ChildProcess) {
    this.exited = new Promise(resolve => {
      proc.on('exit', (code, signal) => {
        this.exit = { code, signal }
        liveServers.delete(this)
        resolve(this.exit)
      })
    })
    proc.stdout?.setEncoding('utf8')
    proc.stderr?.setEncoding('utf8')
    proc.stdout?.on('data', (d: string) => { this.stdout += d })
    proc.stderr?.on('data', (d: string) => { this.stderr += d })
  }

  /** `node bin/redofs mount <store> <mnt> ...args`; resolves when "mounted ..." is printed. */
  static async start (store: string, mnt: string, args: string[] = [], timeoutMs = 30_000, extraEnv: Record<string, string> = {}): Promise<Server> {
    const problem = fuseProblem()
    if (problem !== null) throw new Error(`FUSE is not usable: ${problem}\n${FUSE_INSTALL_HINT}`)
    installExitHook()
    await mkdir(mnt, { recursive: true })
    trackMount(mnt)
    const env = { ...process.env, ...extraEnv }
    delete env.NODE_OPTIONS
    const proc = spawn(process.execPath, [REDOFS_BIN, 'mount', store, mnt, ...args], { stdio: ['pipe', 'pipe', 'pipe'], env })
    const s = new Server(store, path.resolve(mnt), args, proc)
    liveServers.add(s)
    const ready = await new Promise<boolean>(resolve => {
      const timer = setTimeout(() => resolve(false), timeoutMs)
      timer.unref()
      const check = (): void => {
        if (/^mounted .* at /m.test(s.stdout)) { clearTimeout(timer); resolve(true) }
      }
      proc.stdout?.on('data', check)
      void s.exited.then(() => { clearTimeout(timer); resolve(/^mounted .* at /m.test(s.stdout)) })
      check()
    })
    if (!ready || !isMounted(mnt)) {
      await s.shutdown()
      throw new Error(`redofs mount ${store} ${mnt} ${args.join(' ')} did not come up\nexit: ${JSON.stringify(s.exit)}\nstdout: ${s.stdout}\nstderr: ${s.stderr}`)
    }
    return s
  }

  get running (): boolean { return this.exit === null }

  /** Clean stop (SIGTERM): the server unmounts, powers disks off and exits. Waits up to `ms`. */
  async stop (ms = 60_000): Promise<Exit> {
    if (this.exit !== null) return this.exit
    this.proc.kill('SIGTERM')
    const e = await Promise.race([this.exited, deadline(ms)])
    if (e === null) {
      await this.shutdown()
      throw new Error(`redofs server did not exit within ${ms} ms of SIGTERM\nstderr: ${this.stderr}`)
    }
    return e
  }

  /** Stop and assert a clean exit (status 0, mount gone). */
  async stopClean (t: ExecutionContext, ms = 60_000): Promise<void> {
    const e = await this.stop(ms)
    t.deepEqual(e, { code: 0, signal: null }, `server exit after SIGTERM\nstderr: ${this.stderr}`)
    t.false(isMounted(this.mnt), `${this.mnt} still mounted after the server exited`)
  }

  /** SIGKILL, then wait for the process to go away (libfuse's auto_unmount removes the mount). */
  async kill (): Promise<void> {
    if (this.exit === null) {
      this.proc.kill('SIGKILL')
      await Promise.race([this.exited, deadline(10_000)])
    }
    for (let i = 0; i < 50 && isMounted(this.mnt); i++) await sleep(100)
    forceUnmountSync(this.mnt)
  }

  /** Teardown: SIGTERM, up to 10 s, SIGKILL, then the synchronous fallback. Never throws. */
  async shutdown (): Promise<void> {
    if (this.exit === null) {
      this.proc.kill('SIGTERM')
      const e = await Promise.race([this.exited, deadline(10_000)])
      if (e === null) {
        this.proc.kill('SIGKILL')
        await Promise.race([this.exited, deadline(5_000)])
      }
    }
    forceUnmountSync(this.mnt)
  }

  // paths
  img (vm: string, disk: string, gen?: number): string {
    return path.join(this.mnt, vm, gen === undefined ? `${disk}.img` : `${disk}@${gen}.img`)
  }

  ctl (vm: string, disk: string | undefined, file: string): string {
    return disk === undefined ? path.join(this.mnt, '.ctl', vm, file) : path.join(this.mnt, '.ctl', vm, disk, file)
  }

  /** `echo '<line>' > .ctl/<vm>/<disk>/<cmd>` in a bash child; the exit status tells refusal. */
  async command (vm: string, disk: string | undefined, cmd: string, line = ''): Promise<RunResult> {
    return await sh('echo "$1" > "$2"', [line, this.ctl(vm, disk, cmd)])
  }

  /** Like command() but throws with the `error` file's text unless it succeeds. */
  async commandOk (vm: string, disk: string | undefined, cmd: string, line = ''): Promise<RunResult> {
    const r = await this.command(vm, disk, cmd, line)
    if (r.code !== 0) {
      const err = await readFile(this.ctl(vm, disk, 'error'), 'utf8').catch(e => `(${String(e)})`)
      throw new Error(`${cmd} "${line}" on ${vm}/${disk ?? '*'} failed\n${describe(r)}\nerror file: ${err}`)
    }
    return r
  }

  async status (vm: string, disk: string): Promise<DiskStatus> {
    return JSON.parse(await readFile(this.ctl(vm, disk, 'status'), 'utf8')) as DiskStatus
  }

  async errorText (vm: string, disk?: string): Promise<string> {
    return await readFile(this.ctl(vm, disk, 'error'), 'utf8')
  }
}

export interface GenerationStatus {
  generation: number
  file: string
  format: string
  cid: string | null
  parentCID: string | null
  allocated: number
  live: boolean
  frozenAt: string | null
  label: string | null
  /** Why the generation does not open (a commit into it got part of the way). */
  inFlux: string | null
}

export interface JobStatus {
  kind: string
  args?: string
  state: string
  done: number
  total: number
  error?: string
}

export interface DiskStatus {
  vm: string
  disk: string
  mode: string
  redoLogs: number
  generations: GenerationStatus[]
  job: JobStatus | null
  lastJob: JobStatus | null
  error: string
  poweroff?: string
  top?: string
  problems: string[]
  notices: string[]
}

// ---------------------------------------------------------------------------------------------
// per-file context

export interface E2E {
  /** A fresh /tmp/redofs-test-* directory, removed after the file's tests (unless KEEP_TMP=1). */
  tmp: () => Promise<string>
  /**
   * Start a server (env: extra variables for it); it is shut down in after.always if the test
   * leaves it running.
   */
  mount: (store: string, mnt: string, args?: string[], env?: Record<string, string>) => Promise<Server>
}

/**
 * Registers one after.always hook that stops every server still running, unmounts everything
 * the file mounted (loop mounts first), and only then removes the temporary directories.
 */
export function e2e (test: TestFn): E2E {
  installExitHook()
  const dirs: string[] = []
  const servers: Server[] = []
  test.after.always('stop servers, unmount, remove temporary directories', async () => {
    for (const m of [...knownMounts].sort((a, b) => b.length - a.length)) {
      const info = mountInfo(m)
      if (info !== undefined && !info.fstype.startsWith('fuse')) forceUnmountSync(m)
    }
    await Promise.all(servers.map(async s => await s.shutdown()))
    for (const m of [...knownMounts].sort((a, b) => b.length - a.length)) forceUnmountSync(m)
    const stillMounted = [...knownMounts].filter(isMounted)
    if (stillMounted.length > 0) {
      console.log(`still mounted, not removing temporary directories: ${stillMounted.join(' ')}`)
      return
    }
    if (process.env.KEEP_TMP === '1') {
      if (dirs.length > 0) console.log(`kept: ${dirs.join(' ')}`)
      return
    }
    await Promise.all(dirs.map(async d => await rm(d, { recursive: true, force: true })))
  })
  return {
    tmp: async () => {
      const d = await makeTmpDir()
      if (!path.basename(d).startsWith('redofs-test-')) throw new Error(`temporary directory ${d} is not /tmp/redofs-test-*`)
      dirs.push(d)
      return d
    },
    mount: async (store, mnt, args = [], env = {}) => {
      const s = await Server.start(store, mnt, args, undefined, env)
      servers.push(s)
      return s
    }
  }
}

// ---------------------------------------------------------------------------------------------
// small tools

export async function sleep (ms: number): Promise<void> {
  await new Promise(resolve => setTimeout(resolve, ms))
}

/** A timer for Promise.race that does not keep the process alive. */
function deadline (ms: number): Promise<null> {
  return new Promise(resolve => { setTimeout(() => resolve(null), ms).unref() })
}

/** bash -c script with positional args ($1, $2, ...). */
export async function sh (script: string, args: string[] = [], opts: { cwd?: string, timeoutMs?: number } = {}): Promise<RunResult> {
  return await run('bash', ['-c', script, 'bash', ...args], opts)
}

export async function shOk (script: string, args: string[] = [], opts: { cwd?: string, timeoutMs?: number } = {}): Promise<RunResult> {
  const r = await sh(script, args, opts)
  if (r.code !== 0) throw new Error(`shell command failed\n${describe(r)}`)
  return r
}

/** `redofs create <store>/<vm>/<disk> --size SIZE [--format F]` via the CLI. */
export async function createDisk (store: string, vm: string, disk: string, size: string, format?: 'flat' | 'sparse'): Promise<void> {
  const args = [REDOFS_BIN, 'create', path.join(store, vm, disk), '--size', size]
  if (format !== undefined) args.push('--format', format)
  await mkdir(path.join(store, vm), { recursive: true })
  const r = await run(process.execPath, args)
  if (r.code !== 0) throw new Error(`redofs create failed\n${describe(r)}`)
}

/** A store in a new temporary directory: vm/disk of `size`, frozen once by an offline addredo. */
export async function storeWithRedo (tmp: () => Promise<string>, size: string): Promise<{ dir: string, store: string, vm: string }> {
  const dir = await tmp()
  const store = path.join(dir, 'store')
  const vm = path.join(store, 'vm')
  await createDisk(store, 'vm', 'disk', size)
  const r = await run(process.execPath, [REDOFS_BIN, 'addredo', path.join(vm, 'disk')])
  if (r.code !== 0) throw new Error(`redofs addredo failed\n${describe(r)}`)
  return { dir, store, vm }
}

/** A .vmx naming one disk per entry (scsi0:N). */
export async function writeVmx (file: string, disks: Array<{ fileName: string, mode?: string }>): Promise<void> {
  const lines = ['.encoding = "UTF-8"', 'config.version = "8"', 'virtualHW.version = "4"', `displayName = "${path.basename(file, '.vmx')}"`]
  disks.forEach((d, i) => {
    lines.push(`scsi0:${i}.present = "TRUE"`, `scsi0:${i}.fileName = "${d.fileName}"`)
    if (d.mode !== undefined) lines.push(`scsi0:${i}.mode = "${d.mode}"`)
  })
  await writeFile(file, lines.join('\n') + '\n')
}

/** Read `len` bytes at `pos` (async; returns fewer at the end of file). */
export async function readRange (file: string, pos: number, len: number): Promise<Buffer> {
  const fh = await open(file, 'r')
  try {
    const buf = Buffer.alloc(len)
    let got = 0
    while (got < len) {
      const { bytesRead } = await fh.read(buf, got, len - got, pos + got)
      if (bytesRead === 0) break
      got += bytesRead
    }
    return buf.subarray(0, got)
  } finally {
    await fh.close()
  }
}

/**
 * Reads in a CHILD node process: one pread(2) per range (no retry loop), reporting the byte
 * count and sha256 of what that single call returned, like a program doing odd-sized reads.
 */
export interface PreadResult { pos: number, len: number, n: number, sha: string, err?: string }

const PREAD_SCRIPT = `
const fs = require('fs'); const crypto = require('crypto');
const [file, json] = process.argv.slice(1);
const fd = fs.openSync(file, 'r');
const out = [];
for (const [pos, len] of JSON.parse(json)) {
  const buf = Buffer.alloc(len);
  try {
    const n = fs.readSync(fd, buf, 0, len, pos);
    out.push({ pos, len, n, sha: crypto.createHash('sha256').update(buf.subarray(0, n)).digest('hex') });
  } catch (e) { out.push({ pos, len, n: -1, sha: '', err: e.code }); }
}
fs.closeSync(fd);
process.stdout.write(JSON.stringify(out));
`

export async function preadInChild (file: string, ranges: Array<[number, number]>): Promise<PreadResult[]> {
  const r = await run(process.execPath, ['-e', PREAD_SCRIPT, file, JSON.stringify(ranges)])
  if (r.code !== 0) throw new Error(`pread child failed\n${describe(r)}`)
  return JSON.parse(r.stdout) as PreadResult[]
}

/** `dd` of a byte range (skip_bytes,count_bytes), reporting "<bytes> <sha256>". */
export async function ddRange (file: string, pos: number, len: number, bs = 65536): Promise<{ n: number, sha: string, r: RunResult }> {
  const args = [file, String(pos), String(len), String(bs)]
  const dd = 'set -o pipefail; dd if="$1" bs="$4" skip="$2" count="$3" iflag=skip_bytes,count_bytes status=none'
  const r = await sh(`${dd} | sha256sum`, args)
  const c = await sh(`${dd} | wc -c`, args)
  const n = r.code === 0 && c.code === 0 ? Number(c.stdout.trim()) : -1
  return { n, sha: r.stdout.split(' ')[0], r: r.code !== 0 ? r : c }
}

/** Wait until `cond` holds, polling every `ms` (bounded by `tries`). */
export async function waitFor (cond: () => Promise<boolean> | boolean, tries = 600, ms = 100): Promise<boolean> {
  for (let i = 0; i < tries; i++) {
    if (await cond()) return true
    await sleep(ms)
  }
  return false
}

/**
 * Threads of `pid` the patched addon named redofs-fuse (its FUSE workers), and what they have
 * read and written so far (/proc's rchar and wchar: every read and write call, backing files
 * and /dev/fuse alike), and how many wait in read(2) on /dev/fuse or on a futex (parked).
 */
export async function fuseWorkers (pid: number): Promise<{ threads: number, rchar: number, wchar: number, reading: number, parked: number }> {
  let threads = 0
  let rchar = 0
  let wchar = 0
  // where each waits: in read(2) on /dev/fuse (for a request), or on a futex (parked, level 6;
  // also a worker waiting for JS, so count it only at rest); syscall numbers of x86_64 / arm64
  const [READ, FUTEX] = process.arch === 'arm64' ? ['63', '98'] : ['0', '202']
  let reading = 0
  let parked = 0
  for (const tid of await readdir(`/proc/${pid}/task`)) {
    try {
      if ((await readFile(`/proc/${pid}/task/${tid}/comm`, 'utf8')).trim() !== 'redofs-fuse') continue
      const io = await readFile(`/proc/${pid}/task/${tid}/io`, 'utf8')
      const [call, fd] = (await readFile(`/proc/${pid}/task/${tid}/syscall`, 'utf8')).split(' ')
      rchar += Number(/^rchar:\s*(\d+)/m.exec(io)?.[1])
      wchar += Number(/^wchar:\s*(\d+)/m.exec(io)?.[1])
      threads++
      if (call === READ && await readlink(`/proc/${pid}/fd/${parseInt(fd, 16)}`).catch(() => '') === '/dev/fuse') reading++
      else if (call === FUTEX) parked++
    } catch { /* the thread ended meanwhile */ }
  }
  return { threads, rchar, wchar, reading, parked }
}
