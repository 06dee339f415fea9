/**
 * The benchmark (npm run bench): redofs against qemu-storage-daemon's FUSE export of the same
 * chain, a fuse-native passthrough of a raw copy (the JS-over-FUSE ceiling), the raw copy read
 * by the kernel directly, and qemu-img commit. One run measures everything and prints the
 * absolute figures, the ratios and the issue's targets; results go to .bench/results.json.
 *
 *   node dist/scripts/bench.js [--only read,write,commit,open,soak] [--quick] [--runs N]
 *                              [--profile] [--keep] [--json FILE]
 *
 *   read    2 GiB chain (monolithicSparse base + redo logs rewriting 25 % and 10 % of the
 *           grains): sequential dd reads (bs 4k, 128k, 1M) and fio random 4k reads of the live
 *           generation and of frozen generation 1, page cache cold (drop_caches before every
 *           run) and warm; through redofs, QSD, the passthrough (with redofs' options, and
 *           "cached": no direct_io, kernel_cache), and the raw file itself. All servers are
 *           mounted at once and the targets take turns run by run, so load changes on a
 *           shared machine hit them alike.
 *   write   sequential allocating writes into an empty top, then overwrites (bs 1M and 64k):
 *           redofs (after addredo) against QSD writable (a qemu-img child of the same frozen
 *           file), alternating run by run; no fsync, `sync` between runs. Then the allocating
 *           runs again into fresh empty tops, each after drop_caches ("clean cache"): the same
 *           memory state for every run of either target. Also fio random 4k writes each
 *           followed by fsync, into new grains and over allocated ones (IOPS).
 *   commit  offline `redofs commit <disk> level=0` of the 25 % redo log (512 MiB) against
 *           `qemu-img commit` of an identical copy, and against `qemu-img commit` then `rm` of the
 *           redo log (the same end state: redofs deletes the merged redo log, qemu-img keeps it;
 *           redofs returns when the name is gone and leaves freeing the blocks to a helper).
 *           Also the same commit online, `echo level=0 > .ctl/vm/disk/commit` on a mounted copy
 *           (timed from the write to its return: the merge and the relink, no process start, the
 *           chain is already open; the server deletes the merged file after answering, so the
 *           same-end-state figure runs until the file is gone).
 *   open    2 TiB sparse chain with 1 GiB allocated: time until `redofs mount` announces
 *           "mounted", and the server's RSS. Then a store of 200 disks (100 VMs, 20 GiB bases
 *           and two redo logs each): mount time against `qemu-img info --backing-chain` of
 *           every top.
 *   soak    the handle-leak soak (scripts/bench-soak.ts), stock prebuild and patched build.
 *   --profile  extra passes with the redofs server under node --cpu-prof (read, then write
 *           workload); prints the top self-time functions. Not part of the timed figures.
 *
 * Needs root (drop_caches, FUSE), fio, qemu-img/qemu-io, qemu-storage-daemon (installed with
 * apt-get when missing). Works under /tmp/redofs-bench-*; every mount is undone at exit.
 * The machine this was written on has 2 vCPUs and noisy neighbours: read ratios, not digits.
 */
import { spawnSync } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { cpus, loadavg, totalmem } from 'node:os'
import { dirname, join } from 'node:path'
import {
  GiB, MiB, ROOT, benchDir, buildChain, ddRead, ddWrite, dropCaches, ensureTools, fioRandRead, fioSyncedWrite, log, median,
  mountPassthrough, mountQsd, mountRedofs, must, rawOf, redofs, rssOf, run, sleep, sweepMounts,
  type Server, type TestChain
} from './native/bench-lib'
import { soakOptions, soakTable, soakVariant, type SoakVariant } from './bench-soak'

// ---------------------------------------------------------------------------------------------
// options

const argv = process.argv.slice(2)
const flag = (name: string): boolean => argv.includes(`--${name}`)
const value = (name: string): string | undefined => { const i = argv.indexOf(`--${name}`); return i >= 0 ? argv[i + 1] : undefined }
const SECTIONS = ['read', 'write', 'commit', 'open', 'soak'] as const
type Section = typeof SECTIONS[number]
const only = new Set<Section>((value('only') ?? SECTIONS.join(',')).split(',').map(s => s.trim()).filter(s => s !== '') as Section[])
for (const s of only) if (!SECTIONS.includes(s)) throw new Error(`--only: unknown section "${s}" (known: ${SECTIONS.join(',')})`)
const quick = flag('quick')
const runs = Number(value('runs') ?? (quick ? 1 : 3))
const profile = flag('profile')
const keep = flag('keep')

const SIZES = quick
  ? { seq4k: 32 * MiB, seq: 256 * MiB, randSeconds: 2, randRegion: 256 * MiB, write1M: 128 * MiB, write64k: 64 * MiB, synced: 64 * MiB, openRuns: 2 }
  : { seq4k: 32 * MiB, seq: 1 * GiB, randSeconds: 2, randRegion: 1 * GiB, write1M: 256 * MiB, write64k: 128 * MiB, synced: 128 * MiB, openRuns: 3 }

// ---------------------------------------------------------------------------------------------
// results

interface Cell { median: number, samples: number[], unit: 'MB/s' | 'IOPS' | 's' | 'ms' | 'MiB' }
type Results = Record<string, unknown> & {
  env: Record<string, unknown>
  read?: Record<string, Record<string, Cell>>
  write?: Record<string, Record<string, Cell>>
  commit?: Record<string, Cell>
  open?: Record<string, Cell>
  soak?: SoakVariant[]
  profile?: Record<string, ProfileLine[]>
  ratios: Record<string, number>
  targets: Array<{ target: string, value: string, pass: boolean }>
}

