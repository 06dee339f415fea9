/**
 * Worker-side I/O, mostly overwrites (addon patch level 5, src/fs/plans.ts): a write whose every byte
 * already has its place in the live layer (allocated grains of a sparse or COWD redo log, a flat base)
 * is planned by JS and written by the FUSE worker thread that carries it. Checked here: the
 * workers do write the bytes (per-thread counters), the files left behind hold what was written
 * (qemu-img convert, both extent kinds), allocating writes still go through JS, and a planned
 * write or read that fails in the worker is done by JS instead (the addon's test hook
 * REDOFS_FAIL_WORKER_IO=1 makes every one fail), and idle workers beyond four park (level 6).
 * Worker reads have their own tests in e2e-read.
 */
import test from 'ava'
import { randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import path from 'node:path'
import { createDisk, e2e, fuseWorkers, requireFuse, sh, sleep, type Server } from './helpers/mount'
import { infoJson, redofsOk } from './helpers/redofs'
import { convertToRaw, describe, qemuCheck, sameContent } from './helpers/qemu'

requireFuse(test)
const ctx = e2e(test)

const K = 1024
const M = 1024 * K
const SIZE = 32 * M
const DISKS = ['sparse', 'cowd', 'flat']

/** dd of `src` into `file` at `pos` in a child process (bs 64k, fsync at the end). */
async function ddWrite (src: string, file: string, pos: number, len: number): Promise<void> {
  const r = await sh('dd if="$1" of="$2" bs=64k iflag=count_bytes oflag=seek_bytes seek="$3" count="$4" conv=notrunc,fsync status=none', [src, file, String(pos), String(len)])
  if (r.code !== 0) throw new Error(`dd into ${file}: ${describe(r)}`)
}

interface Setup { root: string, store: string, shadows: Record<string, string> }

/**
 * A store with three disks, all empty to start with: `sparse` and `cowd` (a sparse base frozen
 * by an addredo: writes land in a monolithicSparse or a vmfsSparse (COWD) redo log) and `flat`
 * (a monolithicFlat base, no redo log: writes land in the flat file). A raw shadow of each
 * receives the same writes.
 */
async function setup (): Promise<Setup> {
  const root = await ctx.tmp()
  const store = path.join(root, 'store')
  await createDisk(store, 'vm', 'sparse', '32M', 'sparse')
  await redofsOk(['addredo', path.join(store, 'vm', 'sparse')])
  await createDisk(store, 'vm', 'cowd', '32M', 'sparse')
  await redofsOk(['addredo', path.join(store, 'vm', 'cowd'), '--redo-format', 'cowd'])
  await createDisk(store, 'vm', 'flat', '32M', 'flat')
  const shadows: Record<string, string> = {}
  for (const d of DISKS) {
    shadows[d] = path.join(root, `${d}.shadow`)
    await writeFile(shadows[d], Buffer.alloc(SIZE))
  }
  return { root, store, shadows }
}

/** Write `len` random bytes at `pos` through the mount and into the shadow. */
async function writeBoth (s: Setup, srv: Server, disk: string, pos: number, len: number): Promise<void> {
  const src = path.join(s.root, 'src')
  await writeFile(src, randomBytes(len))
  await ddWrite(src, srv.img('vm', disk), pos, len)
  const r = await sh('dd if="$1" of="$2" bs=64k oflag=seek_bytes seek="$3" conv=notrunc status=none', [src, s.shadows[disk], String(pos)])
  if (r.code !== 0) throw new Error(describe(r))
}

/** After unmount: each disk's top converts to exactly its shadow, and qemu-img check passes. */
async function filesHoldShadows (t: import('ava').ExecutionContext, s: Setup, label: string): Promise<void> {
  for (const disk of DISKS) {
    const layers = (await infoJson(path.join(s.store, 'vm', disk))).layers
    const top = path.resolve(s.store, 'vm', layers[layers.length - 1].file)
    const raw = path.join(s.root, `${disk}.out`)
    await convertToRaw(top, raw)
    const c = await sameContent(raw, s.shadows[disk])
    t.true(c.same, `${label}: qemu-img convert of ${path.basename(top)} equals every write made (${c.detail})`)
    const chk = await qemuCheck(top)
    t.is(chk.code, 0, `${label}: qemu-img check ${path.basename(top)}: ${describe(chk)}`)
  }
}

test.serial('overwrites of data in place are written by the FUSE worker threads (sparse and COWD redo logs, flat base); allocating writes and --no-worker-io are not; the files hold every write', async t => {
  const run = async (args: string[], label: string): Promise<{ alloc: number, over: Record<string, number> }> => {
    const s = await setup()
    const srv = await ctx.mount(s.store, path.join(s.root, 'mnt'), args)
    const pid = srv.proc.pid as number
    let alloc = 0
    const over: Record<string, number> = {}
    try {
      t.true((await fuseWorkers(pid)).threads > 0, `${label}: the server has threads named redofs-fuse (the patched addon's workers)`)
      // 4 MiB of new grains in the sparse redo log: JS allocates them
      let w0 = (await fuseWorkers(pid)).wchar
      await writeBoth(s, srv, 'sparse', 3 * M + 4 * K, 4 * M)
      alloc = (await fuseWorkers(pid)).wchar - w0
      await writeBoth(s, srv, 'cowd', 3 * M + 4 * K, 4 * M)
      await writeBoth(s, srv, 'flat', 3 * M + 4 * K, 4 * M) // the flat file has its place already
      for (const disk of DISKS) {
        // the same range again, and one at an odd offset inside it
        w0 = (await fuseWorkers(pid)).wchar
        await writeBoth(s, srv, disk, 3 * M + 4 * K, 4 * M)
        await writeBoth(s, srv, disk, 5 * M + 1234, 300 * K)
        over[disk] = (await fuseWorkers(pid)).wchar - w0
      }
      // what the mount serves now
      for (const disk of DISKS) {
        const r = await sh('cmp "$1" "$2"', [srv.img('vm', disk), s.shadows[disk]])
        t.is(r.code, 0, `${label}: ${disk}.img reads back every write: ${describe(r)}`)
      }
    } finally {
      await srv.stopClean(t)
    }
    await filesHoldShadows(t, s, label)
    return { alloc, over }
  }
  const planned = await run([], 'default')
  // the workers write the overwritten bytes themselves (4.3 MiB per disk) besides the replies to
  // the kernel (16 bytes each); for the allocating write only the replies (~1 KiB here)
  t.true(planned.alloc < 64 * K, `default: the FUSE workers wrote ${planned.alloc} bytes during an allocating write of 4 MiB (JS writes new grains)`)
  for (const disk of DISKS) t.true(planned.over[disk] >= 4 * M, `default: the FUSE workers wrote ${planned.over[disk]} bytes while 4.3 MiB of ${disk} was overwritten`)
  const ordinary = await run(['--no-worker-io'], '--no-worker-io')
  for (const disk of DISKS) t.true(ordinary.over[disk] < 64 * K, `--no-worker-io: the FUSE workers wrote ${ordinary.over[disk]} bytes (replies only) while ${disk} was overwritten`)
})

test.serial('planned overwrites and reads that fail in the worker are done by JS instead, which says so (log and status); the files hold every write', async t => {
  const s = await setup()
  const srv = await ctx.mount(s.store, path.join(s.root, 'mnt'), [], { REDOFS_FAIL_WORKER_IO: '1', DEBUG: 'redofs:fs' })
  try {
    for (const disk of DISKS) {
      await writeBoth(s, srv, disk, 0, 2 * M) // allocates in the redo logs; the flat file has the room
      await writeBoth(s, srv, disk, 64 * K + 512, M)
      t.regex(srv.stderr, new RegExp(`vm/${disk}\\.img: a worker-side write of \\d+ bytes at \\d+ failed; writing it here`), `the ${disk} overwrite was planned, failed in the worker and went back to JS`)
    }
    for (const disk of DISKS) {
      const st = await sh('cat "$1"', [srv.ctl('vm', disk, 'status')])
      const notices = (JSON.parse(st.stdout) as { notices: string[] }).notices
      t.true(notices.some(n => new RegExp(`a worker-side write of \\d+ bytes at \\d+ of vm/${disk}\\.img failed; done again by JS, it succeeded`).test(n)),
        `${disk}'s status says a worker failed what JS then did (notices: ${JSON.stringify(notices)})`)
    }
    for (const disk of DISKS) {
      // O_DIRECT: every byte is a read request, each planned, failed by the worker, read by JS
      const r = await sh('cmp <(dd if="$1" bs=1M iflag=direct status=none) "$2"', [srv.img('vm', disk), s.shadows[disk]])
      t.is(r.code, 0, `${disk}.img reads back every write: ${describe(r)}`)
    }
    t.regex(srv.stderr, /vm\/sparse\.img: a worker-side read of \d+ bytes at \d+ failed; reading it here/, 'reads were planned, failed in the worker and went back to JS')
    const st = await sh('cat "$1"', [srv.ctl('vm', 'sparse', 'status')])
    const notices = (JSON.parse(st.stdout) as { notices: string[] }).notices
    t.true(notices.some(n => /a worker-side read of \d+ bytes at \d+ of vm\/sparse\.img failed; done again by JS, it succeeded/.test(n)), `status says so for reads too (notices: ${JSON.stringify(notices)})`)
  } finally {
    await srv.stopClean(t)
  }
  await filesHoldShadows(t, s, 'failing worker I/O')
})

/** 100 bursts of 32 parallel 4 KiB O_DIRECT reads of `file`, from a child process with 32 libuv threads. */
const BURSTS = `
const fs = require('fs/promises')
;(async () => {
  const fh = await fs.open(process.argv[1], fs.constants.O_RDONLY | fs.constants.O_DIRECT)
  const bufs = Array.from({ length: 32 }, () => Buffer.alloc(4096))
  for (let w = 0; w < 100; w++) await Promise.all(bufs.map((b, i) => fh.read(b, 0, 4096, ((w * 32 + i) % 1024) * 4096)))
  await fh.close()
})().catch(e => { console.error(e); process.exit(1) })`

async function bursts (file: string): Promise<void> {
  const r = await sh('UV_THREADPOOL_SIZE=32 "$1" -e "$2" "$3"', [process.execPath, BURSTS, file])
  if (r.code !== 0) throw new Error(`parallel reads of ${file}: ${describe(r)}`)
}

test.serial('idle FUSE workers beyond four park instead of waiting on /dev/fuse (REDOFS_FUSE_READERS=0: all wait there); parked ones serve the next bursts and leave at unmount', async t => {
  const s = await setup()
  // an empty REDOFS_FUSE_READERS means the default, whatever this process's environment says
  for (const [readers, cap] of [['', 4], ['0', Infinity]] as const) {
    const label = cap === 4 ? 'default' : 'REDOFS_FUSE_READERS=0'
    const srv = await ctx.mount(s.store, path.join(s.root, `mnt-${cap}`), [], { REDOFS_FUSE_READERS: readers, REDOFS_FUSE_TRACE: '1' })
    let pool = 0
    try {
      await writeBoth(s, srv, 'sparse', 0, 4 * M)
      await bursts(srv.img('vm', 'sparse'))
      const pid = srv.proc.pid as number
      // at rest every worker waits somewhere: in read(2) on /dev/fuse or parked
      const atRest = async (): Promise<Awaited<ReturnType<typeof fuseWorkers>>> => {
        let w = await fuseWorkers(pid)
        for (let i = 0; i < 100 && w.reading + w.parked < w.threads; i++) { await sleep(50); w = await fuseWorkers(pid) }
        return w
      }
      const w = await atRest()
      const seen = JSON.stringify({ threads: w.threads, reading: w.reading, parked: w.parked })
      t.log(label, seen)
      t.true(w.threads > 5, `${label}: the bursts grew the pool to only ${w.threads} workers, too few to tell`)
      if (cap === 4) {
        t.is(w.reading, 4, `${label}: four idle workers wait on /dev/fuse at rest: ${seen}`)
        t.is(w.parked, w.threads - 4, `${label}: the others are parked: ${seen}`)
      } else {
        t.is(w.reading, w.threads, `${label}: every idle worker waits on /dev/fuse: ${seen}`)
      }
      // the next bursts wake parked workers rather than start new ones (the same 32 requests
      // at a time: a few more at most), and what they read is right
      await bursts(srv.img('vm', 'sparse'))
      const w2 = await atRest()
      t.true(w2.threads <= w.threads + 8, `${label}: the second bursts started ${w2.threads - w.threads} more workers (parked ones not reused?)`)
      pool = w2.threads
      const c = await sameContent(srv.img('vm', 'sparse'), s.shadows.sparse)
      t.true(c.same, `${label}: the live file does not read what was written: ${c.detail}`)
    } finally {
      await srv.stopClean(t)
    }
    // every worker, parked ones included, was joined when the session ended
    const m = /worker loop ended: (\d+) workers joined, (\d+) of them were parked/.exec(srv.stderr)
    t.truthy(m, `${label}: the worker loop did not report its end (a worker never left?): ${srv.stderr}`)
    if (m !== null) {
      t.is(Number(m[1]), pool, `${label}: ${m[0]}, but the pool had ${pool} workers`)
      if (cap === 4) t.true(Number(m[2]) > 0, `${label}: no worker was parked at the end: ${m[0]}`)
    }
  }
})
