/** Temporary directories under os.tmpdir() named redofs-test-*, removed after the file's tests. */
import { mkdtemp, rm } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import type { TestFn } from 'ava'

export async function makeTmpDir (): Promise<string> {
  return await mkdtemp(path.join(os.tmpdir(), 'redofs-test-'))
}

/**
 * Returns a factory of temporary directories; every directory it made is deleted in an
 * `after.always` hook of `test` (set KEEP_TMP=1 to keep them for debugging).
 */
export function tmpDirs (test: TestFn): () => Promise<string> {
  const made: string[] = []
  test.after.always('remove temporary directories', async () => {
    if (process.env.KEEP_TMP === '1') {
      if (made.length > 0) console.log(`kept: ${made.join(' ')}`)
      return
    }
    await Promise.all(made.map(async d => await rm(d, { recursive: true, force: true })))
  })
  return async () => {
    const d = await makeTmpDir()
    made.push(d)
    return d
  }
}
