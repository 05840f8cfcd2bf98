// Every golden vector through the WebGPU backend, every routing output
// (CI runs it on a software adapter such as llvmpipe: backend forced to "webgpu").
import { goldenSuite } from "./_golden_suite.ts";

const hasGpu = (await navigator.gpu?.requestAdapter()) != null;
goldenSuite("webgpu", { ignore: !hasGpu });
