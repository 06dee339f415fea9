/**
 * The commit journal: written (durably) before a commit changes anything, deleted after the
 * last step. Its presence at open means a commit was interrupted; the chain finishes it, since
 * every step is idempotent (VMDK.md §9.2).
 *
 * It sits beside the parent and names the other files relative to the parent's directory, so a
 * store moved or copied after the crash finishes its own commit, never one at the old path.
 * Journals that named absolute paths are read relative to where their parent was then.
 */
import { unlink } from 'node:fs/promises'
import { basename, dirname, isAbsolute, relative } from 'node:path'
import { RedoError } from '../errors'
import { readStoreFile, syncDir, writeFileDurable } from '../formats/extent'
import { resolveContained } from '../formats/layer'

export interface CommitJournal {
  op: 'commit'
  /** The layer receiving the data. */
  parent: string
  /** The redo log being merged (deleted at the end). */
  child: string
  /** The layer above the child, re-linked to the parent; null when the child is the top. */
  above: string | null
  /** CID the parent carries from the start of the commit. */
  parentCID: number
  /** 2 in journals that record their phase; absent in older ones. */
  v?: number
  /**
   * How far the commit got, each step recorded once done: the copy was complete ('copied',
   * before the relink), the child was dropped ('dropped': a file under its name now is
   * another's). Absent before the copy was complete.
   */
  phase?: 'copied' | 'dropped'
  /** The parent is a raw disk without descriptor (ESX 2.x); absent in older journals. */
  rawParent?: boolean
  started: string
}

/** A commit journal is its parent's path with this suffix. */
export const JOURNAL_SUFFIX = '.redofs-commit'
export const journalPath = (parent: string): string => `${parent}${JOURNAL_SUFFIX}`

export async function writeJournal (j: CommitJournal): Promise<void> {
  const dir = dirname(j.parent)
  const onDisk = { ...j, parent: basename(j.parent), child: relative(dir, j.child), above: j.above === null ? null : relative(dir, j.above) }
  await writeFileDurable(journalPath(j.parent), JSON.stringify(onDisk, null, 2) + '\n')
}

/**
 * The journal of `parent` (an absolute path), its paths resolved from where it lies: the parent
 * is `parent` itself, the others must stay inside the store `root` (when given).
 */
export async function readJournal (parent: string, root?: string): Promise<CommitJournal | undefined> {
  let text: string
  let j: CommitJournal
  try {
    text = (await readStoreFile(journalPath(parent))).toString('utf8')
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw e
  }
  try {
    j = JSON.parse(text) as CommitJournal
    const named = (x: unknown): boolean => typeof x === 'string'
    if (j.op !== 'commit' || typeof j.parentCID !== 'number' || !named(j.parent) || !named(j.child) || !(j.above === null || named(j.above))) throw new Error('missing fields')
    if (j.phase !== undefined && j.phase !== 'copied' && j.phase !== 'dropped') throw new Error(`unknown phase ${String(j.phase)}`)
    if (j.v !== undefined && j.v !== 2) throw new Error(`unknown version ${String(j.v)}`)
  } catch (e) {
    throw new RedoError('EINVAL', `${journalPath(parent)}: unreadable commit journal (${(e as Error).message}); inspect it by hand`, journalPath(parent))
  }
  // older journals named absolute paths: those are taken relative to where the parent was then
  const dir = dirname(parent)
  const then = isAbsolute(j.parent) ? dirname(j.parent) : dir
  const here = async (name: string): Promise<string> =>
    await resolveContained(dir, isAbsolute(name) ? relative(then, name) : name, root, 'file named by the commit journal', journalPath(parent), name)
  return { ...j, parent, child: await here(j.child), above: j.above === null ? null : await here(j.above) }
}

export async function removeJournal (parent: string): Promise<void> {
  await unlink(journalPath(parent)).catch(e => { if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e })
  await syncDir(dirname(parent))
}
