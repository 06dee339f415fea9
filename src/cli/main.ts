/** redofs command line (yargs): one module per command under commands/. */
import yargs from 'yargs'
import { hideBin } from 'yargs/helpers'
import type { CommandModule } from 'yargs'

// The FUSE server waits in the thread pool for its own mount now and then (the write barrier
// of src/fs/mount.ts holds up to two threads per disk); the default four leave too little for
// the backing-file I/O that must go on meanwhile. Read by libuv when the pool first starts.
process.env.UV_THREADPOOL_SIZE ??= '16'

/**
 * Command name → module. Only the command being run is loaded (a `redofs commit` does not load
 * the FUSE addon or the backup code); help and unknown words load them all.
 */
const COMMANDS = ['mount', 'umount', 'create', 'import', 'info', 'check', 'export', 'addredo', 'commit', 'discard', 'label', 'map', 'backup', 'restore', 'clone', 'relink', 'demo'] as const

const load = (name: string): CommandModule => require(`./commands/${name}`) as CommandModule

/** Global options that take a value in the next word (`--store DIR`). */
const VALUED = new Set(['--store'])

export function commandsFor (argv: string[]): CommandModule[] {
  const first = argv.find((a, i) => !a.startsWith('-') && !VALUED.has(argv[i - 1]))
  const names: readonly string[] = first !== undefined && (COMMANDS as readonly string[]).includes(first) ? [first] : COMMANDS
  return names.map(load)
}

export async function main (argv: string[]): Promise<void> {
  let y = yargs(argv)
    .scriptName('redofs')
    .usage('$0 <command> [options]\n\nVMware redo-log chains as flat raw files (FUSE) and offline tools.')
    .option('ignore-cid', { type: 'boolean', describe: 'accept parentCID mismatches' })
    .option('store', { type: 'string', describe: 'store root for containment (default: grandparent of the top file)' })
    .strict()
    .demandCommand(1, 'name a command')
    .recommendCommands()
    .help()
    .wrap(Math.min(100, process.stdout.columns ?? 100))
    .fail((msg, err) => {
      if (err !== undefined && err !== null) throw err
      process.stderr.write(`redofs: ${msg} (run "redofs --help" for usage)\n`)
      process.exit(2)
    })
  for (const c of commandsFor(argv)) y = y.command(c as never)
  await y.parseAsync()
}

if (require.main === module || process.argv[1]?.endsWith('bin/redofs')) {
  main(hideBin(process.argv)).catch(e => {
    process.stderr.write(`redofs: ${(e as Error).message}\n`)
    process.exitCode = 1
  })
}
