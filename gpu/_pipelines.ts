// Pipelines compiled once per configuration and cached per device. The key
// of a pipeline is an explicit object (ForwardKey, BackwardKey, AuxLossKey):
// everything that changes the WGSL, nothing that is a size (sizes are
// uniforms). The bind group layout is explicit too, built from the kernel's
// declared bindings, so that a binding a variant does not read is still
// accepted.
import { buildShader, type KernelSource } from "./_shader.ts";

/** A compiled kernel: its pipeline, its bind group layout and its source description. */
export interface Compiled {
  pipeline: GPUComputePipeline;
  layout: GPUBindGroupLayout;
  source: KernelSource;
}

const CACHE = new WeakMap<GPUDevice, Map<string, Compiled>>();

/** The cached pipeline of `key` on `device`, compiled from `build(key)` on first use. */
export function pipelineFor<K extends object>(device: GPUDevice, key: K, build: (key: K) => KernelSource): Compiled {
  let perDevice = CACHE.get(device);
  if (perDevice === undefined) {
    perDevice = new Map();
    CACHE.set(device, perDevice);
  }
  const id = JSON.stringify(key);
  const hit = perDevice.get(id);
  if (hit !== undefined) return hit;
  const source = build(key);
  const module = device.createShaderModule({ label: source.label, code: buildShader(source) });
  const layout = device.createBindGroupLayout({
    label: source.label,
    entries: [
      { binding: 0, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform" } },
      ...source.storage.map((b, i) => ({
        binding: i + 1,
        visibility: GPUShaderStage.COMPUTE,
        buffer: { type: b.access === "read" ? "read-only-storage" as const : "storage" as const },
      })),
    ],
  });
  const pipeline = device.createComputePipeline({
    label: source.label,
    layout: device.createPipelineLayout({ label: source.label, bindGroupLayouts: [layout] }),
    compute: { module, entryPoint: "main" },
  });
  const compiled = { pipeline, layout, source };
  perDevice.set(id, compiled);
  return compiled;
}

/** Number of pipelines compiled for a device (tests check that calls reuse them). */
export function pipelineCount(device: GPUDevice): number {
  return CACHE.get(device)?.size ?? 0;
}