const results: Results = {
  env: {
    date: new Date().toISOString(),
    node: process.version,
    kernel: spawnSync('uname', ['-r'], { encoding: 'utf8' }).stdout.trim(),
    cpus: cpus().length,
    memGiB: Math.round(totalmem() / GiB),
    quick,
    runs,
    sizes: SIZES,
    loadavgStart: loadavg().map(x => Math.round(x * 100) / 100)
  },
  ratios: {},
  targets: []
}

const cell = (samples: number[], unit: Cell['unit']): Cell => ({ median: median(samples), samples: samples.map(x => Math.round(x * 100) / 100), unit })

function section (name: string): void {
  log(`\n=== ${name} (load ${loadavg().map(x => x.toFixed(1)).join(' ')}) ===`)
}

// ---------------------------------------------------------------------------------------------
// read

const BS = [{ label: '4k', bs: 4096 }, { label: '128k', bs: 128 * 1024 }, { label: '1M', bs: MiB }]

interface Target { name: string, file: string }

async function withServer<T> (start: () => Promise<Server>, fn: (s: Server) => Promise<T>): Promise<T> {
  const s = await start()
  try {
    return await fn(s)
  } finally {
    await s.stop()
  }
}

/**
 * The read matrix over all targets at once, interleaved so that a change of machine load hits
 * every target alike: for each workload, the cold runs of all targets (drop_caches before each),
 * then one unmeasured pass per target to fill the caches, then the warm runs of all targets.
 * The starting target rotates from run to run.
 */
async function readMatrix (targets: Target[]): Promise<Record<string, Record<string, Cell>>> {
  const out: Record<string, Record<string, Cell>> = {}
  for (const t of targets) out[t.name] = {}
  const order = (r: number): Target[] => targets.map((_, i) => targets[(i + r) % targets.length])
  const workloads: Array<{ label: string, unit: Cell['unit'], once: (file: string) => Promise<number>, fill: (file: string) => Promise<unknown> }> = [
    ...BS.map(({ label, bs }) => {
      const bytes = bs === 4096 ? SIZES.seq4k : SIZES.seq
      return { label: `seq ${label}`, unit: 'MB/s' as const, once: async (f: string) => (await ddRead(f, bs, bytes)).MBps, fill: async (f: string) => await ddRead(f, MiB, bytes) }
    }),
    // random 4k over the first randRegion bytes
    {
      label: 'rand 4k',
      unit: 'IOPS' as const,
      once: async (f: string) => (await fioRandRead(f, { seconds: SIZES.randSeconds, direct: false, size: SIZES.randRegion })).iops,
      fill: async (f: string) => await ddRead(f, MiB, SIZES.randRegion)
    }
  ]
  for (const w of workloads) {
    const cold = new Map<string, number[]>(targets.map(t => [t.name, []]))
    const warm = new Map<string, number[]>(targets.map(t => [t.name, []]))
    for (let r = 0; r < runs; r++) {
      for (const t of order(r)) {
        dropCaches()
        cold.get(t.name)?.push(await w.once(t.file))
      }
    }
    for (const t of targets) await w.fill(t.file)
    for (let r = 0; r < runs; r++) {
      for (const t of order(r)) warm.get(t.name)?.push(await w.once(t.file))
    }
    for (const t of targets) {
      out[t.name][`${w.label} cold`] = cell(cold.get(t.name) as number[], w.unit)
      out[t.name][`${w.label} warm`] = cell(warm.get(t.name) as number[], w.unit)
    }
    log(`  ${w.label.padEnd(8)} cold/warm ${w.unit}: ` + targets.map(t => `${t.name} ${fmt(out[t.name][`${w.label} cold`].median)}/${fmt(out[t.name][`${w.label} warm`].median)}`).join(', '))
  }
  return out
}

