// Shader compile time per pipeline variant on this adapter (the GPU tests
// compile one pipeline per variant they use):
//
//   deno run -A bench/_wgsl_compile_time.ts [substring of a key]
import { buildShader } from "../gpu/_shader.ts";
import { backwardKernel, type BackwardKey, forwardKernel, type ForwardKey } from "../gpu/_topk_kernels.ts";
import { auxLossKernel } from "../gpu/_aux_loss_kernels.ts";
const adapter = (await navigator.gpu.requestAdapter())!;
const device = await adapter.requestDevice({
  requiredLimits: { maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize },
});
const only = Deno.args[0];
const keys: (ForwardKey | BackwardKey)[] = [];
for (const op of ["topk", "aux"] as const) {
  for (
    const [score, pre] of [["softmax", false], ["softmax", true], ["sigmoid", false], ["sqrtsoftplus", false]] as const
  ) {
    if (op === "aux" && pre) continue;
    for (const radix of [false, true]) {
      for (const grouped of [false, true]) {
        if (op === "aux" && grouped) continue;
        for (const shared of [false, true]) {
          keys.push({ kernel: "forward", op, score, pre, radix, grouped, shared, scr: 2048 });
        }
      }
    }
    for (const shared of [false, true]) keys.push({ kernel: "backward", op, score, pre, shared, scr: 256 });
  }
}
let total = 0;
for (const k of keys) {
  if (only && !JSON.stringify(k).includes(only)) continue;
  const src = k.kernel === "forward" ? forwardKernel(k) : backwardKernel(k);
  const code = buildShader(src);
  if (Deno.env.get("DUMP")) console.log(code);
  device.pushErrorScope("validation");
  const t0 = performance.now();
  const module = device.createShaderModule({ code });
  const info = await module.getCompilationInfo();
  for (const m of info.messages) console.log(m.type, m.lineNum, m.message);
  const p = device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: "main" } });
  const err = await device.popErrorScope();
  const dt = performance.now() - t0;
  total += dt;
  console.log(`${(dt / 1000).toFixed(2)} s  ${JSON.stringify(k)}${err ? " ERROR " + err.message : ""}`);
  void p;
}
for (const kernel of ["auxColsum", "auxFinish", "auxBackward"] as const) {
  const t0 = performance.now();
  const module = device.createShaderModule({ code: buildShader(auxLossKernel({ kernel, dtype: "float32" })) });
  device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: "main" } });
  const dt = performance.now() - t0;
  total += dt;
  console.log(`${(dt / 1000).toFixed(2)} s  ${kernel}`);
}
console.log(`total ${(total / 1000).toFixed(1)} s`);
