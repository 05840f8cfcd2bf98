// WebGPU router benchmark: GPU time per call (timestamp queries around the
// call's compute pass) on GPU-resident tensors, and wall time per call on
// host arrays (upload + kernels + readback), forward and backward.
//
//   deno run -A bench/gpu_bench.ts [--json out.json] [--iters N] [--warmup N] [--cases dsv3,wide]
//
// Cases follow the issue: DeepSeek-V3, Qwen3, Mixtral, a wide radix case and
// decode. Results print as a table; --json writes them for comparison with
// bench/torch_baseline.py.
import { WebGpuBackend } from "../gpu/backend.ts";
import { planTopk } from "../_validate.ts";
import type { FloatTensor, GpuTensor, TopkOptions } from "../_types.ts";
import { mulberry32 } from "../tests/_generators.ts";

interface Case {
  name: string;
  T: number;
  E: number;
  options: TopkOptions;
}

const biasOf = (E: number): FloatTensor => ({
  data: Float32Array.from({ length: E }, (_, i) => 0.01 * Math.sin(i)),
  shape: [E],
  dtype: "float32",
});

// DeepSeek-V3's router options: the dsv3 case and decode (16 tokens) share them
const DSV3_OPTIONS: TopkOptions = {
  topk: 8,
  scoreFunction: "sigmoid",
  numGroups: 8,
  groupTopk: 4,
  expertBias: biasOf(256),
  scalingFactor: 2.5,
};

const CASES: Case[] = [
  {
    name: "dsv3",
    T: 8192,
    E: 256,
    options: DSV3_OPTIONS,
  },
  { name: "qwen3", T: 8192, E: 128, options: { topk: 8, scoreFunction: "softmax" } },
  { name: "mixtral", T: 8192, E: 8, options: { topk: 2, scoreFunction: "softmax" } },
  { name: "wide", T: 4096, E: 1024, options: { topk: 32, scoreFunction: "sigmoid" } },
  {
    name: "decode",
    T: 16,
    E: 256,
    options: DSV3_OPTIONS,
  },
];

function arg(name: string): string | undefined {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] : undefined;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? NaN;
}

const iters = Number(arg("--iters") ?? 50);
// untimed calls before each timed run of back-to-back calls: an idle H200
// sits at 345 MHz and needs milliseconds of work to reach its 1980 MHz
const WARMUP = Number(arg("--warmup") ?? 2000);
const backend = await WebGpuBackend.create({ profile: true });
const device = backend.device;
// the general kernels on the same device: the baseline of the specialised forward
const general = await WebGpuBackend.create({ device, profile: true, generalKernels: true });
{
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  const info = adapter?.info;
  console.log(
    `card: ${info?.description || info?.device || "?"} (vendor ${info?.vendor}, architecture ${info?.architecture}); ` +
      `subgroups feature: ${adapter?.features.has("subgroups")}; backend adapter: ${backend.adapterDescription}`,
  );
}

function toGpu(data: Float32Array<ArrayBuffer>, shape: number[]): GpuTensor<"float32"> {
  const buffer = device.createBuffer({
    size: data.byteLength,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST,
  });
  device.queue.writeBuffer(buffer, 0, data);
  return { buffer, shape, dtype: "float32" };
}

