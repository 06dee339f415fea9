/**
 * `key=value` words of control commands, shared by the .ctl files and the offline CLI.
 * An unknown key or a malformed value is EINVAL with a message saying which.
 */
import { RedoError } from '../errors'

export type ArgKind = 'uint' | 'bool' | 'name' | 'level' | 'gen'
export type ArgValue = number | boolean | string

const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/

export function parseArgs (words: string[] | string, spec: Record<string, ArgKind>, command: string): Record<string, ArgValue> {
  const list = typeof words === 'string' ? words.trim().split(/\s+/).filter(w => w !== '') : words
  const out: Record<string, ArgValue> = {}
  for (const w of list) {
    const m = /^([A-Za-z_]+)=(.*)$/.exec(w)
    if (m === null) throw new RedoError('EINVAL', `${command}: "${w}" is not a key=value argument`)
    const [, key, value] = m
    const kind = spec[key]
    if (kind === undefined) throw new RedoError('EINVAL', `${command}: unknown argument "${key}" (known: ${Object.keys(spec).join(', ') || 'none'})`)
    if (key in out) throw new RedoError('EINVAL', `${command}: argument "${key}" given twice`)
    out[key] = parseValue(value, kind, key, command)
  }
  return out
}

function parseValue (v: string, kind: ArgKind, key: string, command: string): ArgValue {
  const bad = (what: string): never => { throw new RedoError('EINVAL', `${command}: ${key}=${v}: ${what}`) }
  switch (kind) {
    case 'uint':
      if (!/^\d{1,9}$/.test(v)) bad('expected a non-negative integer')
      return Number(v)
    case 'bool':
      if (v === '1' || v === 'true' || v === 'yes') return true
      if (v === '0' || v === 'false' || v === 'no') return false
      return bad('expected 0 or 1')
    case 'name':
      if (!NAME_RE.test(v) || /^\d+$/.test(v)) bad('expected a name of letters, digits, _ . - (not a bare number)')
      return v
    case 'level':
      if (v === 'all') return v
      if (!/^\d{1,9}$/.test(v)) bad('expected a number or "all"')
      return Number(v)
    case 'gen':
      if (/^\d{1,9}$/.test(v)) return Number(v)
      if (!NAME_RE.test(v)) bad('expected a generation number or label')
      return v
  }
}

/** Usage text of each command, printed by `cat` of a control file and by the CLI. */
export const USAGE: Record<string, string> = {
  addredo: 'addredo [label=NAME] [record=1]: freeze the live generation and add an empty redo log on top (record=1: also hash its content, for relink)',
  commit: 'commit [level=K|level=all] [freeze=0|1] [wait=0|1] [force=1]: merge the redo log K levels below the top into its parent',
  discard: 'discard [to=G|to=LABEL]: delete the top redo log, or every redo log above generation G',
  label: 'label gen=G name=NAME: name a generation',
  poweroff: 'poweroff keep|commit|discard: what an undoable disk does with its redo log at unmount',
  job: 'job pause|resume|cancel: control the running commit (cancel leaves a valid chain)'
}
