/**
 * The commit journal: written (durably) before a commit changes anything, deleted after the
 * last step. Its presence at open means a commit was interrupted; the chain finishes it, since
 * every step is idempotent (VMDK.md §9.2).
 */
import { readFile, unlink } from 'node:fs/promises'
import { dirname } from 'node:path'
import { RedoError } from '../errors'
import { syncDir, writeFileDurable } from '../formats/extent'

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
  /** The parent is a raw disk without descriptor (ESX 2.x); absent in older journals. */
  rawParent?: boolean
  started: string
}

export const journalPath = (parent: string): string => `${parent}.redofs-commit`

export async function writeJournal (j: CommitJournal): Promise<void> {
  await writeFileDurable(journalPath(j.parent), JSON.stringify(j, null, 2) + '\n')
}

export async function readJournal (parent: string): Promise<CommitJournal | undefined> {
  let text: string
  try {
    text = await readFile(journalPath(parent), 'utf8')
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw e
  }
  try {
    const j = JSON.parse(text) as CommitJournal
    if (j.op !== 'commit' || typeof j.child !== 'string' || typeof j.parentCID !== 'number') throw new Error('missing fields')
    return j
  } catch (e) {
    throw new RedoError('EINVAL', `${journalPath(parent)}: unreadable commit journal (${(e as Error).message}); inspect it by hand`, journalPath(parent))
  }
}

export async function removeJournal (parent: string): Promise<void> {
  await unlink(journalPath(parent)).catch(e => { if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e })
  await syncDir(dirname(parent))
}
