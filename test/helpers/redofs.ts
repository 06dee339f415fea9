/** Driving the redofs CLI as a child process, and checking its error contract. */
import type { ExecutionContext } from 'ava'
import { spawn } from 'node:child_process'
import { REDOFS_BIN } from './env'
import { describe, run, type RunResult } from './qemu'

/** `node bin/redofs ...args`, DEBUG unset (so no stack traces are expected). */
export async function redofs (args: string[], cwd?: string): Promise<RunResult> {
  const env = { ...process.env }
  delete env.DEBUG
  delete env.NODE_OPTIONS
  return await run(process.execPath, [REDOFS_BIN, ...args], { cwd, env })
}

/** Like redofs() but throws with the full output unless it exits 0. */
export async function redofsOk (args: string[], cwd?: string): Promise<RunResult> {
  const r = await redofs(args, cwd)
  if (r.code !== 0) throw new Error(`redofs failed\n${describe(r)}`)
  return r
}

export interface InfoLayer {
  generation: number
  file: string
  format: string
  capacity: number
  allocated: number
  cid: string | number
  parentCID: string | number
  /** Frozen generations only. */
  label: string | null
  /** Why the generation cannot be read as it was (a commit into it got part of the way). */
  inFlux: string | null
}

export interface InfoJson {
  layers: InfoLayer[]
}

/** A CID from info --json: a hex string ("0a1b2c3d") or a number. */
export function cidValue (v: string | number): number {
  return typeof v === 'number' ? v : parseInt(v.replace(/^0x/i, ''), 16)
}

export async function infoJson (vmdk: string): Promise<InfoJson> {
  const r = await redofsOk(['info', '--json', vmdk])
  return JSON.parse(r.stdout) as InfoJson
}

/** `redofs export <vmdk>[@G] <out>`; G undefined = the top. */
export async function exportGen (vmdk: string, gen: number | undefined, out: string, extra: string[] = []): Promise<RunResult> {
  return await redofs(['export', ...extra, gen === undefined ? vmdk : `${vmdk}@${gen}`, out])
}

export interface ErrorExpectation {
  /** Every one of these must appear in the message (file names, CIDs...). */
  mustName?: string[]
  /** At least one of these must appear (when the file named may reasonably be either). */
  mustNameOneOf?: string[]
  /** A keyword of the problem. */
  keyword: RegExp
}

/**
 * The error contract (SPEC §5/§6, CLI contract): non-zero exit (1), exactly one line on stderr of
 * the form `redofs: <message>`, naming the file and the problem, no stack trace.
 */
export function assertOneLineError (t: ExecutionContext, r: RunResult, exp: ErrorExpectation): void {
  const ctx = describe(r)
  t.not(r.code, 0, `expected failure\n${ctx}`)
  t.is(r.code, 1, `errors exit with status 1\n${ctx}`)
  const err = r.stderr.replace(/\n+$/, '')
  t.true(err.length > 0, `stderr is empty\n${ctx}`)
  t.false(err.includes('\n'), `stderr must be ONE line\n${ctx}`)
  t.regex(err, /^redofs: \S/, `stderr must read "redofs: <message>"\n${ctx}`)
  t.false(/^\s+at\s/m.test(r.stderr) || /\.(js|ts):\d+:\d+/.test(r.stderr), `no stack trace expected\n${ctx}`)
  for (const n of exp.mustName ?? []) t.true(err.includes(n), `message should name "${n}"\n${ctx}`)
  if (exp.mustNameOneOf) {
    t.true(exp.mustNameOneOf.some(n => err.includes(n)), `message should name one of ${exp.mustNameOneOf.join(', ')}\n${ctx}`)
  }
  t.regex(err, exp.keyword, `message should say what is wrong (${String(exp.keyword)})\n${ctx}`)
}

/**
 * Run `redofs <args>` with REDOFS_DELAY at `point`; once it waits there (at `match` in its
 * debug line), stop it, run `meanwhile`, and let it go on. Its exit code and output.
 */
export async function stoppedReader (t: ExecutionContext, args: string[], point: string, match: string, meanwhile: () => Promise<void>): Promise<{ code: number | null, stdout: string, stderr: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, REDOFS_DELAY: `${point}:2000`, DEBUG: 'redofs:fault' }
  const reader = spawn(process.execPath, [REDOFS_BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  reader.stdout.on('data', (b: Buffer) => { stdout += b.toString() })
  reader.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  // 'close', not 'exit': the exit can come before the last of stderr is read
  const exited = new Promise<number | null>(resolve => reader.on('close', code => resolve(code)))
  let done = false
  void exited.then(() => { done = true })
  const waiting = `${point}: waiting 2000 ms ${match}`
  while (!done && !stderr.includes(waiting)) await new Promise(resolve => setTimeout(resolve, 10))
  t.false(done, `${args[0]} ended before its delay point: ${stderr}`)
  reader.kill('SIGSTOP')
  try {
    await meanwhile()
  } finally {
    reader.kill('SIGCONT')
  }
  return { code: await exited, stdout, stderr }
}
