/**
 * Loads the golden cases (expected outputs made by an independent PyTorch
 * reference): from `../shared/golden` beside the repository when it exists,
 * else from the in-repo subset `tests/fixtures/golden/`.
 *
 * @module
 */

import { parseNpy } from "../_npy.ts";
import type { DType, FloatTensor, IndexDType, ScoreFunction, Tensor, TopkOptions } from "../_types.ts";

/** The full public set, next to the repository. */
const SHARED_DIR = new URL("../../shared/golden/", import.meta.url);
/** The subset committed with the repository. */
const FIXTURE_DIR = new URL("./fixtures/golden/", import.meta.url);

/** Parameters common to every case.json. */
interface CaseCommon {
  name: string;
  num_tokens: number;
  num_experts: number;
  topk: number;
  dtype: "float32" | "float16";
  atol: number;
  rtol: number;
  seed: number;
}

/** case.json of a top-k router case. */
export interface TopkCaseJson extends CaseCommon {
  op: "topk";
  score_function: ScoreFunction;
  use_pre_softmax: boolean;
  num_groups: number | null;
  group_topk: number | null;
  /** null means 1. */
  scaling_factor: number | null;
  expert_bias: boolean;
  dense_index_dtype: IndexDType;
}

/** case.json of an aux-scores case. */
export interface AuxScoresCaseJson extends CaseCommon {
  op: "aux_scores";
  score_function: ScoreFunction;
}

/** case.json of an aux-loss case. */
export interface AuxLossCaseJson extends CaseCommon {
  op: "aux_loss";
  num_cols: number;
  total_num_tokens: number;
  coeff: number;
  grad_aux_loss: number;
  tokens_per_expert_dtype: "int32" | "int64" | "float32";
}

/** A loaded top-k case: its parameters and tensors. */
export interface TopkCase extends TopkCaseJson {
  inputs: { logits: FloatTensor; grad_probs: FloatTensor; expert_bias?: Tensor<"float32"> };
  expected: {
    probs: FloatTensor;
    routing_map: Tensor<"uint8">;
    topk_set: Tensor<"int32">;
    intermediate: Tensor<"float32">;
    grad_logits: FloatTensor;
  };
}

/** A loaded aux-scores case. */
export interface AuxScoresCase extends AuxScoresCaseJson {
  inputs: { logits: FloatTensor; grad_scores: FloatTensor };
  expected: {
    scores: Tensor<"float32">;
    routing_map: Tensor<"uint8">;
    topk_set: Tensor<"int32">;
    grad_logits: FloatTensor;
  };
}

/** A loaded aux-loss case. */
export interface AuxLossCase extends AuxLossCaseJson {
  inputs: { probs: FloatTensor; tokens_per_expert: Tensor<"int32" | "int64" | "float32"> };
  expected: { aux_loss: Tensor<"float32">; grad_probs: Tensor<"float32"> };
}

/** Any loaded golden case, told apart by `op`. */
export type GoldenCase = TopkCase | AuxScoresCase | AuxLossCase;

