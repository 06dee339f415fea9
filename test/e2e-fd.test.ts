/**
 * E2E acceptance 6 (SPEC §2): a file descriptor opened before addredo, commit or discard reads
 * the new content after it (no stale kernel page cache). The fd is opened by bash (`exec 3<`)
 * and read with pread(2) at explicit offsets by a small node reader whose stdin is that fd.
 */
import test, { type ExecutionContext } from 'ava'
import { createHash, randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import path from 'node:path'
import { e2e, readRange, requireFuse, sh, type Server } from './helpers/mount'
import { convertToRaw, describe } from './helpers/qemu'
import { storeChain } from './helpers/store'

requireFuse(test)
const ctx = e2e(test)

const M = 1024 * 1024
const SIZE = 32 * M
const POS = 3 * M + 12345 // unaligned, the range crosses grain boundaries
const LEN = 200001

let root: string
let srv: Server
const data: string[] = [] // x0..x5: random data files of LEN bytes
let base: Buffer // the base content at POS

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

/** bash prelude: fd 3 on the live file; rd POS LEN prints the sha256 of a pread on fd 3. */
const PRELUDE = `
set -u
exec 3< "$IMG"
rd () { node -e '
  const fs = require("fs"); const [p, n] = process.argv.slice(1).map(Number)
  const b = Buffer.alloc(n); const r = fs.readSync(0, b, 0, n, p)
  process.stdout.write(require("crypto").createHash("sha256").update(b.subarray(0, r)).digest("hex") + " " + r + "\\n")
' "$1" "$2" <&3; }
put () { dd if="$1" of="$IMG" bs=65536 seek=${POS} oflag=seek_bytes conv=notrunc status=none || echo "put $1 failed" >&2; }
`

async function script (body: string): Promise<{ lines: string[], out: string }> {
  const env = `IMG='${srv.img('vm1', 'disk')}'; CTL='${path.join(srv.mnt, '.ctl', 'vm1', 'disk')}'; POS=${POS}; LEN=${LEN}\n`
  const r = await sh(env + PRELUDE + body, [], { cwd: root })
  if (r.code !== 0) throw new Error(describe(r))
  return { lines: r.stdout.trim().split('\n'), out: describe(r) }
}

function expectReads (t: ExecutionContext, got: string[], want: Buffer[], labels: string[], out: string): void {
  t.is(got.length, want.length, out)
  for (let i = 0; i < want.length; i++) t.is(got[i], `${sha(want[i])} ${want[i].length}`, `${labels[i]}\n${out}`)
}

test.before(async () => {
  root = await ctx.tmp()
  const c = await storeChain(root, SIZE, [{ writes: [{ pattern: 0x61, offset: 0, length: 8 * M }, { pattern: 0x62, offset: POS + 1000, length: 5 }] }])
  const raw = path.join(root, 'base.raw')
  await convertToRaw(c.files[0], raw)
  base = await readRange(raw, POS, LEN)
  for (let i = 0; i <= 5; i++) {
    const f = path.join(root, `x${i}`)
    await writeFile(f, randomBytes(LEN))
    data.push(f)
  }
  srv = await ctx.mount(c.store, path.join(root, 'mnt'))
})

const x = async (i: number): Promise<Buffer> => await readRange(data[i], 0, LEN)

test.serial('an fd opened before addredo reads the writes made after it through another fd', async t => {
  const { lines, out } = await script(`
    rd $POS $LEN              # base content
    put x1; rd $POS $LEN      # written through another open
    echo > "$CTL/addredo" || { echo "addredo failed" >&2; exit 3; }
    rd $POS $LEN              # same content after the addredo
    put x2; rd $POS $LEN      # written into the new redo log
  `)
  expectReads(t, lines, [base, await x(1), await x(1), await x(2)], ['before', 'after write 1', 'after addredo', 'after write 2 (new top)'], out)
  t.is((await srv.status('vm1', 'disk')).redoLogs, 1)
  t.is(sha(await readRange(srv.img('vm1', 'disk', 0), POS, LEN)), sha(await x(1)), 'the frozen generation holds write 1')
})

test.serial('an fd opened before commit reads the merged content, then later writes', async t => {
  const { lines, out } = await script(`
    put x3; rd $POS $LEN
    echo > "$CTL/addredo" || exit 3
    put x4; rd $POS $LEN
    echo level=0 > "$CTL/commit" || { echo "commit failed" >&2; exit 3; }
    rd $POS $LEN              # content of the merged chain
    echo level=0 > "$CTL/commit" || { echo "commit 2 failed" >&2; exit 3; }
    rd $POS $LEN              # now everything is in the base
    put x5; rd $POS $LEN
  `)
  expectReads(t, lines, [await x(3), await x(4), await x(4), await x(4), await x(5)],
    ['after write 3', 'after write 4', 'after commit 1', 'after commit 2', 'after write 5'], out)
  t.is((await srv.status('vm1', 'disk')).redoLogs, 0)
})

test.serial('an fd opened before discard reads the reverted content after it', async t => {
  const { lines, out } = await script(`
    echo > "$CTL/addredo" || exit 3
    rd $POS $LEN              # x5, in the base now
    put x0; rd $POS $LEN      # x0 in the redo log
    echo > "$CTL/discard" || { echo "discard failed" >&2; exit 3; }
    rd $POS $LEN              # back to x5
  `)
  expectReads(t, lines, [await x(5), await x(0), await x(5)], ['before', 'after the write into the redo log', 'after discard'], out)
  t.is((await srv.status('vm1', 'disk')).redoLogs, 0)
})

test.serial('control files read whole right after they change: no size the kernel cached cuts them (cat and readFile)', async t => {
  const ctl = path.join(srv.mnt, '.ctl', 'vm1', 'disk')
  const count = (text: string): number => (JSON.parse(text) as { generations: unknown[] }).generations.length
  const before = count((await sh('cat "$1"', [path.join(ctl, 'status')])).stdout)
  // stat caches the size for the attribute timeout (1 s; a read just before would make the
  // kernel ask again, hence the pause); addredo makes the status text longer
  const seq = 'sleep 1.2; stat -c %s "$1" >/dev/null && echo > "$2" && stat -c %s "$1" >/dev/null && '
  const r = await sh(seq + 'cat "$1"', [path.join(ctl, 'status'), path.join(ctl, 'addredo')])
  t.is(r.code, 0, describe(r))
  let after = -1
  t.notThrows(() => { after = count(r.stdout) }, `cat of status right after addredo is not whole JSON:\n${r.stdout.slice(-300)}`)
  t.is(after, before + 1, 'the first read after addredo lists the new generation')
  // the same through readFile, which sizes its read from fstat
  const viaNode = await sh(seq + `node -e 'require("fs").promises.readFile(process.argv[1], "utf8").then(t => process.stdout.write(t))' "$1"`, [path.join(ctl, 'status'), path.join(ctl, 'addredo')])
  t.is(viaNode.code, 0, describe(viaNode))
  t.notThrows(() => { after = count(viaNode.stdout) }, `readFile of status right after addredo is not whole JSON:\n${viaNode.stdout.slice(-300)}`)
  t.is(after, before + 2)
  // leave the chain as the next test expects it
  for (let i = 0; i < 2; i++) await srv.commandOk('vm1', 'disk', 'discard')
})

test.serial('the server unmounts cleanly', async t => {
  await srv.stopClean(t)
})
