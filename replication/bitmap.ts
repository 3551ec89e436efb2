// The out-of-sync bitmap: one bit per block of the volume, with a running count.
// A set bit means "this block may differ from the peer's copy". Serialised as the raw
// bit array (block i is bit i%8 of byte i/8), which is also its on-disk format.

export class Bitmap {
  readonly bytes: Uint8Array;
  private setCount = 0;

  constructor(readonly blocks: number, bytes?: Uint8Array) {
    if (!Number.isInteger(blocks) || blocks <= 0) throw new Error(`bitmap: bad block count ${blocks}`);
    const len = Math.ceil(blocks / 8);
    if (bytes) {
      if (bytes.length !== len) throw new Error(`bitmap: ${bytes.length} bytes for ${blocks} blocks (want ${len})`);
      this.bytes = bytes;
      for (const b of bytes) this.setCount += popcount8(b);
    } else this.bytes = new Uint8Array(len);
  }

  get count(): number {
    return this.setCount;
  }

  get(block: number): boolean {
    return (this.bytes[block >> 3]! & (1 << (block & 7))) !== 0;
  }

  set(block: number): void {
    const i = block >> 3;
    const m = 1 << (block & 7);
    if ((this.bytes[i]! & m) === 0) {
      this.bytes[i] = this.bytes[i]! | m;
      this.setCount++;
    }
  }

  clear(block: number): void {
    const i = block >> 3;
    const m = 1 << (block & 7);
    if ((this.bytes[i]! & m) !== 0) {
      this.bytes[i] = this.bytes[i]! & ~m;
      this.setCount--;
    }
  }

  setBlocks(first: number, count: number): void {
    for (let b = first; b < first + count; b++) this.set(b);
  }

  clearBlocks(first: number, count: number): void {
    for (let b = first; b < first + count; b++) this.clear(b);
  }

  setAll(): void {
    this.bytes.fill(0xff);
    const tail = this.blocks & 7;
    if (tail) this.bytes[this.bytes.length - 1] = (1 << tail) - 1;
    this.setCount = this.blocks;
  }

  clearAll(): void {
    this.bytes.fill(0);
    this.setCount = 0;
  }

  /** Sets every bit that is set in `other` (same size). */
  union(other: Bitmap): void {
    if (other.blocks !== this.blocks) throw new Error("bitmap: union of different sizes");
    for (let i = 0; i < this.bytes.length; i++) {
      const add = other.bytes[i]! & ~this.bytes[i]!;
      if (add) {
        this.bytes[i] = this.bytes[i]! | add;
        this.setCount += popcount8(add);
      }
    }
  }

  /** The first set block at or after `from`, or -1. Skips zero bytes quickly. */
  nextSet(from: number): number {
    let b = Math.max(0, from);
    while (b < this.blocks) {
      const byte = this.bytes[b >> 3]!;
      if (byte === 0) {
        b = ((b >> 3) + 1) << 3;
        continue;
      }
      if (byte & (1 << (b & 7))) return b;
      b++;
    }
    return -1;
  }

  /** The length of the run of set bits starting at `start`, at most `max`. */
  runLength(start: number, max: number): number {
    let n = 0;
    while (n < max && start + n < this.blocks && this.get(start + n)) n++;
    return n;
  }

  clone(): Bitmap {
    return new Bitmap(this.blocks, new Uint8Array(this.bytes));
  }
}

function popcount8(x: number): number {
  x = x - ((x >> 1) & 0x55);
  x = (x & 0x33) + ((x >> 2) & 0x33);
  return (x + (x >> 4)) & 0x0f;
}
