/**
 * A background writer process for e2e tests: keeps writing random blocks into a file (the live
 * image on the mount) one write at a time, optionally mirroring each write into a shadow raw
 * file, and logs every write so the test can replay any prefix of them.
 *
 *   node writer.js '<json WriterConfig>'
 *     stdout: one JSON line per event: {"ready":true}, {"i","pos","len","t0","t1"} per write,
 *             {"error":...} on a failed write (it then stops writing), {"stopped":n} at the end
 *     stdin:  "stop\n" finishes the write in flight and exits 0
 *
 * Block content is a pure function of (seed, i, len): see blockData().
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash } from 'node:crypto'
import { open, writeFile, type FileHandle } from 'node:fs/promises'
import { prng } from './model'

export interface WriterConfig {
  target: string
  /** A raw file receiving the same writes (after each write to target succeeds). */
  shadow?: string
  /** Size of the target; writes stay inside [lo, hi) (default [0, size)). */
  size: number
  lo?: number
  hi?: number
  seed: number
  minLen?: number
  maxLen?: number
  /** Align offsets and lengths to this many bytes (default 1: unaligned). */
  align?: number
  /** fdatasync the target every N writes (0 = never). */
  syncEvery?: number
}

export interface WriteRecord {
  i: number
  pos: number
  len: number
  /** Date.now() before the write call and after it returned. */
  t0: number
  t1: number
}

export interface WriterError {
  i: number
  pos: number
  len: number
  code: string
  message: string
}

/** The bytes of write number i (deterministic). */
export function blockData (seed: number, i: number, len: number): Buffer {
  const words = Math.ceil(len / 4)
  const out = Buffer.alloc(words * 4)
  const h = createHash('sha256').update(`${seed}:${i}`).digest()
  let a = h.readUInt32LE(0)
  let b = h.readUInt32LE(4) | 1
  for (let k = 0; k < words; k++) {
    // xorshift32 mixed with a Weyl sequence: cheap, and different for every (seed, i)
    a ^= a << 13; a ^= a >>> 17; a ^= a << 5
    b = (b + 0x9e3779b9) | 0
    out.writeUInt32LE(((a ^ b) >>> 0), k * 4)
  }
  return out.subarray(0, len)
}

/** Offset and length of write number i (deterministic). */
export function blockPlace (cfg: WriterConfig, i: number): { pos: number, len: number } {
  const rnd = prng((cfg.seed * 7919 + i * 104729) >>> 0)
  const align = cfg.align ?? 1
  const lo = cfg.lo ?? 0
  const hi = cfg.hi ?? cfg.size
  const minLen = cfg.minLen ?? 1
  const maxLen = Math.min(cfg.maxLen ?? 128 * 1024, hi - lo)
  let len = minLen + Math.floor(rnd() * (maxLen - minLen + 1))
  len = Math.max(align, Math.floor(len / align) * align)
  const room = hi - lo - len
  let pos = lo + Math.floor(rnd() * (room + 1))
  pos = lo + Math.floor((pos - lo) / align) * align
  return { pos, len }
}

async function main (): Promise<void> {
  const cfg = JSON.parse(process.argv[2]) as WriterConfig
  const target = await open(cfg.target, 'r+')
  const shadow: FileHandle | null = cfg.shadow !== undefined ? await open(cfg.shadow, 'r+') : null
  let stop = false
  let stdinBuf = ''
  process.stdin.setEncoding('utf8')
  process.stdin.on('data', (d: string) => {
    stdinBuf += d
    if (/stop/.test(stdinBuf)) stop = true
  })
  process.stdin.on('end', () => { stop = true })
  const say = (o: unknown): void => { process.stdout.write(JSON.stringify(o) + '\n') }
  say({ ready: true })
  let i = 0
  let failed = false
  while (!stop) {
    if (failed) { await new Promise(resolve => setTimeout(resolve, 50)); continue }
    const { pos, len } = blockPlace(cfg, i)
    const data = blockData(cfg.seed, i, len)
    const t0 = Date.now()
    try {
      let done = 0
      while (done < len) {
        const { bytesWritten } = await target.write(data, done, len - done, pos + done)
        if (bytesWritten <= 0) throw Object.assign(new Error(`short write: ${bytesWritten}`), { code: 'ESHORT' })
        done += bytesWritten
      }
      if ((cfg.syncEvery ?? 0) > 0 && (i + 1) % (cfg.syncEvery as number) === 0) await target.datasync()
    } catch (e) {
      const err = e as NodeJS.ErrnoException
      say({ error: { i, pos, len, code: err.code ?? 'EUNKNOWN', message: err.message } satisfies WriterError })
      failed = true
      continue
    }
    const t1 = Date.now()
    if (shadow !== null) await shadow.write(data, 0, len, pos)
    say({ i, pos, len, t0, t1 } satisfies WriteRecord)
    i++
  }
  await target.close()
  if (shadow !== null) await shadow.close()
  say({ stopped: i })
}

