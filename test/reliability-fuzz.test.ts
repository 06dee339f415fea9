/**
 * Hostile files: random byte flips and truncations of headers, grain directories, grain tables
 * and descriptors never crash, hang or throw anything but a RedoError; through the mount the
 * damaged disk is left out (or served with EIO on its damaged grains) while every other disk
 * keeps serving.
 */
import test from 'ava'
import { copyFile, mkdir, open, readdir, readFile, stat, truncate, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { Chain } from '../src/chain/chain'
import { RedoError } from '../src/errors'
import { e2e, requireFuse, sh } from './helpers/mount'
import { prng } from './helpers/model'
import { mustRun } from './helpers/qemu'

const ok = requireFuse(test)
const env = e2e(test)

const SIZE = 4 << 20

async function pristine (dir: string): Promise<string> {
  const vm = path.join(dir, 'vm')
  await mkdir(vm, { recursive: true })
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', 'disk.vmdk', String(SIZE)], { cwd: vm })
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x12 3M 512k', 'disk.vmdk'], { cwd: vm })
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'disk.vmdk', '-F', 'vmdk', 'disk-000001.vmdk'], { cwd: vm })
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x21 64k 200k', '-c', 'write -P 0x22 2M 1M', 'disk-000001.vmdk'], { cwd: vm })
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', 'flat.vmdk', String(SIZE)], { cwd: vm })
  await mustRun('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', 'flat.vmdk', '-F', 'vmdk', 'flat-000001.vmdk'], { cwd: vm })
  await mustRun('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x31 100k 1M', 'flat-000001.vmdk'], { cwd: vm })
  return vm
}

/** Regions worth hitting: header, embedded descriptor, directories and tables, or the whole text. */
function regionOf (file: string, size: number, rnd: () => number): [number, number] {
  if (!file.endsWith('disk.vmdk') && !file.includes('-0000') && file.endsWith('.vmdk') && size < 4096) return [0, size] // a text descriptor
  const regions: Array<[number, number]> = [[0, 512], [512, 10752], [10752, 32768], [32768, 65536]]
  return regions[Math.floor(rnd() * regions.length)]
}

async function mutate (file: string, rnd: () => number): Promise<string> {
  const { size } = await stat(file)
  if (rnd() < 0.25) {
    const to = Math.floor(rnd() * size)
    await truncate(file, to)
    return `truncate ${path.basename(file)} to ${to}`
  }
  const [a, b] = regionOf(file, size, rnd)
  const fh = await open(file, 'r+')
  const flips: string[] = []
  try {
    const n = 1 + Math.floor(rnd() * 8)
    for (let i = 0; i < n; i++) {
      const at = Math.min(size - 1, a + Math.floor(rnd() * (Math.min(b, size) - a)))
      const v = Buffer.from([Math.floor(rnd() * 256)])
      await fh.write(v, 0, 1, at)
      flips.push(`${at}=${v[0]}`)
    }
  } finally {
    await fh.close()
  }
  return `flip ${path.basename(file)} ${flips.join(',')}`
}

/** Open the chain and read every generation; anything but a RedoError is a failure. */
async function exercise (top: string, root: string, lenient: boolean): Promise<string> {
  let chain: Chain
  try {
    chain = await Chain.open(top, { root, lenient })
  } catch (e) {
    if (e instanceof RedoError) return `refused: ${e.message}`
    throw e
  }
  let eio = 0
  try {
    const buf = Buffer.alloc(1 << 20)
    for (let g = 0; g < chain.generations; g++) {
      for (let p = 0; p < chain.size; p += buf.length) {
        try {
          await chain.read(g, buf, 0, p, buf.length)
        } catch (e) {
          if (!(e instanceof RedoError)) throw e
          eio++
        }
      }
    }
  } finally {
    await chain.close()
  }
  return eio > 0 ? `served, ${eio} damaged reads` : 'served'
}

