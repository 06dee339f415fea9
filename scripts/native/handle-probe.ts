/**
 * Preload for a FUSE server under test (node -r dist/scripts/native/handle-probe.js ...):
 * counts the per-thread control blocks fuse-native allocates (each one carries a uv_async_t
 * registered on the default loop: the leaked handles of the stock 2.2.6 addon) by wrapping
 * Fuse.prototype._malloc, and writes
 *   {"blocks": N, "addon": "<path of the loaded fuse.node>", "patchLevel": L|null}
 * to $REDOFS_HANDLE_PROBE every 200 ms. Touches nothing else.
 */
import { renameSync, writeFileSync } from 'node:fs'
import { dirname } from 'node:path'

const out = process.env.REDOFS_HANDLE_PROBE
if (out !== undefined && out !== '') {
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const Fuse = require('fuse-native')
  const dir = dirname(require.resolve('fuse-native/package.json'))
  const gypBuild = require(require.resolve('node-gyp-build', { paths: [dir] }))
  const addon: string = gypBuild.path(dir)
  const patchLevel: number | null = require(addon).redofs_patch_level ?? null
  let blocks = 0
  const orig = Fuse.prototype._malloc
  Fuse.prototype._malloc = function (this: unknown, size: number): Buffer {
    blocks++
    return orig.call(this, size)
  }
  const dump = (): void => {
    writeFileSync(out + '.tmp', JSON.stringify({ blocks, addon, patchLevel }))
    renameSync(out + '.tmp', out)
  }
  dump()
  setInterval(dump, 200).unref()
}
