/**
 * Running external commands, building chains with qemu-img/qemu-io, converting to raw (the
 * oracle), and comparing/hashing files without loading them into memory.
 */
import { execFile } from 'node:child_process'
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { readdir, stat } from 'node:fs/promises'
import path from 'node:path'

export interface RunResult {
  /** Exit status; -1 when killed by a signal or the command could not be started. */
  code: number
  stdout: string
  stderr: string
  /** The command line, for assertion messages. */
  cmd: string
}

export interface RunOptions {
  cwd?: string
  env?: NodeJS.ProcessEnv
  timeoutMs?: number
}

function quote (a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`
}

/** Run a command asynchronously; never throws, the exit status is in `code`. */
export async function run (cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const line = [cmd, ...args].map(quote).join(' ')
  return await new Promise(resolve => {
    execFile(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      encoding: 'utf8',
      maxBuffer: 64 * 1024 * 1024,
      timeout: opts.timeoutMs ?? 110_000
    }, (err, stdout, stderr) => {
      let code = 0
      let errText = String(stderr)
      if (err) {
        const c = (err as { code?: unknown }).code
        code = typeof c === 'number' ? c : -1
        // not started (ENOENT...) or killed (timeout): say so instead of an empty stderr
        if (code === -1) errText += `${errText === '' ? '' : '\n'}[${err.message}]`
      }
      resolve({ code, stdout: String(stdout), stderr: errText, cmd: line })
    })
  })
}

/** Run a command and throw (with its stderr) unless it exits 0. */
export async function mustRun (cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await run(cmd, args, opts)
  if (r.code !== 0) throw new Error(`${r.cmd} (cwd ${opts.cwd ?? process.cwd()}) exited ${r.code}\n${r.stderr}${r.stdout}`)
  return r
}

export function describe (r: RunResult): string {
  return `$ ${r.cmd}\nexit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`
}

// ---------------------------------------------------------------------------------------------
// qemu

export type BaseFormat = 'monolithicSparse' | 'monolithicFlat' | 'twoGbMaxExtentSparse' | 'twoGbMaxExtentFlat' | 'streamOptimized'
export type ChildFormat = 'monolithicSparse' | 'twoGbMaxExtentSparse'

/** One qemu-io write: a byte pattern, or zeros written with `write -z`. Offsets in bytes. */
export interface QWrite {
  pattern: number | 'zero'
  offset: number
  length: number
}

export function qemuIoCommand (w: QWrite): string {
  // qemu-io does not evaluate expressions: plain decimal numbers only
  return w.pattern === 'zero'
    ? `write -z ${w.offset} ${w.length}`
    : `write -P 0x${w.pattern.toString(16).padStart(2, '0')} ${w.offset} ${w.length}`
}

/** Apply qemu-io writes to a VMDK (one qemu-io invocation = one open = one CID change). */
export async function qemuWrite (file: string, writes: QWrite[], cwd?: string): Promise<void> {
  if (writes.length === 0) return
  const args = ['-f', 'vmdk']
  for (const w of writes) args.push('-c', qemuIoCommand(w))
  args.push(file)
  await mustRun('qemu-io', args, { cwd: cwd ?? path.dirname(file) })
}

/** qemu-img create a base image. `file` may be relative to `cwd`; `extra` is appended to -o. */
export async function createBase (file: string, size: number | string, format: BaseFormat = 'monolithicSparse', cwd?: string, extra?: string): Promise<void> {
  const o = `subformat=${format}${extra ? `,${extra}` : ''}`
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', o, file, String(size)], { cwd })
}

/** qemu-img create a child; `hint` is passed verbatim to -b (relative to the child's directory). */
export async function createChild (file: string, hint: string, format: ChildFormat = 'monolithicSparse', cwd?: string, extra?: string): Promise<void> {
  const o = `subformat=${format}${extra ? `,${extra}` : ''}`
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', o, '-b', hint, '-F', 'vmdk', file], { cwd })
}

/**
 * A streamOptimized image (qemu layout) holding `writes`: written into a raw file with qemu-io,
 * then converted (qemu cannot rewrite stream grains in place).
 */
export async function createStream (file: string, size: number, writes: QWrite[], cwd: string): Promise<void> {
  const src = `${file}.src.raw`
  await mustRun('truncate', ['-s', String(size), src], { cwd })
  if (writes.length > 0) {
    const args = ['-f', 'raw']
    for (const w of writes) args.push('-c', qemuIoCommand(w))
    await mustRun('qemu-io', [...args, src], { cwd })
  }
  await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', src, file], { cwd })
  await mustRun('rm', ['-f', src], { cwd })
}

export interface LayerSpec {
  /** File name inside the chain directory. */
  name: string
  /** Base: any BaseFormat; children: monolithicSparse (default) or twoGbMaxExtentSparse. */
  format?: BaseFormat
  /** Extra qemu-img -o options, e.g. "zeroed_grain=on". */
  options?: string
  writes?: QWrite[]
}

/**
 * Build a chain in `dir`: layers[0] is the base (created with `size`), each following layer a
 * child of the previous one (relative hint = parent's file name). Returns absolute paths, base first.
 */
export async function buildChain (dir: string, size: number | string, layers: LayerSpec[]): Promise<string[]> {
  const files: string[] = []
  for (let i = 0; i < layers.length; i++) {
    const l = layers[i]
    if (i === 0 && l.format === 'streamOptimized') {
      await createStream(l.name, Number(size), l.writes ?? [], dir)
      files.push(path.join(dir, l.name))
      continue
    }
    if (i === 0) {
      await createBase(l.name, size, l.format ?? 'monolithicSparse', dir, l.options)
    } else {
      const f = l.format ?? 'monolithicSparse'
      if (f !== 'monolithicSparse' && f !== 'twoGbMaxExtentSparse') throw new Error(`a child cannot be ${f}`)
      await createChild(l.name, layers[i - 1].name, f, dir, l.options)
    }
    await qemuWrite(l.name, l.writes ?? [], dir)
    files.push(path.join(dir, l.name))
  }
  return files
}

/** qemu-img convert -f vmdk -O raw (throws on failure, e.g. a CID error). */
export async function convertToRaw (vmdk: string, out: string): Promise<void> {
  await mustRun('qemu-img', ['convert', '-f', 'vmdk', '-O', 'raw', vmdk, out], { cwd: path.dirname(vmdk) })
}

export async function qemuCheck (vmdk: string): Promise<RunResult> {
  return await run('qemu-img', ['check', '-f', 'vmdk', vmdk], { cwd: path.dirname(vmdk) })
}

export async function virtualSize (vmdk: string): Promise<number> {
  const r = await mustRun('qemu-img', ['info', '-f', 'vmdk', '--output=json', vmdk], { cwd: path.dirname(vmdk) })
  const info = JSON.parse(r.stdout) as { 'virtual-size': number }
  return info['virtual-size']
}

// ---------------------------------------------------------------------------------------------
// files

/** sha256 of a file, streamed. */
export async function sha256File (file: string): Promise<string> {
  const h = createHash('sha256')
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer)
  return h.digest('hex')
}

export interface Comparison {
  same: boolean
  detail: string
}

/**
 * Byte comparison of two raw files of possibly huge, sparse size. Sizes must match exactly;
 * content is compared with `cmp` (small files) or with `qemu-img compare` in non-strict mode
 * on raw files, which skips holes present in both files but reads every data block (`cmp` of a
 * 6 GiB sparse file takes ~40 s of kernel time here).
 */
export async function sameContent (a: string, b: string): Promise<Comparison> {
  const [sa, sb] = await Promise.all([stat(a), stat(b)])
  if (sa.size !== sb.size) return { same: false, detail: `sizes differ: ${a} ${sa.size}, ${b} ${sb.size}` }
  if (sa.size <= 256 * 1024 * 1024) {
    const r = await run('cmp', [a, b])
    return { same: r.code === 0, detail: r.code === 0 ? 'identical' : `${r.stdout}${r.stderr}`.trim() }
  }
  const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b])
  return { same: r.code === 0, detail: `${r.stdout}${r.stderr}`.trim() }
}

/** Recursively list regular files under dir (relative paths, sorted). */
export async function listFiles (dir: string): Promise<string[]> {
  const out: string[] = []
  async function walk (rel: string): Promise<void> {
    for (const e of await readdir(path.join(dir, rel), { withFileTypes: true })) {
      const r = path.join(rel, e.name)
      if (e.isDirectory()) await walk(r)
      else if (e.isFile()) out.push(r)
    }
  }
  await walk('')
  return out.sort()
}

/** relative path → "size:sha256" of every file under dir, to prove nothing was modified. */
export async function snapshotTree (dir: string): Promise<Record<string, string>> {
  const snap: Record<string, string> = {}
  for (const f of await listFiles(dir)) {
    const p = path.join(dir, f)
    snap[f] = `${(await stat(p)).size}:${await sha256File(p)}`
  }
  return snap
}
