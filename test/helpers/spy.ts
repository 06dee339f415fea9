/**
 * Process-wide spies on the extents' disk calls, for the unit tests that pin the order of a
 * flush. They replace shared functions: tests that use them run serially.
 */
import * as extent from '../../src/formats/extent'

/** Count DataSync.sync calls (every extent's fdatasync) until restore(). */
export function countSyncs (): { n: number, restore: () => void } {
  const orig = extent.DataSync.prototype.sync
  const c = { n: 0, restore: () => { extent.DataSync.prototype.sync = orig } }
  extent.DataSync.prototype.sync = async function (this: extent.DataSync) { c.n++; return await orig.call(this) }
  return c
}

/** Record syncs ('sync') and positioned writes (their byte position) in order until restore(). */
export function traceIo (): { events: Array<'sync' | number>, restore: () => void } {
  const sync = extent.DataSync.prototype.sync
  const write = extent.writeExact
  const events: Array<'sync' | number> = []
  extent.DataSync.prototype.sync = async function (this: extent.DataSync) { events.push('sync'); return await sync.call(this) }
  const ex = extent as { writeExact: typeof write }
  ex.writeExact = async (fh, buf, off, len, pos) => { events.push(pos); return await write(fh, buf, off, len, pos) }
  return { events, restore: () => { extent.DataSync.prototype.sync = sync; ex.writeExact = write } }
}
