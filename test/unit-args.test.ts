import test from 'ava'
import { parseArgs } from '../src/store/args'
import { parseSize, formatSize } from '../src/units'
import { diskNameOf } from '../src/chain/names'

const COMMIT = { level: 'level', freeze: 'bool', wait: 'bool', force: 'bool' } as const

test('parses key=value words of a command', t => {
  t.deepEqual(parseArgs('level=1 freeze=0', COMMIT, 'commit'), { level: 1, freeze: false })
  t.deepEqual(parseArgs('level=all', COMMIT, 'commit'), { level: 'all' })
  t.deepEqual(parseArgs('\n', COMMIT, 'commit'), {})
})

test('unknown keys and malformed values are EINVAL naming the argument', t => {
  t.throws(() => parseArgs('bogus=1', COMMIT, 'commit'), { code: 'EINVAL', message: /unknown argument "bogus"/ } as never)
  t.throws(() => parseArgs('level=x', COMMIT, 'commit'), { code: 'EINVAL', message: /level=x/ } as never)
  t.throws(() => parseArgs('freeze=2', COMMIT, 'commit'), { code: 'EINVAL' } as never)
  t.throws(() => parseArgs('level', COMMIT, 'commit'), { code: 'EINVAL' } as never)
  t.throws(() => parseArgs('level=1 level=2', COMMIT, 'commit'), { code: 'EINVAL' } as never)
})

test('sizes take K/M/G/T suffixes', t => {
  t.is(parseSize('16M'), 16 * 2 ** 20)
  t.is(parseSize('2T'), 2 * 2 ** 40)
  t.is(parseSize('512'), 512)
  t.is(parseSize('1.5K'), 1536)
  t.throws(() => parseSize('12Q'))
  t.is(formatSize(3 * 2 ** 30), '3G')
})

test('disk names drop the redo suffix and the extension', t => {
  t.is(diskNameOf('/s/vm/disk-000002.vmdk'), 'disk')
  t.is(diskNameOf('disk.vmdk'), 'disk')
  t.is(diskNameOf('disk.vmdk.REDO'), 'disk')
  t.is(diskNameOf('disk.vmdk.REDO.REDO'), 'disk')
  t.is(diskNameOf('my-disk-2.vmdk'), 'my-disk-2')
})
