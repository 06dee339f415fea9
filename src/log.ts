import createDebug from 'debug'

/** One debug namespace per room, as DESIGN.md asks. Enable with DEBUG=redofs:* */
export const log = {
  formats: createDebug('redofs:formats'),
  chain: createDebug('redofs:chain'),
  store: createDebug('redofs:store'),
  fs: createDebug('redofs:fs'),
  cli: createDebug('redofs:cli'),
  /** The test hooks of src/fault.ts (a test waits for a delay point to be reached). */
  fault: createDebug('redofs:fault')
}
