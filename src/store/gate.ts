/**
 * Holding I/O off a disk while its chain changes: live I/O can be paused for a whole job
 * (freeze), all I/O for the moment the layers switch. Paused I/O waits; it never fails, until
 * the gate is closed at unmount.
 */
import { RedoError } from '../errors'
import { plannedIoDone } from '../formats/extent'

export class IoGate {
  private liveHold: Promise<void> | null = null
  private allHold: Promise<void> | null = null
  private live = 0
  private all = 0
  private drained: Array<() => void> = []
  private closedBy: string | null = null

  async enter (isLive: boolean): Promise<void> {
    for (;;) {
      if (this.closedBy !== null) throw new RedoError('EIO', this.closedBy)
      if (this.allHold !== null) { await this.allHold; continue }
      if (isLive && this.liveHold !== null) { await this.liveHold; continue }
      break
    }
    this.all++
    if (isLive) this.live++
  }

  /** Whether I/O of this kind would go ahead now without waiting (nothing holds it off). */
  isOpen (isLive: boolean): boolean {
    return this.closedBy === null && this.allHold === null && !(isLive && this.liveHold !== null)
  }

  leave (isLive: boolean): void {
    this.all--
    if (isLive) this.live--
    const ws = this.drained
    this.drained = []
    for (const w of ws) w()
  }

  async run<T> (isLive: boolean, fn: () => Promise<T>): Promise<T> {
    await this.enter(isLive)
    try {
      return await fn()
    } finally {
      this.leave(isLive)
    }
  }

  private async waitFor (cond: () => boolean): Promise<void> {
    while (!cond()) await new Promise<void>(resolve => this.drained.push(resolve))
  }

  /**
   * Refuse all I/O from now on (EIO with `why`) and wait for what is in flight: at unmount,
   * descriptors opened before a lazy unmount still reach the server while disks power off.
   */
  async close (why: string): Promise<void> {
    this.closedBy = why
    await this.waitFor(() => this.all === 0)
    await plannedIoDone()
  }

  /** Run fn with live I/O held off (frozen generations keep being served). */
  async freezeLive<T> (fn: () => Promise<T>): Promise<T> {
    return await this.hold('liveHold', () => this.live === 0, fn)
  }

  /** Run fn with every read and write of the disk held off. */
  async freezeAll<T> (fn: () => Promise<T>): Promise<T> {
    return await this.hold('allHold', () => this.all === 0, fn)
  }

  /** Take a hold (one at a time per kind), wait until the I/O it stops has drained, run fn. */
  private async hold<T> (kind: 'liveHold' | 'allHold', drained: () => boolean, fn: () => Promise<T>): Promise<T> {
    while (this[kind] !== null) await this[kind]
    let release!: () => void
    this[kind] = new Promise<void>(resolve => { release = resolve })
    try {
      await this.waitFor(drained)
      // reads and writes the FUSE workers do from plans are in flight too, though not counted here
      await plannedIoDone()
      return await fn()
    } finally {
      this[kind] = null
      release()
    }
  }
}