function exists(url: URL): boolean {
  try {
    Deno.statSync(url);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** Environment variable that points the tests at another golden folder (e.g. `tests/fixtures/golden`). */
const DIR_VARIABLE = "MOE_ROUTER_GOLDEN_DIR";

/**
 * The folder the golden cases are read from: `$MOE_ROUTER_GOLDEN_DIR` when
 * set (relative to the working directory), else `../shared/golden/` when
 * present, else `tests/fixtures/golden/`.
 */
export function goldenDir(): URL {
  const granted = Deno.permissions.querySync({ name: "env", variable: DIR_VARIABLE }).state === "granted";
  const override = granted ? Deno.env.get(DIR_VARIABLE) : undefined;
  if (override) return new URL(override.endsWith("/") ? override : `${override}/`, `file://${Deno.cwd()}/`);
  return exists(SHARED_DIR) ? SHARED_DIR : FIXTURE_DIR;
}

/** Names of the golden cases: from manifest.json when present, else the case folders, sorted. */
export function listCases(): string[] {
  const dir = goldenDir();
  const manifest = new URL("manifest.json", dir);
  if (exists(manifest)) {
    const { cases } = JSON.parse(Deno.readTextFileSync(manifest)) as { cases: { name: string }[] };
    return cases.map((c) => c.name);
  }
  return [...Deno.readDirSync(dir)]
    .filter((entry) => entry.isDirectory && exists(new URL(`${entry.name}/case.json`, dir)))
    .map((entry) => entry.name)
    .sort();
}

/** Reads one .npy file of a case and checks its dtype is one of `dtypes`. */
function readTensor<D extends DType>(caseDir: URL, file: string, dtypes: readonly D[]): Tensor<D> {
  const tensor = parseNpy(Deno.readFileSync(new URL(file, caseDir)));
  if (!(dtypes as readonly DType[]).includes(tensor.dtype)) {
    throw new TypeError(`${caseDir.pathname}${file}: dtype must be ${dtypes.join(" or ")}, got ${tensor.dtype}`);
  }
  return tensor as Tensor<D>;
}

/**
 * Loads one case: the parameters of its case.json, with `inputs` and
 * `expected` holding the parsed tensors instead of file names.
 *
 * @throws {TypeError} When a file has an unexpected dtype or the op is unknown.
 */
export function loadCase(name: string): GoldenCase {
  const dir = new URL(`${name}/`, goldenDir());
  const json = JSON.parse(Deno.readTextFileSync(new URL("case.json", dir))) as
    & (TopkCaseJson | AuxScoresCaseJson | AuxLossCaseJson)
    & { inputs: Record<string, string>; expected: Record<string, string> };
  const file = (files: Record<string, string>, key: string): string => {
    const f = files[key];
    if (f === undefined) throw new TypeError(`${name}/case.json names no file for '${key}'`);
    return f;
  };
  const floats = ["float32", "float16"] as const;
  const { inputs, expected } = json;
  switch (json.op) {
    case "topk": {
      const bias = json.expert_bias ? { expert_bias: readTensor(dir, file(inputs, "expert_bias"), ["float32"]) } : {};
      return {
        ...json,
        inputs: {
          logits: readTensor(dir, file(inputs, "logits"), floats),
          grad_probs: readTensor(dir, file(inputs, "grad_probs"), floats),
          ...bias,
        },
        expected: {
          probs: readTensor(dir, file(expected, "probs"), floats),
          routing_map: readTensor(dir, file(expected, "routing_map"), ["uint8"]),
          topk_set: readTensor(dir, file(expected, "topk_set"), ["int32"]),
          intermediate: readTensor(dir, file(expected, "intermediate"), ["float32"]),
          grad_logits: readTensor(dir, file(expected, "grad_logits"), floats),
        },
      };
    }
    case "aux_scores":
      return {
        ...json,
        inputs: {
          logits: readTensor(dir, file(inputs, "logits"), floats),
          grad_scores: readTensor(dir, file(inputs, "grad_scores"), floats),
        },
        expected: {
          scores: readTensor(dir, file(expected, "scores"), ["float32"]),
          routing_map: readTensor(dir, file(expected, "routing_map"), ["uint8"]),
          topk_set: readTensor(dir, file(expected, "topk_set"), ["int32"]),
          grad_logits: readTensor(dir, file(expected, "grad_logits"), floats),
        },
      };
    case "aux_loss":
      return {
        ...json,
        inputs: {
          probs: readTensor(dir, file(inputs, "probs"), floats),
          tokens_per_expert: readTensor(dir, file(inputs, "tokens_per_expert"), ["int32", "int64", "float32"]),
        },
        expected: {
          aux_loss: readTensor(dir, file(expected, "aux_loss"), ["float32"]),
          grad_probs: readTensor(dir, file(expected, "grad_probs"), ["float32"]),
        },
      };
    default:
      throw new TypeError(
        `${name}/case.json: op must be topk, aux_scores or aux_loss, got ${(json as { op: unknown }).op}`,
      );
  }
}

/** The library options of a top-k case (without any output layout choice). */
export function topkOptionsOf(c: TopkCase): TopkOptions {
  const options: TopkOptions = { topk: c.topk, scoreFunction: c.score_function, usePreSoftmax: c.use_pre_softmax };
  if (c.num_groups !== null) options.numGroups = c.num_groups;
  if (c.group_topk !== null) options.groupTopk = c.group_topk;
  if (c.scaling_factor !== null) options.scalingFactor = c.scaling_factor;
  if (c.inputs.expert_bias !== undefined) options.expertBias = c.inputs.expert_bias;
  return options;
}
