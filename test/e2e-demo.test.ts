/**
 * `npm start`'s main job: the demo datastore is built by redofs itself, mounted at ./mnt with
 * an ext4 file system in every generation, and Ctrl-C (SIGINT) unmounts cleanly.
 */
import test from 'ava'
import { spawn } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { REDOFS_BIN } from './helpers/env'
import { e2e, isMounted, requireFuse, sh, trackMount, waitFor } from './helpers/mount'

const ok = requireFuse(test)
const env = e2e(test)

if (ok) {
  test.serial('npm start runs the demo: built by redofs, mounted, ext4 in each generation; Ctrl-C unmounts cleanly', async t => {
    t.timeout(120_000)
    const pkg = JSON.parse(await readFile(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { scripts: Record<string, string> }
    t.regex(pkg.scripts.start, /cli\/main\.js demo$/, 'npm start does not run the demo')
    t.regex(pkg.scripts.prestart, /setup\.sh/, 'npm start does not run the set-up first')
    const dir = await env.tmp()
    const mnt = path.join(dir, 'mnt')
    trackMount(mnt)
    const proc = spawn(process.execPath, [REDOFS_BIN, 'demo', '--dir', dir], { stdio: ['pipe', 'pipe', 'pipe'] })
    let out = ''
    proc.stdout.on('data', (d: Buffer) => { out += d.toString() })
    proc.stderr.on('data', (d: Buffer) => { out += d.toString() })
    const exited = new Promise<number | null>(resolve => proc.on('exit', code => resolve(code)))
    t.teardown(() => { if (proc.exitCode === null) proc.kill('SIGKILL') })
    t.true(await waitFor(() => /mounted .* at /.test(out), 600, 100), `demo did not come up:\n${out}`)
    t.regex(out, /Press Ctrl-C to unmount/)
    const ls = await sh('ls "$1"', [path.join(mnt, 'vm1')])
    t.deepEqual(ls.stdout.trim().split('\n').sort(), ['disk0.img', 'disk0@0.img', 'disk0@1.img'])
    for (const g of ['@0', '@1', '']) {
      const f = await sh('fsck.ext4 -n -f "$1"', [path.join(mnt, 'vm1', `disk0${g}.img`)])
      t.is(f.code, 0, `fsck of disk0${g}.img\n${f.stdout}${f.stderr}`)
    }
    const motd = await sh('debugfs -R "cat /etc/motd" "$1" 2>/dev/null', [path.join(mnt, 'vm1', 'disk0@0.img')])
    t.is(motd.stdout.trim(), 'hello from generation 0')
    const motd1 = await sh('debugfs -R "cat /etc/motd" "$1" 2>/dev/null', [path.join(mnt, 'vm1', 'disk0.img')])
    t.is(motd1.stdout.trim(), 'hello from generation 1')
    proc.kill('SIGINT')
    t.is(await exited, 0, out)
    t.false(isMounted(mnt), 'the demo left its mount behind')
    const check = await sh(`"${process.execPath}" "${REDOFS_BIN}" check "$1"`, [path.join(dir, 'demo-store', 'vm1', 'disk0')])
    t.is(check.code, 0, check.stdout + check.stderr)
  })
}