async function benchRead (dir: string, chain: TestChain): Promise<void> {
  section('read')
  const live = chain.files.length - 1
  const frozen = 1
  const rawLive = await rawOf(chain, live, join(dir, 'live.raw'))
  const rawFrozen = await rawOf(chain, frozen, join(dir, 'frozen.raw'))
  // every server at once (QSD opens the chain read-only; nothing writes during this section)
  const servers: Server[] = []
  try {
    const r = await mountRedofs(chain.store, join(dir, 'mnt-redofs'))
    servers.push(r)
    const ql = await mountQsd(chain.files[live], join(dir, 'qsd-live.raw'), false)
    servers.push(ql)
    const qf = await mountQsd(chain.files[frozen], join(dir, 'qsd-frozen.raw'), false)
    servers.push(qf)
    const pt = await mountPassthrough(rawLive, join(dir, 'mnt-pt'))
    servers.push(pt)
    // what a frozen generation could get from the kernel's page cache (no direct_io, kernel_cache)
    const ptc = await mountPassthrough(rawFrozen, join(dir, 'mnt-ptc'), { cached: true })
    servers.push(ptc)
    const redofsLive = join(r.mnt, 'vm', 'disk.img')
    // sanity: the mount serves what qemu-img converts
    const a = await must('sh', ['-c', `dd if=${redofsLive} bs=1M count=64 skip=512 status=none | sha256sum`])
    const b = await must('sh', ['-c', `dd if=${rawLive} bs=1M count=64 skip=512 status=none | sha256sum`])
    if (a.stdout !== b.stdout) throw new Error('redofs live generation differs from qemu-img convert of the chain')
    results.read = await readMatrix([
      { name: 'redofs live', file: redofsLive },
      { name: 'redofs frozen', file: join(r.mnt, 'vm', `disk@${frozen}.img`) },
      { name: 'QSD live', file: ql.mnt },
      { name: 'QSD frozen', file: qf.mnt },
      { name: 'passthrough', file: join(pt.mnt, 'disk.img') },
      { name: 'passthrough cached', file: join(ptc.mnt, 'disk.img') },
      { name: 'raw file', file: rawLive }
    ])
  } finally {
    for (const s of servers.reverse()) await s.stop()
  }
  // cat of the raw reference: the kernel ceiling
  const catCold: number[] = []
  const catWarm: number[] = []
  for (let r = 0; r < runs; r++) {
    dropCaches()
    catCold.push(await catMBps(rawLive))
  }
  for (let r = 0; r < runs; r++) catWarm.push(await catMBps(rawLive))
  results.read['raw file']['cat cold'] = cell(catCold, 'MB/s')
  results.read['raw file']['cat warm'] = cell(catWarm, 'MB/s')
  log(`  ${'cat raw'.padEnd(8)} cold ${fmt(median(catCold))} warm ${fmt(median(catWarm))} MB/s`)
  rmSync(rawLive, { force: true })
  rmSync(rawFrozen, { force: true })
}

async function catMBps (file: string): Promise<number> {
  const size = statSync(file).size
  const t0 = process.hrtime.bigint()
  await must('sh', ['-c', `cat "${file}" > /dev/null`])
  return size / (Number(process.hrtime.bigint() - t0) / 1e9) / 1e6
}

// ---------------------------------------------------------------------------------------------
// write

interface WriteSpec { label: string, bs: number, bytes: number, base: number }

function writeSpecs (): WriteSpec[] {
  // allocating runs land in distinct, never-written regions of the new top; overwrites rewrite them
  const r1 = SIZES.write1M
  const r64 = SIZES.write64k
  return [
    { label: '1M', bs: MiB, bytes: r1, base: 0 },
    { label: '64k', bs: 64 * 1024, bytes: r64, base: runs * r1 }
  ]
}

/**
 * Writes, QSD and redofs alternating run by run (each run into its own never-written region).
 * `modes`: 'alloc' then 'overwrite' of the same regions with only a sync between runs (the page
 * caches fill up run after run), or 'alloc, clean cache': allocating runs each after
 * drop_caches, so every run of either target starts from the same memory state (on this VM,
 * memory the guest has not touched lately costs a host fault per page on first use, and a run
 * that follows others pays for their cached pages: see native-notes/performance.md).
 */
async function writeMatrix (targets: Target[], src: string, modes: ReadonlyArray<'alloc' | 'overwrite' | 'alloc, clean cache'>, out: Record<string, Record<string, Cell>> = {}): Promise<Record<string, Record<string, Cell>>> {
  for (const t of targets) out[t.name] ??= {}
  for (const mode of modes) {
    for (const w of writeSpecs()) {
      const xs = new Map<string, number[]>(targets.map(t => [t.name, []]))
      for (let r = 0; r < runs; r++) {
        for (let i = 0; i < targets.length; i++) {
          const t = targets[(i + r) % targets.length]
          await must('sync', [])
          if (mode === 'alloc, clean cache') {
            dropCaches()
            await must('sh', ['-c', 'cat "$1" > /dev/null', 'sh', src]) // the source back in the cache, as in the other runs
          }
          xs.get(t.name)?.push((await ddWrite(src, t.file, w.bs, w.bytes, w.base + r * w.bytes)).MBps)
        }
      }
      for (const t of targets) out[t.name][`${mode} ${w.label}`] = cell(xs.get(t.name) as number[], 'MB/s')
      log(`  ${mode.padEnd(18)} ${w.label.padEnd(4)} MB/s: ` + targets.map(t => `${t.name} ${fmt(out[t.name][`${mode} ${w.label}`].median)}`).join(', '))
    }
  }
  return out
}

/**
 * Random 4k writes each followed by fsync, QSD and redofs alternating: into grains never written
 * (each run its own region after the sequential ones: every write allocates a grain and copies
 * the rest of it from below) and into the grains the 1M runs allocated (overwrites in place).
 * No issue target; it shows what a database in the guest pays per fsync.
 */
async function syncedWrites (targets: Target[], out: Record<string, Record<string, Cell>>): Promise<void> {
  const firstFree = runs * (SIZES.write1M + SIZES.write64k)
  for (const mode of ['alloc', 'overwrite'] as const) {
    const xs = new Map<string, number[]>(targets.map(t => [t.name, []]))
    for (let r = 0; r < runs; r++) {
      for (let i = 0; i < targets.length; i++) {
        const t = targets[(i + r) % targets.length]
        await must('sync', [])
        const region = mode === 'alloc' ? { offset: firstFree + r * SIZES.synced, size: SIZES.synced } : { offset: 0, size: SIZES.write1M }
        xs.get(t.name)?.push((await fioSyncedWrite(t.file, { seconds: SIZES.randSeconds, ...region })).iops)
      }
    }
    const key = `synced rand 4k ${mode} (IOPS)`
    for (const t of targets) out[t.name][key] = cell(xs.get(t.name) as number[], 'IOPS')
    log(`  ${key.padEnd(32)}: ` + targets.map(t => `${t.name} ${fmt(out[t.name][key].median)}`).join(', '))
  }
}

