/**
 * The store lock (src/store/lock.ts): staged and linked into place, created in place where hard
 * links are refused, and the staged files of dead processes swept (this host's only).
 */
import test from 'ava'
import fsp from 'node:fs/promises'
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import { hostname, tmpdir } from 'node:os'
import path from 'node:path'
import { spawn, spawnSync } from 'node:child_process'
import { StoreLock, readLock } from '../src/store/lock'

async function inTmp (fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'redofs-test-'))
  try { await fn(dir) } finally { await rm(dir, { recursive: true, force: true }) }
}

test.serial('where hard links are refused the lock is created in place, and still refuses a second taker', async t => {
  await inTmp(async dir => {
    const link = fsp.link
    let calls = 0
    ;(fsp as { link: typeof link }).link = async () => { calls++; throw Object.assign(new Error('link refused'), { code: 'EPERM' }) }
    try {
      const lock = await StoreLock.acquire(dir, 'test')
      t.true(calls > 0, 'link was not tried')
      t.is((await readLock(dir))?.pid, process.pid)
      const second = await StoreLock.acquire(dir, 'second').then(() => undefined, (e: { code?: string }) => e)
      t.is(second?.code, 'EBUSY')
      await lock.release()
      t.deepEqual((await readdir(dir)).filter(n => n.startsWith('.redofs.lock')), [], 'files left behind')
    } finally {
      (fsp as { link: typeof link }).link = link
    }
  })
})

test.serial('staged lock files of dead processes of this host are swept, another host\'s are kept', async t => {
  await inTmp(async dir => {
    const dead = Number(spawnSync('sh', ['-c', 'echo $$'], { encoding: 'utf8' }).stdout.trim())
    const mine = `.redofs.lock.${hostname()}.${dead}.1.tmp`
    const theirs = `.redofs.lock.other-host.example.${dead}.1.tmp`
    await writeFile(path.join(dir, mine), '{}')
    await writeFile(path.join(dir, theirs), '{}')
    const lock = await StoreLock.acquire(dir, 'test')
    t.deepEqual((await readdir(dir)).filter(n => n.endsWith('.tmp')), [theirs])
    await lock.release()
  })
})

test.serial('many processes racing for a store with a stale lock: exactly one gets it', async t => {
  await inTmp(async dir => {
    const dead = Number(spawnSync('sh', ['-c', 'echo $$'], { encoding: 'utf8' }).stdout.trim())
    await writeFile(path.join(dir, '.redofs.lock'), JSON.stringify({ pid: dead, host: hostname(), since: new Date(0).toISOString(), what: 'redofs mount' }))
    const lockJs = path.join(__dirname, '..', 'src', 'store', 'lock.js')
    const script = `const { StoreLock } = require(${JSON.stringify(lockJs)})
StoreLock.acquire(process.argv[1], 'racer').then(async l => { console.log('got'); await new Promise(r => setTimeout(r, 2500)); await l.release() }, e => console.log(e.code))`
    const racers = Array.from({ length: 8 }, () => new Promise<string>(resolve => {
      // each taker that finds the lock stale waits 300 ms before replacing it: without the
      // host claim every racer would read the stale lock in that time and replace it
      const c = spawn(process.execPath, ['-e', script, dir], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, REDOFS_DELAY: 'lock.takeover:300' } })
      let out = ''
      c.stdout.on('data', (d: Buffer) => { out += d.toString() })
      c.on('close', () => resolve(out.trim()))
    }))
    const results = await Promise.all(racers)
    t.is(results.filter(r => r === 'got').length, 1, results.join(', '))
    t.is(results.filter(r => r === 'EBUSY').length, 7, results.join(', '))
  })
})

test.serial('a lock file of this host whose pid now belongs to another process is taken over', async t => {
  await inTmp(async dir => {
    // the pid is alive (this test's own), but nothing holds the store: its writer is gone
    await writeFile(path.join(dir, '.redofs.lock'), JSON.stringify({ pid: process.ppid, host: hostname(), since: new Date(0).toISOString(), what: 'redofs mount' }))
    const lock = await StoreLock.acquire(dir, 'test')
    t.is((await readLock(dir))?.pid, process.pid)
    await lock.release()
  })
})

test.serial('a live holder of this host is never replaced, even one that holds no claim (an older redofs, another network namespace)', async t => {
  await inTmp(async dir => {
    const file = path.join(dir, '.redofs.lock')
    await writeFile(file, JSON.stringify({ pid: process.ppid, host: hostname(), since: new Date().toISOString(), what: 'redofs mount' }))
    const before = await fsp.readFile(file, 'utf8')
    const e = await StoreLock.acquire(dir, 'test').then(() => undefined, (err: { code?: string, message?: string }) => err)
    t.is(e?.code, 'EBUSY')
    t.regex(String(e?.message), new RegExp(`in use by redofs mount \\(pid ${process.ppid} `))
    t.is(await fsp.readFile(file, 'utf8'), before, 'the holder\'s lock file was replaced')
  })
})

test.serial('a lock of another host is never taken over; the refusal says which file to delete if that host is gone', async t => {
  await inTmp(async dir => {
    const file = path.join(dir, '.redofs.lock')
    await writeFile(file, JSON.stringify({ pid: 1, host: 'gone-host.example', since: new Date(0).toISOString(), what: 'redofs mount' }))
    const e = await StoreLock.acquire(dir, 'test').then(() => undefined, (err: { code?: string, message?: string }) => err)
    t.is(e?.code, 'EBUSY')
    t.true(String(e?.message).includes(`on gone-host.example since 1970-01-01T00:00:00.000Z); if that host is gone for good, delete ${file}`), String(e?.message))
  })
})

test.serial('the command line: a lock that cannot be made names the store and --store; relink of a missing file takes no lock', async t => {
  await inTmp(async dir => {
    const bin = path.resolve(__dirname, '..', '..', 'bin', 'redofs')
    // the store root of <dir>/vm/d.vmdk is <dir>: a file there blocks nothing, but a store
    // root that is a file cannot hold a lock
    const made = spawnSync(process.execPath, [bin, 'create', path.join(dir, 'vm', 'd'), '--size', '1M'], { encoding: 'utf8' })
    t.is(made.status, 0, made.stderr)
    await writeFile(path.join(dir, 'not-a-dir'), '')
    const r = spawnSync(process.execPath, [bin, 'addredo', '--store', path.join(dir, 'not-a-dir'), path.join(dir, 'vm', 'd')], { encoding: 'utf8' })
    t.is(r.status, 1, r.stderr)
    t.regex(r.stderr, /cannot lock the store .*not-a-dir \(--store\): .*; name the store with --store DIR/)
    // relink checks its argument before it locks: here the store root it would lock is a file
    const missing = spawnSync(process.execPath, [bin, 'relink', path.join(dir, 'not-a-dir', 'vm', 'x.vmdk')], { encoding: 'utf8' })
    t.is(missing.status, 1)
    t.regex(missing.stderr, /x\.vmdk: no such file/, 'relink tried to lock a store before checking its argument')
  })
})
