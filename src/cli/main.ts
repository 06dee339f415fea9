/** redofs command line (yargs): one module per command under commands/. */
import yargs from 'yargs'
import { hideBin } from 'yargs/helpers'
import * as addredo from './commands/addredo'
import * as check from './commands/check'
import * as commit from './commands/commit'
import * as create from './commands/create'
import * as discard from './commands/discard'
import * as exportCmd from './commands/export'
import * as importCmd from './commands/import'
import * as info from './commands/info'
import * as mount from './commands/mount'
import * as umount from './commands/umount'
import * as demo from './commands/demo'
import * as label from './commands/label'
import * as mapCmd from './commands/map'
import * as backup from './commands/backup'
import * as restore from './commands/restore'
import * as clone from './commands/clone'
import * as relink from './commands/relink'

export const commands = [mount, umount, create, importCmd, info, check, exportCmd, addredo, commit, discard, label, mapCmd, backup, restore, clone, relink, demo]

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
  for (const c of commands) y = y.command(c as never)
  await y.parseAsync()
}

if (require.main === module || process.argv[1]?.endsWith('bin/redofs')) {
  main(hideBin(process.argv)).catch(e => {
    process.stderr.write(`redofs: ${(e as Error).message}\n`)
    process.exitCode = 1
  })
}
