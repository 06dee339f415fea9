/** The CLI loads only the command it runs, and every command when it cannot tell which. */
import test from 'ava'
import { commandsFor } from '../src/cli/main'

const names = (argv: string[]): string[] => commandsFor(argv).map(c => String(c.command).split(' ')[0])

test('a command word loads that command only', t => {
  t.deepEqual(names(['commit', 'store/vm/disk', 'level=0']), ['commit'])
  t.deepEqual(names(['--ignore-cid', 'info', 'x']), ['info'])
})

test('the value of --store is not taken for the command', t => {
  t.deepEqual(names(['--store', 'backup', 'commit', 'vm/disk']), ['commit'])
  t.deepEqual(names(['--store=backup', 'check', 'vm/disk']), ['check'])
})

test('help, no command or an unknown word load every command (for the listing and suggestions)', t => {
  const all = names(['--help'])
  t.true(all.length >= 17, `only ${all.length} commands`)
  for (const c of ['mount', 'commit', 'addredo', 'discard', 'backup', 'relink', 'demo']) t.true(all.includes(c), c)
  t.deepEqual(names([]), all)
  t.deepEqual(names(['comit', 'x']), all)
})