async function benchWrite (dir: string, chain: TestChain): Promise<void> {
  section('write')
  const need = runs * (SIZES.write1M + SIZES.write64k + SIZES.synced)
  if (need > chain.size) throw new Error('write regions exceed the disk')
  const src = join(dir, 'random.src')
  await must('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', `count=${SIZES.write1M / MiB}`, 'status=none'])
  await must('sh', ['-c', 'cat "$1" > /dev/null', 'sh', src]) // page cache
  const qdir = join(dir, 'qsd-write')
  mkdirSync(qdir, { recursive: true })
  const qtop = join(qdir, 'top.vmdk')
  /** Empty tops on both sides, both mounted: run fn on their live files, then stop them. */
  const withEmptyTops = async (fn: (targets: Target[]) => Promise<void>): Promise<void> => {
    // redofs: addredo freezes the top and gives the live file an empty redo log
    await redofs('addredo', chain.disk)
    // QSD: a fresh qemu-img child of the chain's original top, outside the store (redofs must not
    // see it); the writes cover whole grains, so neither side reads what lies below its new top
    rmSync(qtop, { force: true })
    await must('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', chain.files[chain.files.length - 1], '-F', 'vmdk', qtop])
    const servers: Server[] = []
    try {
      const q = await mountQsd(qtop, join(dir, 'qsd-write.raw'), true)
      servers.push(q)
      const r = await mountRedofs(chain.store, join(dir, 'mnt-redofs-w'))
      servers.push(r)
      await fn([{ name: 'redofs', file: join(r.mnt, 'vm', 'disk.img') }, { name: 'QSD', file: q.mnt }])
    } finally {
      for (const s of servers.reverse()) await s.stop()
    }
  }
  await withEmptyTops(async targets => {
    results.write = await writeMatrix(targets, src, ['alloc', 'overwrite'])
    await syncedWrites(targets, results.write)
  })
  // the same allocating runs once more into fresh empty tops, each from a clean page cache
  await withEmptyTops(async targets => { await writeMatrix(targets, src, ['alloc, clean cache'], results.write) })
  await must('sync', [])
  rmSync(qdir, { recursive: true, force: true })
}

// ---------------------------------------------------------------------------------------------
// commit

async function benchCommit (dir: string, chain: TestChain): Promise<void> {
  section('commit')
  // base + the 25 % redo log (generation 1 of the read chain), copied fresh for every run
  const files = [chain.files[0], chain.files[1]]
  const mb = Math.round(statSync(files[1]).size / 1e6)
  const fresh = async (tag: string): Promise<string> => {
    const vm = join(dir, `commit-${tag}`, 'store', 'vm')
    rmSync(join(dir, `commit-${tag}`), { recursive: true, force: true })
    mkdirSync(vm, { recursive: true })
    for (const f of files) copyFileSync(f, join(vm, f.split('/').pop() as string))
    await must('sync', [])
    return vm
  }
  const ours: number[] = []
  const online: number[] = []
  const onlineGone: number[] = []
  const theirs: number[] = []
  const theirsRm: number[] = []
  for (let r = 0; r < runs; r++) {
    let vm = await fresh('redofs')
    let t0 = process.hrtime.bigint()
    await redofs('commit', join(vm, 'disk'), 'level=0')
    ours.push(Number(process.hrtime.bigint() - t0) / 1e9)
    vm = await fresh('online')
    const mnt = join(dir, 'commit-online', 'mnt')
    const srv = await mountRedofs(dirname(vm), mnt)
    try {
      t0 = process.hrtime.bigint()
      await must('sh', ['-c', `echo level=0 > ${join(mnt, '.ctl', 'vm', 'disk', 'commit')}`])
      online.push(Number(process.hrtime.bigint() - t0) / 1e9)
      // the server deletes the merged redo log after answering: the same end state as
      // qemu-img commit + rm is when it is gone
      const deadline = Date.now() + 60_000
      while (readdirSync(vm).some(f => f.endsWith('.redofs-dropped'))) {
        if (Date.now() > deadline) throw new Error(`the server did not delete the merged redo log in ${vm} within 60 s`)
        await sleep(2)
      }
      onlineGone.push(Number(process.hrtime.bigint() - t0) / 1e9)
    } finally {
      await srv.stop()
    }
    if (existsSync(join(vm, 'disk-000001.vmdk'))) throw new Error('online commit left the redo log in place')
    vm = await fresh('qemu')
    t0 = process.hrtime.bigint()
    await must('qemu-img', ['commit', '-q', '-f', 'vmdk', join(vm, 'disk-000001.vmdk')])
    theirs.push(Number(process.hrtime.bigint() - t0) / 1e9)
    await must('rm', [join(vm, 'disk-000001.vmdk')])
    theirsRm.push(Number(process.hrtime.bigint() - t0) / 1e9)
    log(`  commit run ${r}: redofs ${ours[r].toFixed(2)} s, online ${online[r].toFixed(2)} s (file deleted ${onlineGone[r].toFixed(2)} s), qemu-img ${theirs[r].toFixed(2)} s, with rm ${theirsRm[r].toFixed(2)} s (redo log file ${mb} MB)`)
  }
  rmSync(join(dir, 'commit-redofs'), { recursive: true, force: true })
  rmSync(join(dir, 'commit-qemu'), { recursive: true, force: true })
  rmSync(join(dir, 'commit-online'), { recursive: true, force: true })
  results.commit = { 'redofs commit': cell(ours, 's'), 'redofs online commit': cell(online, 's'), 'redofs online commit, file deleted': cell(onlineGone, 's'), 'qemu-img commit': cell(theirs, 's'), 'qemu-img commit + rm': cell(theirsRm, 's'), 'redo log MB': cell([mb], 'MiB') }
}

