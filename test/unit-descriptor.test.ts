import test from 'ava'
import { Descriptor, cidHex, newCid, parseCid } from '../src/formats/descriptor'

const QEMU_CHILD = `# Disk DescriptorFile
version=1
CID=1babeb3
parentCID=9916146
createType="monolithicSparse"
parentFileNameHint="base.vmdk"
# Extent description
RW 204800 SPARSE "c1.vmdk"

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.adapterType = "ide"
ddb.custom.thing = "kept as is"
\0\0\0\0`

test('parses a qemu child descriptor with unpadded CIDs and NUL padding', t => {
  const d = Descriptor.parse(QEMU_CHILD)
  t.is(d.cid, 0x1babeb3)
  t.is(d.parentCID, 0x9916146)
  t.is(d.parentFileNameHint, 'base.vmdk')
  t.true(d.hasParent)
  t.is(d.createType, 'monolithicSparse')
  t.deepEqual(d.extents, [{ access: 'RW', sectors: 204800, type: 'SPARSE', file: 'c1.vmdk', offset: undefined }])
  t.is(d.sectors, 204800)
})

test('rewrites CIDs as 8 hex digits and keeps unknown keys and comments', t => {
  const d = Descriptor.parse(QEMU_CHILD)
  d.cid = 0xab
  d.parentCID = 0x1
  const text = d.toString()
  t.regex(text, /^CID=000000ab$/m)
  t.regex(text, /^parentCID=00000001$/m)
  t.regex(text, /^ddb\.custom\.thing = "kept as is"$/m)
  t.regex(text, /^# Extent description$/m)
  t.false(text.includes('\0'))
  t.is(Descriptor.parse(text).cid, 0xab)
})

test('keeps longContentID consistent with a new CID', t => {
  const d = Descriptor.create({ createType: 'monolithicSparse', cid: 5, extents: [{ access: 'RW', sectors: 8, type: 'SPARSE', file: 'x.vmdk' }], ddb: { 'ddb.longContentID': '0123456789abcdef0123456700000005' } })
  d.cid = 0xdeadbeef
  t.is(d.get('ddb.longContentID'), '0123456789abcdef01234567deadbeef')
})

test('accepts CRLF line ends and reads keys case-insensitively', t => {
  const d = Descriptor.parse('# Disk DescriptorFile\r\nversion=1\r\ncid=fffffffe\r\nparentcid=ffffffff\r\ncreateType="monolithicFlat"\r\nRW 16 FLAT "f.raw" 0\r\n')
  t.is(d.cid, 0xfffffffe)
  t.false(d.hasParent)
  t.is(d.extents[0].offset, 0)
})

test('refuses text that is not a descriptor, with the file name in the message', t => {
  t.throws(() => Descriptor.parse('hello world', 'x.vmdk'), { message: /x\.vmdk/ })
  t.throws(() => Descriptor.parse('version=1\ncreateType="monolithicFlat"\n', 'y.vmdk'), { message: /no extents/ })
  t.throws(() => Descriptor.parse('version=1\ncreateType="bogusType"\nRW 1 FLAT "a" 0\n', 'z.vmdk'), { message: /unknown createType/ })
  t.throws(() => Descriptor.parse('version=1\nCID=xyz\ncreateType="monolithicFlat"\nRW 1 FLAT "a" 0\n', 'w.vmdk'), { message: /bad CID/ })
})

test('new CIDs avoid the reserved values and the old one', t => {
  for (let i = 0; i < 1000; i++) {
    const c = newCid(7)
    t.true(c !== 0xffffffff && c !== 0xfffffffe && c !== 7)
  }
  t.is(cidHex(0xf), '0000000f')
  t.is(parseCid(undefined), 0xffffffff)
})
