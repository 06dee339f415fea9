import type { Argv } from 'yargs'
import { execFile } from 'node:child_process'
import { mkdir, mkdtemp, open, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { promisify } from 'node:util'
import { Chain } from '../../chain/chain'
import { addRedo } from '../../chain/jobs'
import { createFlatLayer } from '../../formats/create'
import { readExact } from '../../formats/extent'
import { serve } from '../serve'
import { action } from '../common'

export const command = 'demo'
export const describe = false as const // used by `npm start`
export const builder = (y: Argv): Argv => y.option('dir', { type: 'string', default: '.', describe: 'where demo-store/ and mnt/ go' })

const run = promisify(execFile)
const SIZE = 64 << 20
const UUID = '6f1c3a52-0c4e-4d57-9a59-2b7e8c0d1f00'

async function mkfs (image: string, files: Record<string, string>): Promise<void> {
  const src = await mkdtemp(join(tmpdir(), 'redofs-demo-'))
  try {
    for (const [name, text] of Object.entries(files)) {
      await mkdir(join(src, name, '..'), { recursive: true })
      await writeFile(join(src, name), text)
    }
    await run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-U', UUID, '-E', `hash_seed=${UUID},lazy_itable_init=0,lazy_journal_init=0`, '-L', 'demo', '-d', src, image])
  } finally {
    await rm(src, { recursive: true, force: true })
  }
}

/** Build demo-store/vm1: an ext4 disk0 with two frozen generations and a live one, all by redofs. */
async function build (store: string): Promise<void> {
  const vm = join(store, 'vm1')
  await mkdir(vm, { recursive: true })
  await createFlatLayer(join(vm, 'disk0.vmdk'), SIZE)
  await mkfs(join(vm, 'disk0-flat.vmdk'), {
    'README.txt': 'Generation 0 of the redofs demo disk.\n',
    'etc/motd': 'hello from generation 0\n'
  })
  await writeFile(join(vm, 'vm1.vmx'), [
    '.encoding = "UTF-8"', 'displayName = "vm1"', 'scsi0.present = "TRUE"', 'scsi0:0.present = "TRUE"',
    'scsi0:0.fileName = "disk0.vmdk"', 'scsi0:0.mode = "persistent"', ''
  ].join('\n'))
  const chain = await Chain.open(join(vm, 'disk0.vmdk'), { writable: true, root: store })
  try {
    await addRedo(chain)
    // generation 1: the same file system with changed files, written block by block through redofs
    const next = join(await mkdtemp(join(tmpdir(), 'redofs-demo-')), 'v1.img')
    try {
      const fh = await open(next, 'w')
      await fh.truncate(SIZE)
      await fh.close()
      await mkfs(next, {
        'README.txt': 'Generation 1 of the redofs demo disk: changed after generation 0 froze.\n',
        'etc/motd': 'hello from generation 1\n',
        'new-in-gen1.txt': 'this file does not exist in generation 0\n'
      })
      const src = await open(next, 'r')
      const a = Buffer.alloc(65536)
      const b = Buffer.alloc(65536)
      for (let p = 0; p < SIZE; p += a.length) {
        await readExact(src, next, a, 0, a.length, p)
        await chain.read(chain.redoCount, b, 0, p, b.length)
        if (!a.equals(b)) await chain.write(a, 0, p, a.length)
      }
      await src.close()
    } finally {
      await rm(join(next, '..'), { recursive: true, force: true })
    }
    await addRedo(chain)
  } finally {
    await chain.close()
  }
}

export const handler = action(async (a: { dir: string }) => {
  const store = resolve(a.dir, 'demo-store')
  const mnt = resolve(a.dir, 'mnt')
  if (await stat(join(store, 'vm1', 'disk0.vmdk')).then(() => false, () => true)) {
    process.stdout.write(`building the demo datastore in ${store} ...\n`)
    await build(store)
  }
  await serve(store, mnt, {}, {}, msg => {
    process.stdout.write(`${msg}

Try, in another shell:
  ls -l ${mnt}/vm1                        # disk0.img (live), disk0@0.img, disk0@1.img (frozen)
  cat ${mnt}/.ctl/vm1/disk0/status        # the chain as JSON
  mkdir -p /tmp/g0 && mount -o loop,ro ${mnt}/vm1/disk0@0.img /tmp/g0 && cat /tmp/g0/etc/motd
  echo > ${mnt}/.ctl/vm1/disk0/addredo    # freeze the live generation
  echo level=0 > ${mnt}/.ctl/vm1/disk0/commit
  node bin/redofs info ${store}/vm1/disk0
Press Ctrl-C to unmount.
`)
  })
  return await new Promise<number>(() => {})
})