if (ok) {
  test.serial('fuzzed headers, directories, tables and descriptors: only clear refusals, no crash, no hang', async t => {
    t.timeout(300_000)
    const dir = await env.tmp()
    const src = await pristine(path.join(dir, 'pristine'))
    const names = await readdir(src)
    const rnd = prng(20261122)
    const outcomes = new Map<string, number>()
    const seeds = 300
    for (let s = 0; s < seeds; s++) {
      const root = path.join(dir, `s${s}`)
      const vm = path.join(root, 'vm')
      await mkdir(vm, { recursive: true })
      for (const n of names) await copyFile(path.join(src, n), path.join(vm, n))
      const victim = names[Math.floor(rnd() * names.length)]
      const what = await mutate(path.join(vm, victim), rnd)
      for (const [top, lenient] of [['disk-000001.vmdk', false], ['flat-000001.vmdk', false], ['disk-000001.vmdk', true], ['flat-000001.vmdk', true]] as const) {
        let result: string
        try {
          result = await Promise.race([
            exercise(path.join(vm, top), root, lenient),
            new Promise<string>((_resolve, reject) => setTimeout(() => reject(new Error('hang: no answer in 20 s')), 20_000).unref())
          ])
        } catch (e) {
          t.fail(`seed ${s} (${what}), ${top}: ${(e as Error).stack ?? String(e)}`)
          continue
        }
        const kind = result.split(':')[0].split(',')[0]
        outcomes.set(kind, (outcomes.get(kind) ?? 0) + 1)
        if (kind === 'refused') t.regex(result, /\//, `seed ${s}: refusal does not name a file: ${result}`)
      }
    }
    t.log(Object.fromEntries(outcomes))
    t.true((outcomes.get('refused') ?? 0) > 20, 'the mutations never produced a refusal: the fuzzer is not reaching the structures')
    t.true((outcomes.get('served') ?? 0) > 20 && [...outcomes.keys()].some(k => k.startsWith('served')), 'no damaged chain was ever served')
  })

  test.serial('through the mount: the damaged disk is left out or fails only its damaged grains, other disks keep serving', async t => {
    const dir = await env.tmp()
    const src = await pristine(path.join(dir, 'pristine'))
    const store = path.join(dir, 'store')
    for (const vm of ['good', 'torn', 'grain']) {
      await mkdir(path.join(store, vm), { recursive: true })
      for (const n of ['disk.vmdk', 'disk-000001.vmdk']) await copyFile(path.join(src, n), path.join(store, vm, n))
    }
    // torn: the redo log's header is truncated
    await truncate(path.join(store, 'torn', 'disk-000001.vmdk'), 300)
    // grain: one grain table entry of the redo log points past the end of the file
    const child = path.join(store, 'grain', 'disk-000001.vmdk')
    const hdr = await readFile(child)
    const gdOffset = Number(hdr.readBigUInt64LE(56))
    const gt0 = hdr.readUInt32LE(gdOffset * 512)
    const fh = await open(child, 'r+')
    const grain = 32 // byte 2 MiB, written by the child
    const entry = Buffer.alloc(4)
    entry.writeUInt32LE(0x00fffff0, 0)
    await fh.write(entry, 0, 4, gt0 * 512 + grain * 4)
    await fh.close()
    const server = await env.mount(store, path.join(dir, 'mnt'))
    const status = JSON.parse(await readFile(path.join(server.mnt, '.ctl', 'status'), 'utf8')) as { vms: Array<{ name: string, disks: Array<{ disk: string, problems: string[] }>, errors: Array<{ file: string, message: string }> }> }
    const torn = status.vms.find(v => v.name === 'torn')
    t.is(torn?.disks.length, 0, 'a disk with a torn header was served')
    t.true(torn?.errors.some(e => e.message.includes('disk-000001.vmdk') && /header/.test(e.message)), JSON.stringify(torn?.errors))
    const gr = status.vms.find(v => v.name === 'grain')
    t.true(gr?.disks[0]?.problems.some(p => /past the end/.test(p)), JSON.stringify(gr))
    // the good disk reads exactly what qemu reads
    await mustRun('qemu-img', ['convert', '-O', 'raw', path.join(store, 'good', 'disk-000001.vmdk'), path.join(dir, 'good.raw')])
    const cmpGood = await sh('cmp "$1" "$2"', [server.img('good', 'disk'), path.join(dir, 'good.raw')])
    t.is(cmpGood.code, 0, cmpGood.stdout + cmpGood.stderr)
    // the damaged grain fails with EIO, its neighbours read fine
    const bad = await sh('dd if="$1" bs=65536 skip=32 count=1 status=none | wc -c', [server.img('grain', 'disk')])
    t.regex(bad.stderr, /Input\/output error/)
    for (const g of [31, 33]) {
      const r = await sh('dd if="$1" bs=65536 skip="$2" count=1 status=none | cmp - <(dd if="$3" bs=65536 skip="$2" count=1 status=none)', [server.img('grain', 'disk'), String(g), path.join(dir, 'good.raw')])
      t.is(r.code, 0, `grain ${g} next to the damaged one: ${r.stderr}`)
    }
    await server.stopClean(t)
    await writeFile(path.join(dir, 'done'), '')
  })
}