// ---------------------------------------------------------------------------------------------
// open

async function benchOpen (dir: string): Promise<void> {
  section('open')
  const vmDir = join(dir, 'open', 'store', 'vm')
  const disk = join(vmDir, 'disk')
  await redofs('create', disk, '--size', '2T')
  await redofs('addredo', disk)
  const pieces = 1024
  const step = Math.floor((2 * 2 ** 40) / pieces / MiB) * MiB
  const cmds: string[] = []
  for (let i = 0; i < pieces; i++) cmds.push('-c', `write -P ${(i % 250) + 1} ${i * step} 1M`)
  await must('qemu-io', ['-t', 'unsafe', '-f', 'vmdk', ...cmds, join(vmDir, 'disk-000001.vmdk')])
  await must('sync', [])
  const ms: number[] = []
  const rss: number[] = []
  const hwm: number[] = []
  const rssAfterRead: number[] = []
  for (let r = 0; r < SIZES.openRuns; r++) {
    dropCaches()
    await withServer(async () => await mountRedofs(join(dir, 'open', 'store'), join(dir, 'open', 'mnt')), async s => {
      const m = s as Server & { readyMs: number }
      ms.push(m.readyMs)
      const pid = s.child.pid as number
      rss.push(rssOf(pid).rssMiB)
      // read 64 MiB scattered over the disk (touching many grain tables)
      await must('sh', ['-c', `for i in $(seq 0 63); do dd if="${join(s.mnt, 'vm', 'disk.img')}" of=/dev/null bs=1M count=1 skip=$((i * ${step / MiB} * 16)) status=none; done`])
      const after = rssOf(pid)
      rssAfterRead.push(after.rssMiB)
      hwm.push(after.hwmMiB)
    })
    log(`  open run ${r}: mounted in ${ms[r].toFixed(0)} ms, RSS ${rss[r].toFixed(0)} MiB (after reads ${rssAfterRead[r].toFixed(0)}, peak ${hwm[r].toFixed(0)})`)
  }
  const base = spawnSync(process.execPath, ['-e', 'console.log(process.resourceUsage().maxRSS / 1024)'], { encoding: 'utf8' })
  results.open = {
    'mount ms': cell(ms, 'ms'),
    'RSS MiB': cell(rss, 'MiB'),
    'RSS after reads MiB': cell(rssAfterRead, 'MiB'),
    'peak RSS MiB': cell(hwm, 'MiB'),
    'bare node peak RSS MiB': cell([Number(base.stdout)], 'MiB'),
    ...await benchManyDisks(join(dir, 'open'))
  }
  rmSync(join(dir, 'open'), { recursive: true, force: true })
}

const MANY = { vms: 100, disks: 2, size: '20G' }

/**
 * A datastore of many disks: 100 VMs of two disks, each a 20 GiB base and two redo logs made by
 * qemu-img (their grain tables preallocated, as VMware's are). The mount opens every chain;
 * `qemu-img info --backing-chain` of every top (one process per disk, as a script would run
 * it) is the reference for opening them all once.
 */
async function benchManyDisks (dir: string): Promise<Record<string, Cell>> {
  const store = join(dir, 'many')
  const first = join(store, 'vm1')
  mkdirSync(first, { recursive: true })
  for (let d = 0; d < MANY.disks; d++) {
    await must('qemu-img', ['create', '-q', '-f', 'vmdk', join(first, `disk${d}.vmdk`), MANY.size])
    await must('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', `disk${d}.vmdk`, '-F', 'vmdk', join(first, `disk${d}-000001.vmdk`)])
    await must('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', `disk${d}-000001.vmdk`, '-F', 'vmdk', join(first, `disk${d}-000002.vmdk`)])
  }
  for (let v = 2; v <= MANY.vms; v++) await must('cp', ['-a', '--sparse=always', first, join(store, `vm${v}`)])
  const tops = Array.from({ length: MANY.vms * MANY.disks }, (_, i) => join(store, `vm${Math.floor(i / MANY.disks) + 1}`, `disk${i % MANY.disks}-000002.vmdk`))
  await must('sync', [])
  const ms: number[] = []
  const rss: number[] = []
  const qemu: number[] = []
  for (let r = 0; r < SIZES.openRuns; r++) {
    dropCaches()
    await withServer(async () => await mountRedofs(store, join(dir, 'many-mnt')), async s => {
      ms.push((s as Server & { readyMs: number }).readyMs)
      rss.push(rssOf(s.child.pid as number).rssMiB)
    })
    dropCaches()
    const t0 = process.hrtime.bigint()
    await must('sh', ['-c', 'for f in "$@"; do qemu-img info --backing-chain "$f" > /dev/null || exit 1; done', 'sh', ...tops])
    qemu.push(Number(process.hrtime.bigint() - t0) / 1e6)
    log(`  ${tops.length} disks, run ${r}: mounted in ${ms[r].toFixed(0)} ms, RSS ${rss[r].toFixed(0)} MiB; qemu-img info of every chain ${qemu[r].toFixed(0)} ms`)
  }
  return { 'many disks mount ms': cell(ms, 'ms'), 'many disks RSS MiB': cell(rss, 'MiB'), 'many disks qemu-img info ms': cell(qemu, 'ms') }
}

