/**
 * Worker-side reads and overwrites (addon patch levels 4 and 5, scripts/native/). The server's read handler does not
 * read: it writes into the request buffer where the bytes are (descriptor and offset, or zeros)
 * and answers READ_PLAN; the libfuse worker thread that carries the request then reads them
 * itself. A read then costs the JS thread one hand-off instead of three (no trip to a thread
 * pool thread and back), which is what bounds cold reads on a small machine
 * (native-notes/performance.md, session 7).
 *
 * Layout, as the addon reads it: a header (u32 count, u32 epoch, u64 0), then count entries of
 * (i64 offset, i32 fd or -1 for zeros, u32 length) that fill the reply back to back.
 *
 * Overwrites of data that is already allocated in the live layer go the same way (level 5): the
 * write handler puts the plan (descriptor and offset per run, no zeros) into a slot of a table
 * shared with the addon and answers WRITE_PLAN + slot; the worker copies the plan out, frees the
 * slot (state word back to 0) and pwrites the request's bytes. Allocating writes stay with JS
 * (a new grain's table entry may only be set once its data is written).
 *
 * Descriptors: the worker uses the numbers after the handler returned, so a layer must not close
 * one while a plan naming it is still being read (the number could name the next file opened).
 * Plans are counted per epoch, issued here and completed by the addon; drain() starts a new
 * epoch and waits until every plan of the old one is complete. Layers call it before they
 * close, and I/O holds before they let a chain change (setPlannedIo).
 */
import type { ReadPlan } from '../formats/extent'
import { log } from '../log'

/** What a handler answers when it wrote a plan instead of data. */
export const READ_PLAN = 0x40000000
/** What a write handler answers, plus the slot, when it put a plan into the slot table. */
export const WRITE_PLAN = 0x20000000
/** File handle bit the addon sets when a plan failed: read or write it the ordinary way this time. */
export const FH_CLASSIC = 0x80000000

/** The addon's write-plan table: 256 slots of a 16-byte header and 16 entries. */
const SLOTS = 256
const SLOT_BYTES = 16 + 16 * 16

const HEADER = 16
const ENTRY = 16

/** Encodes a plan into a request buffer or a write slot; reused for every request. */
class PlanWriter implements ReadPlan {
  private buf: Buffer = Buffer.alloc(0)
  private at = HEADER
  private count = 0
  private bytes = 0
  private max = 0
  private lastFd = -2
  private lastEnd = 0
  private zeros = true

  /** Start a plan in buf (the request buffer, or a slot of the write-plan table) with room for len bytes. */
  reset (buf: Buffer, len: number, zeros = true): void {
    this.buf = buf
    this.at = HEADER
    this.count = 0
    this.bytes = 0
    this.zeros = zeros
    this.max = Math.floor((len - HEADER) / ENTRY)
    this.lastFd = -2
    this.lastEnd = 0
  }

  data (fd: number, pos: number, len: number): boolean {
    if (fd < 0) return false
    return this.add(fd, pos, len)
  }

  /** Zeros in a read's reply; a write plan has no use for them. */
  zero (len: number): boolean { return this.zeros && this.add(-1, 0, len) }

  private add (fd: number, pos: number, len: number): boolean {
    if (len <= 0) return true
    this.bytes += len
    const b = this.buf
    if (this.count > 0 && fd === this.lastFd && (fd < 0 || pos === this.lastEnd)) {
      const at = this.at - ENTRY
      b.writeUInt32LE(b.readUInt32LE(at + 12) + len, at + 12)
      this.lastEnd += len
      return true
    }
    if (this.count >= this.max) return false
    const at = this.at
    b.writeUInt32LE(pos % 0x100000000, at)
    b.writeUInt32LE(Math.floor(pos / 0x100000000), at + 4)
    b.writeInt32LE(fd, at + 8)
    b.writeUInt32LE(len, at + 12)
    this.at += ENTRY
    this.count++
    this.lastFd = fd
    this.lastEnd = pos + len
    return true
  }