// --cases a,b: only the named cases
const only = arg("--cases")?.split(",");
const results: Record<string, Record<string, number>> = {};
for (const c of CASES.filter((c) => only === undefined || only.includes(c.name))) {
  const r = mulberry32(7);
  const x = Float32Array.from({ length: c.T * c.E }, () => 2 * (r() - 0.5) * 3);
  const g = Float32Array.from({ length: c.T * c.E }, () => r() - 0.5);
  const host: FloatTensor = { data: x, shape: [c.T, c.E], dtype: "float32" };
  const gradHost: FloatTensor = { data: g, shape: [c.T, c.E], dtype: "float32" };
  const plan = planTopk(host, c.options);
  const xg = toGpu(x, [c.T, c.E]);
  const gg = toGpu(g, [c.T, c.E]);

  // GPU-resident, precise: REPEAT calls encoded back to back in one pass,
  // timestamps around the pass, divided by REPEAT (per-call GPU time)
  const REPEAT = 100;
  backend.setRepeat(REPEAT, WARMUP);
  const fwdRep: number[] = [];
  const bwdRep: number[] = [];
  for (let i = 0; i < 4; i++) {
    const out = await backend.topkForwardGpu(plan, xg);
    fwdRep.push((await backend.lastGpuTimeNs())! / REPEAT);
    const gout = await backend.topkBackwardGpu(plan, out.payload, gg);
    bwdRep.push((await backend.lastGpuTimeNs())! / REPEAT);
    out.probs.destroy();
    out.intermediate?.destroy();
    out.route.destroy();
    gout.destroy();
  }
  backend.setRepeat(1);
  general.setRepeat(REPEAT, WARMUP);
  const genRep: number[] = [];
  for (let i = 0; i < 4; i++) {
    const out = await general.topkForwardGpu(plan, xg);
    genRep.push((await general.lastGpuTimeNs())! / REPEAT);
    out.probs.destroy();
    out.intermediate?.destroy();
    out.route.destroy();
  }
  general.setRepeat(1);

  // GPU-resident: GPU time (timestamps) of the last call of a burst of
  // back-to-back calls (the GPU stays busy, so its clocks are up), and the
  // burst's wall time per call (throughput, submission included)
  const fwd: number[] = [];
  const bwd: number[] = [];
  const fwdWall: number[] = [];
  const BURST = 20;
  for (let i = 0; i < Math.ceil(iters / 5) + 1; i++) {
    const outs = [];
    const t0 = performance.now();
    for (let b = 0; b < BURST; b++) outs.push(await backend.topkForwardGpu(plan, xg));
    const ns = await backend.lastGpuTimeNs();
    const t1 = performance.now();
    const grads = [];
    for (let b = 0; b < BURST; b++) grads.push(await backend.topkBackwardGpu(plan, outs[b]!.payload, gg));
    const nsb = await backend.lastGpuTimeNs();
    if (i >= 1) {
      fwd.push(ns ?? NaN);
      bwd.push(nsb ?? NaN);
      fwdWall.push((t1 - t0) / BURST);
    }
    for (const o of outs) {
      o.probs.destroy();
      o.intermediate?.destroy();
      o.route.destroy();
    }
    for (const g of grads) g.destroy();
  }
  // host arrays: wall time with upload, one submission and readback
  const hostFwd: number[] = [];
  const hostBwd: number[] = [];
  for (let i = 0; i < Math.min(iters, 20) + 2; i++) {
    const t0 = performance.now();
    const out = await backend.topkForward(plan, host);
    const t1 = performance.now();
    await backend.topkBackward(plan, out.payload, gradHost);
    const t2 = performance.now();
    if (i >= 2) {
      hostFwd.push(t1 - t0);
      hostBwd.push(t2 - t1);
    }
  }
  xg.buffer.destroy();
  gg.buffer.destroy();
  results[c.name] = {
    fwd_gpu_us_per_call_b2b: median(fwdRep.slice(1)) / 1000,
    fwd_general_gpu_us_per_call_b2b: median(genRep.slice(1)) / 1000,
    bwd_gpu_us_per_call_b2b: median(bwdRep.slice(1)) / 1000,
    fwd_gpu_us: median(fwd) / 1000,
    bwd_gpu_us: median(bwd) / 1000,
    fwd_gpu_min_us: Math.min(...fwd) / 1000,
    bwd_gpu_min_us: Math.min(...bwd) / 1000,
    fwd_resident_wall_ms: median(fwdWall),
    fwd_host_wall_ms: median(hostFwd),
    bwd_host_wall_ms: median(hostBwd),
  };
  const f = results[c.name]!;
  console.log(
    `${c.name.padEnd(8)} T=${c.T} E=${c.E} K=${c.options.topk}: back-to-back GPU us/call fwd ${
      f.fwd_gpu_us_per_call_b2b!.toFixed(1)
    } (general kernel ${f.fwd_general_gpu_us_per_call_b2b!.toFixed(1)}) bwd ${
      f.bwd_gpu_us_per_call_b2b!.toFixed(1)
    }; ` +
      `single pass fwd GPU ${f.fwd_gpu_us!.toFixed(1)} us (min ${f.fwd_gpu_min_us!.toFixed(1)}), ` +
      `bwd GPU ${f.bwd_gpu_us!.toFixed(1)} us (min ${f.bwd_gpu_min_us!.toFixed(1)}); wall: resident fwd ${
        f.fwd_resident_wall_ms!.toFixed(3)
      } ms/call in bursts, ` +
      `host fwd ${f.fwd_host_wall_ms!.toFixed(2)} ms, host bwd ${f.bwd_host_wall_ms!.toFixed(2)} ms`,
  );
}
const out = arg("--json");
if (out) Deno.writeTextFileSync(out, JSON.stringify({ adapter: backend.adapterDescription, results }, null, 2));
general.dispose();
backend.dispose();