// ---------------------------------------------------------------------------------------------
// soak

async function benchSoak (chain: TestChain): Promise<void> {
  section('soak')
  const o = soakOptions(quick, quick ? { rounds: 5 } : { rounds: 6 })
  const out: SoakVariant[] = []
  for (const v of ['stock', 'patched'] as const) out.push(await soakVariant(chain, v, o))
  results.soak = out
}

// ---------------------------------------------------------------------------------------------
// profile

/** selfPct: share of the JS thread's busy (non-idle) samples; the '(idle)' line gives idle as a share of all. */
interface ProfileLine { selfPct: number, selfMs: number, fn: string, where: string }

interface CpuProfile {
  nodes: Array<{ id: number, callFrame: { functionName: string, url: string, lineNumber: number }, hitCount?: number }>
  samples: number[]
  timeDeltas: number[]
}

/** Self time per function of a .cpuprofile, top `n`. */
export function summariseProfile (file: string, n = 15): ProfileLine[] {
  const p = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile
  const byId = new Map(p.nodes.map(x => [x.id, x]))
  const self = new Map<string, number>()
  let total = 0
  for (let i = 0; i < p.samples.length; i++) {
    const node = byId.get(p.samples[i])
    const dt = p.timeDeltas[i] ?? 0
    if (node === undefined) continue
    const cf = node.callFrame
    const where = cf.url === '' ? '' : `${cf.url.replace(/^file:\/\//, '').replace(ROOT + '/', '')}:${cf.lineNumber + 1}`
    const key = `${cf.functionName === '' ? '(anonymous)' : cf.functionName}\t${where}`
    self.set(key, (self.get(key) ?? 0) + dt)
    total += dt
  }
  const idleKey = '(idle)\t'
  const idle = self.get(idleKey) ?? 0
  self.delete(idleKey)
  const busy = total - idle
  const lines = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, us]) => {
    const [fn, where] = k.split('\t')
    return { selfPct: Math.round(1000 * us / busy) / 10, selfMs: Math.round(us / 1000), fn, where }
  })
  return [{ selfPct: Math.round(1000 * idle / total) / 10, selfMs: Math.round(idle / 1000), fn: '(idle)', where: 'share of all samples; the lines below are shares of the busy ones' }, ...lines]
}

