/**
 * Environment checks shared by every test file: the external oracles (qemu-img, qemu-io,
 * vmdkinfo) and the compiled CLI. A missing piece registers a FAILING test that says how to
 * install it, so a bare machine never passes by skipping.
 */
import { accessSync, constants, existsSync } from 'node:fs'
import path from 'node:path'
import type { TestFn } from 'ava'

export type Tool = 'qemu-img' | 'qemu-io' | 'vmdkinfo'

const INSTALL_HINT: Record<Tool, string> = {
  'qemu-img': 'apt-get install -y qemu-utils',
  'qemu-io': 'apt-get install -y qemu-utils',
  vmdkinfo: 'apt-get install -y libvmdk-utils'
}

/** Absolute path of the compiled CLI entry (bin/redofs requires it). */
export const REDOFS_BIN = path.resolve(__dirname, '..', '..', '..', 'bin', 'redofs')
export const REDOFS_MAIN = path.resolve(__dirname, '..', '..', 'src', 'cli', 'main.js')

export function onPath (cmd: string): boolean {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (dir === '') continue
    try {
      accessSync(path.join(dir, cmd), constants.X_OK)
      return true
    } catch {}
  }
  return false
}

export interface EnvOptions {
  tools?: Tool[]
  /** Also require the compiled CLI (dist/src/cli/main.js). Default true. */
  cli?: boolean
}

/**
 * Call once at the top of a test file. Returns true when everything is present; otherwise it has
 * registered one failing test per missing piece (the file's other tests still run and fail too).
 */
export function requireEnv (test: TestFn, opts: EnvOptions = {}): boolean {
  const tools = opts.tools ?? ['qemu-img', 'qemu-io', 'vmdkinfo']
  let ok = true
  const missing = tools.filter(t => !onPath(t))
  if (missing.length > 0) {
    ok = false
    const pkgs = [...new Set(missing.map(t => INSTALL_HINT[t].replace('apt-get install -y ', '')))]
    const hint = `missing ${missing.join(', ')}: install with "apt-get install -y ${pkgs.join(' ')}" ` +
      '(or run npm test, whose set-up installs it)'
    test(`environment: ${missing.join(', ')} installed`, t => { t.fail(hint) })
  }
  if (opts.cli !== false && !existsSync(REDOFS_MAIN)) {
    ok = false
    test('environment: redofs CLI compiled', t => {
      t.fail(`${REDOFS_MAIN} is missing: build with "npx tsc -p ." (or run npm test, whose set-up builds it)`)
    })
  }
  return ok
}