  /**
   * Write the header; false when the entries do not add up to the `n` bytes promised. A read's
   * header starts (u32 count, u32 epoch, u64 0); a write slot's (u32 state = 1, u32 count,
   * u32 epoch, u32 0), the state word written last.
   */
  finish (epoch: number, n: number, slot = false): boolean {
    if (this.count === 0 || this.bytes !== n) return false
    const b = this.buf
    const h = slot ? 4 : 0
    b.writeUInt32LE(this.count, h)
    b.writeUInt32LE(epoch, h + 4)
    b.fill(0, h + 8, HEADER)
    if (slot) b.writeUInt32LE(1, 0) // last: the worker may take the slot from now on
    return true
  }
}

export class WorkerIo {
  private epoch = 0
  private readonly issued: number[]
  private draining: Promise<void> | null = null
  private readonly writer = new PlanWriter()
  /** the addon's write-plan slots (level 5), or null: overwrites are then done by JS */
  private readonly slots: Buffer | null
  private nextSlot = 0

  /**
   * `completed(epoch)`: plans of that epoch the addon has finished (a wrapping u32, counted for
   * the whole process: a mount before this one may have left it above 0). `slotTable`: the
   * addon's write-plan table, when it has one.
   */
  constructor (private readonly completed: (epoch: number) => number, slotTable?: ArrayBuffer) {
    this.issued = [completed(0), completed(1)]
    this.slots = slotTable !== undefined && slotTable.byteLength === SLOTS * SLOT_BYTES ? Buffer.from(slotTable) : null
  }

  /**
   * Let `fill` plan a read of len bytes into buf (it returns the bytes planned, or -1 to read
   * the ordinary way). True when the plan is in buf and the handler must answer READ_PLAN now.
   */
  plan (buf: Buffer, len: number, fill: (p: ReadPlan) => number): boolean {
    if (len < HEADER + ENTRY) return false
    this.writer.reset(buf, len)
    const n = fill(this.writer)
    if (n <= 0 || !this.writer.finish(this.epoch, n)) return false
    this.issued[this.epoch] = (this.issued[this.epoch] + 1) >>> 0
    return true
  }

  /**
   * Let `fill` plan a write of len bytes (it returns the bytes planned, or -1 to write the
   * ordinary way). The slot's number when the plan is in place and the handler must answer
   * WRITE_PLAN + slot now; -1 otherwise (no table, every slot busy, declined).
   */
  planWrite (len: number, fill: (p: ReadPlan) => number): number {
    const t = this.slots
    if (t === null) return -1
    for (let tries = 0; tries < SLOTS; tries++) {
      const slot = this.nextSlot
      this.nextSlot = (slot + 1) % SLOTS
      // 0: the worker that had this slot copied its plan out (it clears the word after that)
      if (t.readUInt32LE(slot * SLOT_BYTES) !== 0) continue
      const at = t.subarray(slot * SLOT_BYTES, (slot + 1) * SLOT_BYTES)
      this.writer.reset(at, SLOT_BYTES, false)
      const n = fill(this.writer)
      if (n !== len || !this.writer.finish(this.epoch, n, true)) return -1
      this.issued[this.epoch] = (this.issued[this.epoch] + 1) >>> 0
      return slot
    }
    return -1
  }

  /**
   * Resolve once every plan issued before the call has been read by the worker it went to.
   * Starts a new epoch at once (plans from now on are not waited for), unless another drain is
   * running: this one then starts its epoch when that one has finished.
   */
  async drain (): Promise<void> {
    const prev = this.draining
    const run = prev === null ? this.closeEpoch() : prev.then(async () => await this.closeEpoch())
    const tail: Promise<void> = run.catch(() => {}).then(() => { if (this.draining === tail) this.draining = null })
    this.draining = tail
    await run
  }

  private async closeEpoch (): Promise<void> {
    const old = this.epoch
    this.epoch ^= 1
    const started = Date.now()
    let warned = false
    let spins = 0
    while (this.completed(old) !== this.issued[old]) {
      if (!warned && Date.now() - started > 10_000) {
        warned = true
        log.fs('still waiting for %d worker-side read(s) or write(s)', (this.issued[old] - this.completed(old)) >>> 0)
      }
      // plans finish within a request's time: look again at once a few times, then every ms
      await new Promise(resolve => spins++ < 10 ? setImmediate(resolve) : setTimeout(resolve, 1))
    }
  }
}
