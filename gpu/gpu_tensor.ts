/**
 * Moving tensors between the host and a WebGPU device, for the GPU-resident
 * calls of a "webgpu" router (see {@linkcode GpuTensor}).
 *
 * Buffer usage: the router reads input buffers (logits, gradProbs,
 * expertBias) as storage, so they need `GPUBufferUsage.STORAGE`; the buffers
 * it returns have `STORAGE | COPY_SRC | COPY_DST`. {@linkcode toGpuTensor}
 * creates buffers with `STORAGE | COPY_SRC | COPY_DST`; reading back needs
 * `COPY_SRC`.
 *
 * @module
 */
import type { DataOf, DType, GpuTensor, Tensor } from "../_types.ts";
import { ARRAY_OF, BYTES_OF, sizeOf } from "../tensor.ts";

const STORAGE = 0x80;
const COPY_SRC = 0x04;
const COPY_DST = 0x08;
const MAP_READ = 0x01;

/**
 * Uploads a host tensor into a new buffer of `device` (usage
 * `STORAGE | COPY_SRC | COPY_DST`, size rounded up to 4 bytes); the caller
 * owns the buffer (`buffer.destroy()` frees it).
 *
 * @param device the router's device (`router.device`)
 * @param tensor the host tensor
 * @returns a GpuTensor of the same shape and dtype
 */
export function toGpuTensor<D extends DType>(device: GPUDevice, tensor: Tensor<D>): GpuTensor<D> {
  const data = tensor.data as ArrayBufferView;
  const bytes = data.byteLength;
  const size = Math.max(4, Math.ceil(bytes / 4) * 4);
  const buffer = device.createBuffer({ label: "moe-router tensor", size, usage: STORAGE | COPY_SRC | COPY_DST });
  const padded = new Uint8Array(size);
  padded.set(new Uint8Array(data.buffer, data.byteOffset, bytes));
  device.queue.writeBuffer(buffer, 0, padded);
  return { buffer, shape: [...tensor.shape], dtype: tensor.dtype };
}

/**
 * Reads a GpuTensor back into a new host tensor (one copy into a mappable
 * buffer, then a map). The buffer needs `GPUBufferUsage.COPY_SRC`.
 *
 * @param device the device the buffer belongs to (`router.device`)
 * @param tensor the GPU-resident tensor
 * @returns the host tensor: same shape and dtype
 * @throws {TypeError} for a buffer without COPY_SRC or smaller than the tensor
 */
export async function readGpuTensor<D extends DType>(device: GPUDevice, tensor: GpuTensor<D>): Promise<Tensor<D>> {
  const ctor = ARRAY_OF[tensor.dtype];
  if (ctor === undefined) throw new TypeError(`dtype ${tensor.dtype} needs Float16Array, which this runtime lacks`);
  const n = sizeOf(tensor.shape);
  const bytes = n * BYTES_OF[tensor.dtype];
  const copy = Math.max(4, Math.ceil(bytes / 4) * 4);
  if ((tensor.buffer.usage & COPY_SRC) === 0) {
    throw new TypeError(
      `tensor.buffer must have GPUBufferUsage.COPY_SRC to be read back, got usage 0x${
        tensor.buffer.usage.toString(16)
      }`,
    );
  }
  if (tensor.buffer.size < copy) {
    throw new TypeError(
      `tensor.buffer must hold ${copy} bytes (shape [${tensor.shape}] ${tensor.dtype}, rounded up to 4), got ${tensor.buffer.size}`,
    );
  }
  const read = device.createBuffer({ label: "moe-router readback", size: copy, usage: MAP_READ | COPY_DST });
  try {
    const encoder = device.createCommandEncoder({ label: "moe-router readback" });
    encoder.copyBufferToBuffer(tensor.buffer, 0, read, 0, copy);
    device.queue.submit([encoder.finish()]);
    await read.mapAsync(MAP_READ);
    const out = new ctor(n) as DataOf[D];
    new Uint8Array(out.buffer).set(new Uint8Array(read.getMappedRange(), 0, bytes));
    read.unmap();
    return { data: out, shape: [...tensor.shape], dtype: tensor.dtype };
  } finally {
    read.destroy();
  }
}
