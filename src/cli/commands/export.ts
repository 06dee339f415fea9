import type { Argv } from 'yargs'
import { open } from 'node:fs/promises'
import { resolveGeneration } from '../../chain/labels'
import { writeExact } from '../../formats/extent'
import { action, openDisk, progressBar, splitGeneration, type GlobalArgs } from '../common'

export const command = 'export <source> <raw>'
export const describe = 'write a sparse raw copy of a generation (file.vmdk@G; the live one without @G)'
export const builder = (y: Argv): Argv => y
  .positional('source', { type: 'string', describe: 'chain top .vmdk (or <store>/<vm>/<disk>), optionally @G' })
  .positional('raw', { type: 'string', describe: 'output raw file' })

const CHUNK = 1 << 20

export const handler = action(async (a: GlobalArgs & { source: string, raw: string }) => {
  const { file, gen } = splitGeneration(a.source)
  const chain = await openDisk(file, a)
  try {
    const g = gen === undefined ? chain.redoCount : resolveGeneration(chain, gen, a.source)
    const view = chain.view(g)
    const out = await open(a.raw, 'w')
    const bar = progressBar('export')
    try {
      const entries = view.map().filter(e => e.data)
      const total = entries.reduce((s, e) => s + e.length, 0)
      let done = 0
      const buf = Buffer.alloc(CHUNK)
      for (const e of entries) {
        for (let p = e.start; p < e.start + e.length; p += CHUNK) {
          const n = Math.min(CHUNK, e.start + e.length - p)
          await view.read(buf, 0, p, n)
          // keep the copy sparse: write 64 KiB pieces that hold something
          for (let q = 0; q < n; q += 65536) {
            const m = Math.min(65536, n - q)
            if (!isZero(buf, q, m)) await writeExact(out, buf, q, m, p + q)
          }
          done += n
          bar.update(done, total)
        }
      }
      await out.truncate(view.size)
      await out.sync()
    } finally {
      bar.end()
      await out.close()
    }
  } finally {
    await chain.close()
  }
})

const ZERO = Buffer.alloc(65536)

function isZero (b: Buffer, off: number, len: number): boolean {
  return b.subarray(off, off + len).equals(ZERO.subarray(0, len))
}
