import type { Argv } from 'yargs'
import { delayPoint } from '../../fault'
import { action, openForReading, progressBar, readableGeneration, splitGeneration, type GlobalArgs } from '../common'
import { RawOutput } from '../rawout'

export const command = 'export <source> <raw>'
export const describe = 'write a sparse raw copy of a generation (file.vmdk@G; the live one without @G)'
export const builder = (y: Argv): Argv => y
  .positional('source', { type: 'string', describe: 'chain top .vmdk (or <store>/<vm>/<disk>), optionally @G' })
  .positional('raw', { type: 'string', describe: 'output raw file' })

const CHUNK = 1 << 20

export const handler = action(async (a: GlobalArgs & { source: string, raw: string }) => {
  const { file, gen } = splitGeneration(a.source)
  const { chain, unchanged } = await openForReading(file, a)
  try {
    const g = readableGeneration(chain, gen, a.source)
    const view = chain.view(g)
    const out = await RawOutput.open(a.raw, chain.layers.flatMap(l => l.files))
    const bar = progressBar('export')
    try {
      // a new file stays sparse: only the data, in 64 KiB pieces that hold something; a target
      // written in place gets every byte
      const entries = view.map().filter(e => e.data || out.dense)
      const total = entries.reduce((s, e) => s + e.length, 0)
      let done = 0
      const buf = Buffer.alloc(CHUNK)
      await delayPoint('reader')
      for (const e of entries) {
        for (let p = e.start; p < e.start + e.length; p += CHUNK) {
          const n = Math.min(CHUNK, e.start + e.length - p)
          await view.read(buf, 0, p, n)
          for (let q = 0; q < n; q += 65536) {
            const m = Math.min(65536, n - q)
            if (out.dense || !isZero(buf, q, m)) await out.write(buf, q, m, p + q)
          }
          done += n
          bar.update(done, total)
        }
      }
      // nothing locks the chain against a commit meanwhile: a changed generation is not exported
      await unchanged(g, a.source)
      await out.finish(view.size)
    } catch (e) {
      await out.abort()
      throw e
    } finally {
      bar.end()
    }
  } finally {
    await chain.close()
  }
})

const ZERO = Buffer.alloc(65536)

function isZero (b: Buffer, off: number, len: number): boolean {
  return b.subarray(off, off + len).equals(ZERO.subarray(0, len))
}