async function benchProfile (dir: string, chain: TestChain): Promise<void> {
  section('profile (node --cpu-prof on the redofs server)')
  results.profile = {}
  const src = join(dir, 'random.src')
  if (!existsSync(src)) await must('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', `count=${SIZES.write1M / MiB}`, 'status=none'])
  const workloads: Record<string, (file: string) => Promise<void>> = {
    read: async file => {
      await ddRead(file, MiB, SIZES.seq)
      await ddRead(file, 128 * 1024, SIZES.seq)
      await fioRandRead(file, { seconds: 3, direct: false, size: SIZES.randRegion })
    },
    write: async file => {
      // the top after benchWrite already holds the first regions: write beyond them (allocating)
      const base = runs * (SIZES.write1M + SIZES.write64k)
      await ddWrite(src, file, MiB, SIZES.write1M, base)
      await ddWrite(src, file, 64 * 1024, SIZES.write64k, base + SIZES.write1M)
      await ddWrite(src, file, MiB, SIZES.write1M, base) // overwrite
    }
  }
  for (const [name, work] of Object.entries(workloads)) {
    const profDir = join(dir, `prof-${name}`)
    rmSync(profDir, { recursive: true, force: true })
    await withServer(async () => await mountRedofs(chain.store, join(dir, `mnt-prof-${name}`), { nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${profDir}`] }), async s => {
      await work(join(s.mnt, 'vm', 'disk.img'))
    })
    await sleep(500)
    const f = readdirSync(profDir).find(x => x.endsWith('.cpuprofile'))
    if (f === undefined) { log(`  no profile written for ${name}`); continue }
    const keepAs = join(ROOT, '.bench', `redofs-${name}.cpuprofile`)
    mkdirSync(dirname(keepAs), { recursive: true })
    copyFileSync(join(profDir, f), keepAs)
    results.profile[name] = summariseProfile(keepAs)
    log(`  ${name}: ${keepAs}`)
    for (const l of results.profile[name]) log(`    ${String(l.selfPct).padStart(5)} %  ${l.fn}  ${l.where}`)
  }
}

// ---------------------------------------------------------------------------------------------
// report

function fmt (x: number | undefined): string {
  if (x === undefined || Number.isNaN(x)) return '-'
  if (x >= 100) return String(Math.round(x))
  if (x >= 10) return x.toFixed(1)
  return x.toFixed(2)
}

const ratio = (a: number | undefined, b: number | undefined): number => (a === undefined || b === undefined || b === 0) ? NaN : a / b

function report (): string {
  const out: string[] = []
  const R = results.read
  if (R !== undefined) {
    const cols = ['redofs live', 'redofs frozen', 'QSD live', 'QSD frozen', 'passthrough', 'passthrough cached', 'raw file']
    out.push(`### Reads (MB/s; rand 4k in IOPS; median of ${runs})`, '',
      `| workload | ${cols.join(' | ')} | live/QSD | frozen/QSD | live/passthrough |`,
      `| --- |${cols.map(() => ' ---: |').join('')} ---: | ---: | ---: |`)
    for (const w of Object.keys(R['redofs live'])) {
      const v = (c: string): number | undefined => R[c]?.[w]?.median
      const a = ratio(v('redofs live'), v('QSD live'))
      const b = ratio(v('redofs frozen'), v('QSD frozen'))
      const c = ratio(v('redofs live'), v('passthrough'))
      results.ratios[`read ${w} live/QSD`] = a
      results.ratios[`read ${w} frozen/QSD`] = b
      results.ratios[`read ${w} live/passthrough`] = c
      out.push(`| ${w} | ${cols.map(c => fmt(v(c))).join(' | ')} | ${fmt(a)} | ${fmt(b)} | ${fmt(c)} |`)
    }
    const cat = R['raw file']
    out.push('', `cat of the raw reference (kernel ceiling): cold ${fmt(cat['cat cold']?.median)} MB/s, warm ${fmt(cat['cat warm']?.median)} MB/s.`,
      '"passthrough cached" serves the frozen generation\'s raw copy without direct_io and with kernel_cache (pages survive close/open): the ceiling for an immutable frozen generation.', '')
  }
  const W = results.write
  if (W !== undefined) {
    out.push(`### Writes into the top (MB/s; synced rand 4k in IOPS; median of ${runs})`, '', '| workload | redofs | QSD | redofs/QSD |', '| --- | ---: | ---: | ---: |')
    for (const w of Object.keys(W.redofs)) {
      const a = ratio(W.redofs[w]?.median, W.QSD[w]?.median)
      results.ratios[`write ${w} redofs/QSD`] = a
      out.push(`| ${w} | ${fmt(W.redofs[w]?.median)} | ${fmt(W.QSD[w]?.median)} | ${fmt(a)} |`)
    }
    out.push('')
  }
  const C = results.commit
  if (C !== undefined) {
    const a = ratio(C['qemu-img commit'].median, C['redofs commit'].median)
    const b = ratio(C['qemu-img commit + rm'].median, C['redofs commit'].median)
    const c = ratio(C['qemu-img commit'].median, C['redofs online commit'].median)
    const d = ratio(C['qemu-img commit + rm'].median, C['redofs online commit, file deleted'].median)
    results.ratios['commit qemu-img/redofs (speedup)'] = a
    results.ratios['commit qemu-img+rm/redofs (speedup, same end state)'] = b
    results.ratios['online commit qemu-img/redofs (speedup)'] = c
    results.ratios['online commit qemu-img+rm/redofs (speedup, same end state)'] = d
    out.push(`### Commit of a ${C['redo log MB'].median} MB redo log (s, median of ${runs})`, '',
      'redofs deletes the merged redo log (ESX semantics); qemu-img keeps it, so "+ rm" is the same end state. redofs returns once the name is gone: a helper process frees the file\'s blocks (~0.2 s for 512 MiB here) after it.',
      'Offline is the whole `redofs commit` command (node start included); online is `echo level=0 > .ctl/vm/disk/commit` on a mounted store, which answers before it deletes the merged file: its same-end-state figure is until the file is gone.', '',
      '| redofs | qemu-img commit | qemu-img commit + rm | speedup | speedup, same end state |', '| --- | ---: | ---: | ---: | ---: |',
      `| offline ${fmt(C['redofs commit'].median)} | ${fmt(C['qemu-img commit'].median)} | ${fmt(C['qemu-img commit + rm'].median)} | ${fmt(a)} | ${fmt(b)} |`,
      `| online ${fmt(C['redofs online commit'].median)} (file deleted ${fmt(C['redofs online commit, file deleted'].median)}) | | | ${fmt(c)} | ${fmt(d)} |`, '')
  }
  const O = results.open
  if (O !== undefined) {
    out.push(`### 2 TiB chain with 1 GiB allocated (median of ${SIZES.openRuns})`, '', '| mount (until "mounted") | RSS after mount | RSS after 64 scattered 1 MiB reads | peak RSS | bare node |', '| ---: | ---: | ---: | ---: | ---: |',
      `| ${fmt(O['mount ms'].median)} ms | ${fmt(O['RSS MiB'].median)} MiB | ${fmt(O['RSS after reads MiB'].median)} MiB | ${fmt(O['peak RSS MiB'].median)} MiB | ${fmt(O['bare node peak RSS MiB'].median)} MiB |`, '',
      `### A store of ${MANY.vms * MANY.disks} disks (${MANY.vms} VMs, ${MANY.size} bases + 2 redo logs each, qemu-img made; median of ${SIZES.openRuns}, cold cache)`, '',
      '| mount (until "mounted") | RSS after mount | `qemu-img info --backing-chain` of every top | ratio |', '| ---: | ---: | ---: | ---: |',
      `| ${fmt(O['many disks mount ms'].median)} ms | ${fmt(O['many disks RSS MiB'].median)} MiB | ${fmt(O['many disks qemu-img info ms'].median)} ms | ${fmt(O['many disks qemu-img info ms'].median / O['many disks mount ms'].median)} |`, '')
  }
  if (results.soak !== undefined) out.push('### Handle-leak soak (seq and rand: first vs last round, medians of three measurements each; bursts/s: churn rounds 1-2 vs the last two)', '', soakTable(results.soak), '')
  // targets of the issue
  const t = results.targets
  const add = (target: string, v: number, goal: number, unit = '×', lower = false): void => {
    if (v === undefined || Number.isNaN(v)) return
    t.push({ target, value: `${fmt(v)}${unit}`, pass: lower ? v < goal : v >= goal })
  }
  add('live seq read 1M warm ≥ 1.2× QSD', results.ratios['read seq 1M warm live/QSD'], 1.2)
  add('live seq read 1M cold ≥ 1.2× QSD', results.ratios['read seq 1M cold live/QSD'], 1.2)
  add('live seq read 1M warm ≥ 80 % of passthrough', results.ratios['read seq 1M warm live/passthrough'], 0.8)
  add('live seq read 128k warm ≥ 1.2× QSD', results.ratios['read seq 128k warm live/QSD'], 1.2)
  add('frozen re-read (1M, warm) ≥ 5× QSD', results.ratios['read seq 1M warm frozen/QSD'], 5)
  add('allocating writes 1M ≥ 3× QSD', results.ratios['write alloc 1M redofs/QSD'], 3)
  add('allocating writes 64k ≥ 3× QSD', results.ratios['write alloc 64k redofs/QSD'], 3)
  add('allocating writes 1M ≥ 3× QSD, clean page cache', results.ratios['write alloc, clean cache 1M redofs/QSD'], 3)
  add('allocating writes 64k ≥ 3× QSD, clean page cache', results.ratios['write alloc, clean cache 64k redofs/QSD'], 3)
  add('commit ≥ 1.5× faster than qemu-img', results.ratios['commit qemu-img/redofs (speedup)'], 1.5)
  add('commit ≥ 1.5× faster than qemu-img + rm (same end state)', results.ratios['commit qemu-img+rm/redofs (speedup, same end state)'], 1.5)
  add('online commit ≥ 1.5× faster than qemu-img', results.ratios['online commit qemu-img/redofs (speedup)'], 1.5)
  add('online commit ≥ 1.5× faster than qemu-img + rm (same end state)', results.ratios['online commit qemu-img+rm/redofs (speedup, same end state)'], 1.5)
  if (O !== undefined) {
    add('2 TiB chain mounts < 2 s', O['mount ms'].median / 1000, 2, ' s', true)
    add('RSS < 200 MB (peak)', O['peak RSS MiB'].median * 1.048576, 200, ' MB', true)
  }
  if (t.length > 0) {
    out.push('### Targets', '', '| target | measured | |', '| --- | ---: | --- |')
    for (const x of t) out.push(`| ${x.target} | ${x.value} | ${x.pass ? 'met' : 'NOT met'} |`)
    out.push('')
  }
  return out.join('\n')
}

// ---------------------------------------------------------------------------------------------

async function main (): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('run as root (drop_caches, FUSE mounts)')
  ensureTools({ fio: 'fio', 'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils', 'qemu-storage-daemon': 'qemu-system-common', fusermount: 'fuse' })
  const chk = await run('bash', [join(ROOT, 'scripts', 'build-fuse-native.sh'), '--check'])
  results.env.fuseNative = chk.code === 0 ? 'patched build (scripts/build-fuse-native.sh)' : 'STOCK PREBUILD (leaks handles; run scripts/build-fuse-native.sh)'
  if (chk.code !== 0) log(`bench: WARNING: ${chk.stderr.trim()}`)
  results.env.qemu = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0]
  const dir = benchDir('main')
  process.on('exit', sweepMounts)
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      sweepMounts()
      if (!keep) rmSync(dir, { recursive: true, force: true })
      process.exit(130)
    })
  }
  const t0 = Date.now()
  try {
    let chain: TestChain | undefined
    const needChain = only.has('read') || only.has('write') || only.has('commit') || only.has('soak') || profile
    if (needChain) {
      section('building the 2 GiB chain')
      const tb = Date.now()
      chain = await buildChain(dir)
      log(`  ${chain.files.length} files, grains rewritten per redo log: ${chain.grainsPerRedo.join(', ')} (${((Date.now() - tb) / 1000).toFixed(1)} s)`)
    }
    if (only.has('read') && chain !== undefined) await benchRead(dir, chain)
    if (only.has('commit') && chain !== undefined) await benchCommit(dir, chain)
    if (only.has('soak') && chain !== undefined) await benchSoak(chain)
    if (only.has('write') && chain !== undefined) await benchWrite(dir, chain)
    if (only.has('open')) await benchOpen(dir)
    if (profile && chain !== undefined) await benchProfile(dir, chain)
  } finally {
    sweepMounts()
    if (!keep) rmSync(dir, { recursive: true, force: true })
    else log(`bench: kept ${dir}`)
  }
  results.env.seconds = Math.round((Date.now() - t0) / 1000)
  results.env.loadavgEnd = loadavg().map(x => Math.round(x * 100) / 100)
  const text = report()
  process.stdout.write(`\n${text}\n`)
  const out = value('json') ?? join(ROOT, '.bench', 'results.json')
  mkdirSync(dirname(out), { recursive: true })
  writeFileSync(out, JSON.stringify(results, null, 2))
  writeFileSync(out.replace(/\.json$/, '.md'), text)
  log(`bench: ${results.env.seconds} s; wrote ${out} (and .md)`)
}

main().catch(e => {
  process.stderr.write(`bench: ${(e as Error).stack}\n`)
  sweepMounts()
  process.exit(1)
})
