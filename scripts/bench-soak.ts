/**
 * Soak test for the fuse-native handle leak (native-notes/leak.md): mounts redofs on a 2 GiB
 * chain and alternates churn and measurement for a number of rounds.
 *
 *   churn:   bursts of P parallel 4 KiB O_DIRECT reads (one child process, P libuv threads),
 *            each burst waiting for all of its reads: libfuse 2.9 starts a worker thread
 *            whenever all are busy and ends workers when more than ten are idle, so every
 *            burst starts and ends ~P-10 threads. Bounded by --waves and --churn-seconds.
 *   measure: fio, one job, O_DIRECT: sequential 128 KiB reads and random 4 KiB reads, each for
 *            --measure-seconds; the first round (fresh mount) and the last one measure three
 *            times and keep the median, so that the first-vs-last ratio does not hang on one
 *            2-second sample on a noisy machine.
 *
 * A preload (dist/scripts/native/handle-probe.js) counts fuse-native's per-thread control
 * blocks in the server, i.e. the uv_async_t handles on the loop. The stock 2.2.6 addon gets a
 * new one per thread forever; the patched one (scripts/build-fuse-native.sh) reuses them.
 *
 *   node dist/scripts/bench-soak.js [--variant patched|stock|both] [--rounds 8] [--waves 400]
 *        [--parallel 32] [--churn-seconds 4] [--measure-seconds 2] [--quick] [--json out.json]
 *        [--assert]   exit 1 unless the patched build stays within 10 % (first vs last)
 *
 * The stock variant runs the same server with PREBUILDS_ONLY=1 (node-gyp-build then loads
 * fuse-native's prebuilt binary instead of build/Release/fuse.node).
 */
