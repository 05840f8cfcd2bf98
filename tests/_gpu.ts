// WebGPU helpers of the tests.

/** A device of the default adapter whose buffers are counted: created, destroyed, alive. */
export async function countedDevice() {
  const adapter = (await navigator.gpu.requestAdapter())!;
  const device = await adapter.requestDevice();
  const live = new Set<GPUBuffer>();
  const counts = { created: 0, destroyed: 0 };
  const createBuffer = device.createBuffer.bind(device);
  device.createBuffer = (descriptor: GPUBufferDescriptor) => {
    const buffer = createBuffer(descriptor);
    counts.created++;
    live.add(buffer);
    const destroy = buffer.destroy.bind(buffer);
    buffer.destroy = () => {
      if (live.delete(buffer)) counts.destroyed++;
      destroy();
    };
    return buffer;
  };
  return { device, live, counts };
}
