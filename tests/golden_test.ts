import * as moeRouter from "../mod.ts";
import { listCases, loadCase } from "./_golden.ts";
import { checkGoldenCase, goldenSuite } from "./_golden_suite.ts";

goldenSuite("wasm");

Deno.test("the module-level functions match the golden vectors of each op", async (t) => {
  const names = listCases();
  for (const op of ["topk", "aux_scores", "aux_loss"]) {
    const name = names.find((n) => n.startsWith(`${op}_`));
    if (name === undefined) throw new Error(`no golden case for ${op}`);
    await t.step(name, () => checkGoldenCase(moeRouter, loadCase(name)));
  }
});
