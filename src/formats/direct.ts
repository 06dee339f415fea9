/**
 * Writing newly allocated grains around the page cache (O_DIRECT).
 *
 * Data written into the live file is already cached once, by the kernel, in the mounted file's
 * own pages. Appending the same bytes to the redo log through the page cache caches them a
 * second time, in pages that must first be found and zeroed; on a virtual machine those fresh
 * pages are the dearest part of an allocating write (native-notes/performance.md). New grains
 * are therefore written with O_DIRECT from one reusable, aligned buffer. Everything else (reads,
 * overwrites inside grains, metadata) keeps using the ordinary descriptor; the kernel keeps the
 * two coherent (a direct write writes back and drops cached pages of its range first).
 *
 * The buffer must start on a page boundary, not merely on a sector: ext4 accepts a buffer
 * aligned to 512 bytes, but on the test VM a direct write that extends the file then took 3.7 ms
 * per 128 KiB instead of 0.2 ms (native-notes/performance.md). Node cannot align a Buffer; a
 * WebAssembly memory can serve, since V8 maps it whole, so it starts on a page. A direct read of
 * the header into it checks that the file system takes it. Where direct I/O is refused (tmpfs
 * before 6.6, some network and FUSE filesystems, larger alignments), `open` returns null and the
 * caller writes through the page cache as before; REDOFS_NO_DIRECT=1 in the environment does the
 * same on purpose (for a file system that accepts O_DIRECT but serves it badly, and to measure
 * the difference).
 */
import { constants } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { log } from '../log'
import { writeExact } from './extent'

/** Bytes the alignment check reads: covers 512-byte and 4 KiB logical blocks. */
const ALIGN = 4096
/** Bytes one direct write carries; longer batches are split. */
const DIRECT_CHUNK = 1 << 20
/** WebAssembly memory comes in pages of 64 KiB. */
const WASM_PAGE = 65536

/** `bytes` of page-aligned memory (see the module comment). */
function pageAligned (bytes: number): Buffer {
  const pages = Math.ceil(bytes / WASM_PAGE)
  return Buffer.from(new WebAssembly.Memory({ initial: pages, maximum: pages }).buffer, 0, bytes)
}

export class DirectWriter {
  private constructor (
    private readonly fh: FileHandle,
    private readonly slab: Buffer
  ) {}

  static async open (path: string): Promise<DirectWriter | null> {
    if (process.env.REDOFS_NO_DIRECT === '1') return null
    let fh: FileHandle
    try {
      fh = await open(path, constants.O_RDWR | constants.O_DIRECT)
    } catch (e) {
      log.formats('%s: no direct I/O (%s); new grains go through the page cache', path, (e as Error).message)
      return null
    }
    try {
      const slab = pageAligned(DIRECT_CHUNK)
      // the header's first 4 KiB exist in every sparse extent
      await fh.read(slab, 0, ALIGN, 0)
      return new DirectWriter(fh, slab)
    } catch (e) {
      log.formats('%s: direct I/O unusable (%s); new grains go through the page cache', path, (e as Error).message)
      await fh.close()
      return null
    }
  }

  /**
   * Write bufs back to back at pos. Returns false, having written nothing, when this write
   * cannot go direct (unaligned position or length): the caller writes it the ordinary way.
   */
  async write (bufs: Buffer[], pos: number): Promise<boolean> {
    const total = bufs.reduce((n, b) => n + b.length, 0)
    if (pos % ALIGN !== 0 || total % 512 !== 0) return false
    let at = pos
    let fill = 0
    const send = async (): Promise<void> => {
      await writeExact(this.fh, this.slab, 0, fill, at) // fill is a multiple of 512 (checked above)
      at += fill
      fill = 0
    }
    for (const b of bufs) {
      let o = 0
      while (o < b.length) {
        const n = Math.min(b.length - o, this.slab.length - fill)
        b.copy(this.slab, fill, o, o + n)
        fill += n
        o += n
        if (fill === this.slab.length) await send()
      }
    }
    if (fill > 0) await send()
    return true
  }

  async close (): Promise<void> {
    await this.fh.close()
  }
}
