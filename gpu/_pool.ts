// A pool of scratch buffers, by usage and power-of-two size class. Buffers
// go back to the pool once the call that used them has finished with them
// on the host side; the queue orders later writes after earlier work, so a
// buffer may be reused as soon as its commands are submitted.

/** Pooled GPU buffers of one device. */
export class BufferPool {
  #device: GPUDevice;
  #free = new Map<string, GPUBuffer[]>();
  #keyOf = new Map<GPUBuffer, string>();

  constructor(device: GPUDevice) {
    this.#device = device;
  }

  /** A buffer of at least `size` bytes with exactly `usage`. */
  acquire(size: number, usage: number, label: string): GPUBuffer {
    const cls = sizeClass(size);
    const k = `${usage}:${cls}`;
    const hit = this.#free.get(k)?.pop();
    if (hit !== undefined) return hit;
    // beyond maxBufferSize the class is not rounded up: the request alone must fit
    const bytes = cls <= this.#device.limits.maxBufferSize ? cls : size;
    const buffer = this.#device.createBuffer({ label: `moe-router ${label}`, size: bytes, usage });
    this.#keyOf.set(buffer, k);
    return buffer;
  }

  /** Gives buffers back for reuse. */
  release(...buffers: GPUBuffer[]): void {
    for (const b of buffers) {
      const k = this.#keyOf.get(b);
      if (k === undefined) continue;
      let list = this.#free.get(k);
      if (list === undefined) this.#free.set(k, list = []);
      list.push(b);
    }
  }

  /** Destroys every buffer of the pool. */
  dispose(): void {
    for (const b of this.#keyOf.keys()) b.destroy();
    this.#keyOf.clear();
    this.#free.clear();
  }
}

// 256 bytes at least, then powers of two (a buffer of a class fits every request of it)
function sizeClass(size: number): number {
  let c = 256;
  while (c < size) c *= 2;
  return c;
}
