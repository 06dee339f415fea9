/**
 * Acceptance 7 (damaged half; clean chains are checked in export/cowd tests): `redofs check`
 * exits 1 with a list of problems on each damaged chain, naming the file, and modifies nothing.
 */
import test from 'ava'
import { checkOnlyCases, damageCases } from './helpers/damage'
import { requireEnv } from './helpers/env'
import { describe, snapshotTree } from './helpers/qemu'
import { redofs } from './helpers/redofs'
import { storeChain, FOUR_LEVELS } from './helpers/store'
import { tmpDirs } from './helpers/tmp'
import { gtePosition, readKdmvHeader, readU32, writeAt, writeU32 } from './helpers/vmdk'

requireEnv(test)
const tmp = tmpDirs(test)

for (const dc of [...damageCases, ...checkOnlyCases]) {
  test(`check: ${dc.title} → exit 1 with the problem listed`, async t => {
    const d = await dc.build(await tmp())
    const before = await snapshotTree(d.root)
    const r = await redofs(['check', d.top])
    const ctx = describe(r)
    t.is(r.code, 1, ctx)
    const out = `${r.stdout}${r.stderr}`
    t.true(out.trim().length > 0, `problems must be listed\n${ctx}`)
    t.false(/^\s*clean\s*$/m.test(r.stdout), `must not report clean\n${ctx}`)
    t.false(/^\s+at\s/m.test(r.stderr), `no stack trace\n${ctx}`)
    if (d.checkProblem) {
      // check can open this chain: one problem per line on stdout, one of them naming the file and the problem
      const lines = r.stdout.split('\n').filter(l => l.trim() !== '')
      const hit = lines.some(l => d.checkProblem !== undefined && d.checkProblem.keyword.test(l) && d.checkProblem.mustNameOneOf.some(n => l.includes(n)))
      t.true(hit, `a problem line naming ${d.checkProblem.mustNameOneOf.join(' or ')} matching ${String(d.checkProblem.keyword)} expected\n${ctx}`)
    } else {
      const names = [...(d.error.mustName ?? []), ...(d.error.mustNameOneOf ?? [])]
      t.true(names.some(n => out.includes(n)), `output should name ${names.join(' or ')}\n${ctx}`)
    }
    t.deepEqual(await snapshotTree(d.root), before, 'check modifies nothing')
  })
}

test('check: a clean 4-level chain is clean, and check modifies nothing', async t => {
  const c = await storeChain(await tmp(), 16 * 1024 * 1024, FOUR_LEVELS.map(writes => ({ writes })))
  const before = await snapshotTree(c.vmDir)
  const r = await redofs(['check', c.files[3]])
  t.is(r.code, 0, describe(r))
  t.regex(r.stdout, /\bclean\b/, describe(r))
  t.deepEqual(await snapshotTree(c.vmDir), before)
})

test('recovery after an unclean shutdown leaves damaged grain entries alone: nothing zeroed, still reported', async t => {
  const dc = damageCases.find(c => c.title === 'two grain table entries pointing at the same grain')
  if (dc === undefined) throw new Error('damage case missing')
  const d = await dc.build(await tmp())
  const grain1 = await gtePosition(d.top, 1)
  const grain64 = await gtePosition(d.top, 64)
  const before = [await readU32(d.top, grain1), await readU32(d.top, grain64)]
  // no redundant tables to fall back on, and the file was not closed cleanly
  const flags = (await readKdmvHeader(d.top)).flags
  await writeU32(d.top, 8, flags & ~2)
  await writeAt(d.top, 72, Buffer.from([1]))
  // a writable open recovers (and then refuses the damaged chain)
  const r = await redofs(['addredo', d.top])
  t.not(r.code, 0, describe(r))
  t.deepEqual([await readU32(d.top, grain1), await readU32(d.top, grain64)], before, 'recovery rewrote the damaged entries')
  const chk = await redofs(['check', d.top])
  t.is(chk.code, 1, describe(chk))
  t.regex(chk.stdout, /another grain/)
})