// ---------------------------------------------------------------------------------------------
// driving it from a test

export class Writer {
  writes: WriteRecord[] = []
  errors: WriterError[] = []
  stderr = ''
  private buf = ''
  private ready: Promise<void>
  private exited: Promise<number | null>
  private waiters: Array<() => void> = []

  constructor (readonly cfg: WriterConfig, readonly proc: ChildProcess) {
    proc.stdout?.setEncoding('utf8')
    proc.stderr?.setEncoding('utf8')
    proc.stderr?.on('data', (d: string) => { this.stderr += d })
    let readyResolve!: () => void
    this.ready = new Promise(resolve => { readyResolve = resolve })
    proc.stdout?.on('data', (d: string) => {
      this.buf += d
      let nl: number
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl)
        this.buf = this.buf.slice(nl + 1)
        if (line.trim() === '') continue
        const o = JSON.parse(line) as Record<string, unknown>
        if (o.ready === true) readyResolve()
        else if (o.error !== undefined) this.errors.push(o.error as WriterError)
        else if (typeof o.i === 'number') this.writes.push(o as unknown as WriteRecord)
        const ws = this.waiters
        this.waiters = []
        for (const w of ws) w()
      }
    })
    this.exited = new Promise(resolve => proc.on('exit', code => {
      readyResolve()
      const ws = this.waiters
      this.waiters = []
      for (const w of ws) w()
      resolve(code)
    }))
  }

  static async start (cfg: WriterConfig): Promise<Writer> {
    const proc = spawn(process.execPath, [__filename, JSON.stringify(cfg)], { stdio: ['pipe', 'pipe', 'pipe'] })
    const w = new Writer(cfg, proc)
    liveWriters.add(w)
    await w.ready
    return w
  }

  /** Resolves once at least n writes completed (or the writer failed / exited). */
  async waitWrites (n: number): Promise<void> {
    while (this.writes.length < n && this.errors.length === 0 && this.proc.exitCode === null) {
      await new Promise<void>(resolve => this.waiters.push(resolve))
    }
  }

  /** Stop after the write in flight; returns the exit code. */
  async stop (): Promise<number | null> {
    this.proc.stdin?.end('stop\n')
    const code = await Promise.race([this.exited, new Promise<'timeout'>(resolve => { setTimeout(() => resolve('timeout'), 60_000).unref() })])
    liveWriters.delete(this)
    if (code === 'timeout') {
      this.proc.kill('SIGKILL')
      throw new Error(`writer did not stop within 60 s (a write hangs?)\nlast write: ${JSON.stringify(this.writes.at(-1))}\nstderr: ${this.stderr}`)
    }
    return code
  }

  /** The log of writes (and errors) as JSON, for post-mortems. */
  async saveLog (file: string): Promise<void> {
    await writeFile(file, JSON.stringify({ cfg: this.cfg, writes: this.writes, errors: this.errors }))
  }

  /** Apply writes [0, n) to an in-memory image. */
  applyTo (image: Buffer, n = this.writes.length): void {
    for (let i = 0; i < n; i++) {
      const w = this.writes[i]
      blockData(this.cfg.seed, w.i, w.len).copy(image, w.pos)
    }
  }
}

const liveWriters = new Set<Writer>()
process.on('exit', () => {
  for (const w of liveWriters) { try { w.proc.kill('SIGKILL') } catch {} }
})

if (require.main === module) {
  main().catch(e => {
    process.stderr.write(`writer: ${(e as Error).stack ?? String(e)}\n`)
    process.exit(2)
  })
}