import { constants, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { open as openAsync } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import {
  ROOT, benchDir, buildChain, ensureTools, fioRandRead, log, median, mountRedofs, must, run, sleep,
  sweepMounts, threadsOf, type TestChain, MiB
} from './native/bench-lib'

export interface SoakOptions {
  rounds: number
  waves: number
  parallel: number
  churnSeconds: number
  measureSeconds: number
}

export interface SoakRound {
  round: number
  elapsedS: number
  /** control blocks (= async handles) fuse-native has allocated so far */
  blocks: number
  threads: number
  /** bursts run in this round's churn phase, and their rate */
  bursts: number
  burstsPerS: number
  /** measured after the churn phase (the median of three in the first and the last round) */
  seq128kMBps: number
  rand4kIops: number
  /** every measurement of the round */
  seqSamples: number[]
  randSamples: number[]
}

export interface SoakVariant {
  variant: 'patched' | 'stock'
  addon: string
  patchLevel: number | null
  rounds: SoakRound[]
  /**
   * seq and rand: round 0 (fresh mount, no churn yet) vs the last round, each the median of
   * three measurements; bursts/s: churn rounds 1-2 vs the last two (one churn phase per round)
   */
  first: { seq128kMBps: number, rand4kIops: number, burstsPerS: number }
  last: { seq128kMBps: number, rand4kIops: number, burstsPerS: number }
  ratio: { seq128kMBps: number, rand4kIops: number, burstsPerS: number }
  dataIntact: boolean
}

const SELF = __filename

/** Child mode: P parallel 4 KiB reads per burst until `waves` bursts or `seconds` elapsed. */
async function churnChild (file: string, waves: number, parallel: number, seconds: number, seed: number): Promise<void> {
  const fh = await openAsync(file, constants.O_RDONLY | constants.O_DIRECT)
  const size = (await fh.stat()).size
  const blocks = Math.floor(size / 4096)
  const bufs = Array.from({ length: parallel }, () => Buffer.alloc(4096))
  let x = seed >>> 0
  const next = (): number => { x = (Math.imul(x, 1664525) + 1013904223) >>> 0; return x }
  const t0 = process.hrtime.bigint()
  let done = 0
  const deadline = seconds * 1e9
  while (done < waves && Number(process.hrtime.bigint() - t0) < deadline) {
    await Promise.all(bufs.map(b => fh.read(b, 0, 4096, (next() % blocks) * 4096)))
    done++
  }
  const s = Number(process.hrtime.bigint() - t0) / 1e9
  await fh.close()
  process.stdout.write(JSON.stringify({ bursts: done, seconds: s }) + '\n')
}

async function churn (file: string, o: SoakOptions, seed: number): Promise<{ bursts: number, seconds: number }> {
  const env = { ...process.env, UV_THREADPOOL_SIZE: String(o.parallel) }
  const r = await must(process.execPath, [SELF, '--churn-child', file, String(o.waves), String(o.parallel), String(o.churnSeconds), String(seed)], { env })
  return JSON.parse(r.stdout.trim().split('\n').pop() as string)
}

async function fioSeq (file: string, seconds: number): Promise<number> {
  const r = await must('fio', ['--name=seq', `--filename=${file}`, '--rw=read', '--bs=128k', '--ioengine=psync', '--direct=1',
    '--time_based', `--runtime=${seconds}`, '--output-format=json'])
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')))
  return j.jobs[0].read.bw_bytes / 1e6
}

async function digest (file: string, bytes: number): Promise<string> {
  const r = await must('sh', ['-c', `dd if="${file}" bs=1M count=${bytes / MiB} iflag=direct status=none | sha256sum`])
  return r.stdout.split(' ')[0]
}

export async function soakVariant (chain: TestChain, variant: 'patched' | 'stock', o: SoakOptions): Promise<SoakVariant> {
  const work = join(chain.dir, `soak-${variant}`)
  mkdirSync(work, { recursive: true })
  const mnt = join(work, 'mnt')
  const probe = join(work, 'probe.json')
  const env: NodeJS.ProcessEnv = { ...process.env, REDOFS_HANDLE_PROBE: probe }
  if (variant === 'stock') env.PREBUILDS_ONLY = '1'
  else delete env.PREBUILDS_ONLY
  const server = await mountRedofs(chain.store, mnt, { nodeArgs: ['-r', join(ROOT, 'dist', 'scripts', 'native', 'handle-probe.js')], env })
  const readProbe = (): { blocks: number, addon: string, patchLevel: number | null } => JSON.parse(readFileSync(probe, 'utf8'))
  const file = join(mnt, 'vm', 'disk.img')
  const rounds: SoakRound[] = []
  let dataIntact = false
  try {
    await sleep(300)
    const p0 = readProbe()
    if (variant === 'patched' && p0.patchLevel === null) throw new Error(`patched variant loaded ${p0.addon} without the patch: run bash scripts/build-fuse-native.sh`)
    if (variant === 'stock' && p0.patchLevel !== null) throw new Error(`stock variant loaded the patched ${p0.addon}`)
    log(`soak ${variant}: ${p0.addon}`)
    const before = await digest(file, 64 * MiB)
    // warm-up (JIT, backing page cache) so that round 0 is a fair baseline; one reader: no churn
    await fioSeq(file, o.measureSeconds)
    const t0 = Date.now()
    for (let r = 0; r < o.rounds; r++) {
      // round 0 measures the fresh mount; every later round churns first
      let c = { bursts: 0, seconds: 0 }
      if (r > 0) c = await churn(file, o, r)
      await sleep(250)
      const seqSamples: number[] = []
      const randSamples: number[] = []
      const times = r === 0 || r === o.rounds - 1 ? 3 : 1
      for (let k = 0; k < times; k++) {
        seqSamples.push(Math.round(await fioSeq(file, o.measureSeconds)))
        randSamples.push(Math.round((await fioRandRead(file, { seconds: o.measureSeconds })).iops))
      }
      await sleep(250)
      const row: SoakRound = {
        round: r,
        elapsedS: Math.round((Date.now() - t0) / 100) / 10,
        blocks: readProbe().blocks,
        threads: threadsOf(server.child.pid as number),
        bursts: c.bursts,
        burstsPerS: c.seconds > 0 ? Math.round(c.bursts / c.seconds) : NaN,
        seq128kMBps: median(seqSamples),
        rand4kIops: median(randSamples),
        seqSamples,
        randSamples
      }
      rounds.push(row)
      log(`soak ${variant} round ${String(r).padStart(2)}: t=${String(row.elapsedS).padStart(5)}s handles=${String(row.blocks).padStart(6)} ` +
        `bursts=${String(row.bursts).padStart(4)} (${String(row.burstsPerS).padStart(4)}/s) seq128k=${String(row.seq128kMBps).padStart(5)} MB/s rand4k=${String(row.rand4kIops).padStart(6)} IOPS` +
        (times > 1 ? ` (medians of ${seqSamples.join('/')} and ${randSamples.join('/')})` : ''))
    }
    dataIntact = (await digest(file, 64 * MiB)) === before
    if (!dataIntact) log(`soak ${variant}: DATA MISMATCH after the soak`)
    const pf = readProbe()
    const pick = (rs: SoakRound[], k: keyof SoakRound): number => median(rs.map(x => x[k] as number).filter(v => !Number.isNaN(v)))
    const head = rounds.slice(0, 1)
    const tail = rounds.slice(-1)
    // bursts/s: round 0 has no churn, compare the first and last churn rounds
    const churnRounds = rounds.filter(x => x.round > 0)
    const first = { seq128kMBps: pick(head, 'seq128kMBps'), rand4kIops: pick(head, 'rand4kIops'), burstsPerS: pick(churnRounds.slice(0, 2), 'burstsPerS') }
    const last = { seq128kMBps: pick(tail, 'seq128kMBps'), rand4kIops: pick(tail, 'rand4kIops'), burstsPerS: pick(churnRounds.slice(-2), 'burstsPerS') }
    const ratio = {
      seq128kMBps: last.seq128kMBps / first.seq128kMBps,
      rand4kIops: last.rand4kIops / first.rand4kIops,
      burstsPerS: last.burstsPerS / first.burstsPerS
    }
    return { variant, addon: pf.addon, patchLevel: pf.patchLevel, rounds, first, last, ratio, dataIntact }
  } finally {
    await server.stop()
  }
}

export function soakOptions (quick: boolean, over: Partial<SoakOptions> = {}): SoakOptions {
  const o = {
    rounds: quick ? 5 : 8,
    waves: 400,
    parallel: 32,
    churnSeconds: quick ? 3 : 4,
    measureSeconds: 2,
    ...over
  }
  // round 0 and the last are compared, and bursts/s of churn rounds 1-2 with the last two:
  // fewer rounds would compare a round with itself
  if (!Number.isInteger(o.rounds) || o.rounds < 5) throw new Error(`the soak needs at least 5 rounds (got ${o.rounds})`)
  return o
}

export function soakTable (vs: SoakVariant[]): string {
  const lines = ['| build | handles at end | seq 128k MB/s first → last (ratio) | rand 4k IOPS first → last (ratio) | bursts/s first → last (ratio) | data |', '| --- | --- | --- | --- | --- | --- |']
  const f = (a: number, b: number, r: number): string => `${Math.round(a)} → ${Math.round(b)} (${r.toFixed(2)})`
  for (const v of vs) {
    lines.push(`| ${v.variant} | ${v.rounds[v.rounds.length - 1].blocks} | ${f(v.first.seq128kMBps, v.last.seq128kMBps, v.ratio.seq128kMBps)} | ` +
      `${f(v.first.rand4kIops, v.last.rand4kIops, v.ratio.rand4kIops)} | ${f(v.first.burstsPerS, v.last.burstsPerS, v.ratio.burstsPerS)} | ${v.dataIntact ? 'intact' : 'MISMATCH'} |`)
  }
  return lines.join('\n')
}

async function main (): Promise<number> {
  const args = process.argv.slice(2)
  const opt = (name: string): string | undefined => { const i = args.indexOf(`--${name}`); return i >= 0 ? args[i + 1] : undefined }
  const num = (name: string): number | undefined => { const v = opt(name); return v === undefined ? undefined : Number(v) }
  const quick = args.includes('--quick')
  const over: Partial<SoakOptions> = {}
  for (const [k, n] of [['rounds', 'rounds'], ['waves', 'waves'], ['parallel', 'parallel'], ['churnSeconds', 'churn-seconds'], ['measureSeconds', 'measure-seconds']] as const) {
    const v = num(n)
    if (v !== undefined) over[k] = v
  }
  const o = soakOptions(quick, over)
  const which = opt('variant') ?? 'both'
  const variants: Array<'patched' | 'stock'> = which === 'both' ? ['stock', 'patched'] : [which as 'patched' | 'stock']
  ensureTools({ fio: 'fio', 'qemu-io': 'qemu-utils', fusermount: 'fuse' })
  const chk = await run('bash', [join(ROOT, 'scripts', 'build-fuse-native.sh'), '--check'])
  if (variants.includes('patched') && chk.code !== 0) throw new Error(`no patched fuse-native build: ${chk.stderr.trim()}`)
  const dir = benchDir('soak')
  process.on('exit', sweepMounts)
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => { sweepMounts(); rmSync(dir, { recursive: true, force: true }); process.exit(130) })
  try {
    log(`soak: building the 2 GiB chain in ${dir}`)
    const chain = await buildChain(dir)
    const results: SoakVariant[] = []
    for (const v of variants) results.push(await soakVariant(chain, v, o))
    const table = soakTable(results)
    process.stdout.write(`\n${table}\n`)
    const out = opt('json') ?? join(ROOT, '.bench', 'soak.json')
    mkdirSync(dirname(out), { recursive: true })
    writeFileSync(out, JSON.stringify({ options: o, results }, null, 2))
    log(`soak: wrote ${out}`)
    if (args.includes('--assert')) {
      const p = results.find(r => r.variant === 'patched')
      if (p !== undefined && (p.ratio.seq128kMBps < 0.9 || p.ratio.rand4kIops < 0.9 || !p.dataIntact)) {
        log('soak: FAIL: the patched build lost more than 10 % (or data changed)')
        return 1
      }
    }
    return 0
  } finally {
    if (!args.includes('--keep')) rmSync(dir, { recursive: true, force: true })
  }
}

if (require.main === module) {
  const argv = process.argv.slice(2)
  if (argv[0] === '--churn-child') {
    churnChild(argv[1], Number(argv[2]), Number(argv[3]), Number(argv[4]), Number(argv[5])).catch(e => { process.stderr.write(`${(e as Error).stack}\n`); process.exit(1) })
  } else {
    main().then(code => process.exit(code), e => { process.stderr.write(`bench-soak: ${(e as Error).stack}\n`); sweepMounts(); process.exit(1) })
  }
}
