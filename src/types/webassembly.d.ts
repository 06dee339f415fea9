/** The one WebAssembly API redofs uses (page-aligned memory, src/formats/direct.ts); lib.dom is not loaded. */
declare namespace WebAssembly {
  class Memory {
    constructor (descriptor: { initial: number, maximum?: number })
    readonly buffer: ArrayBuffer
  }
}
