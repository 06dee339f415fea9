/**
 * Writing newly allocated grains around the page cache (O_DIRECT), when asked to
 * (REDOFS_DIRECT=1 in the server's environment).
 *
 * Data written into the live file is already cached once, by the kernel, in the mounted file's
 * own pages. Appending the same bytes to the redo log through the page cache caches them a
 * second time. Written directly, the redo log keeps no second copy: half the page-cache memory
 * for fresh writes, and none of the first touches of fresh pages that make allocating writes
 * slow on a VM whose free memory goes back to its host. But each allocating request then waits
 * for the device, the overwrites that follow must allocate the pages the first write skipped,
 * and a generation frozen right after reads its new grains from the disk. Measured side by side
 * (native-notes/performance.md), allocating writes came out about even and overwrites 3× slower,
 * so the page cache is the default and direct writes are a choice for hosts short of memory.
 * Everything else (reads, overwrites inside grains, metadata) always uses the ordinary
 * descriptor; the kernel keeps the two coherent (a direct write writes back and drops cached
 * pages of its range first).
 *
 * The buffer must start on a page boundary, not merely on a sector: ext4 accepts a buffer
 * aligned to 512 bytes, but on the test VM a direct write that extends the file then took 3.7 ms
 * per 128 KiB instead of 0.2 ms. Node cannot align a Buffer; a WebAssembly memory can serve,
 * since V8 maps it whole, so it starts on a page. A direct read of the header into it checks
 * that the file system takes it. Where direct I/O is refused (tmpfs before 6.6, some network and
 * FUSE filesystems, larger alignments), `open` returns null and the caller writes through the
 * page cache.
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
    if (process.env.REDOFS_DIRECT !== '1') return null
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
