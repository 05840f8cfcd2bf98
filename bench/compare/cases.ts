/**
 * The router shapes of the comparison and their seeded data.
 *
 * @module
 */
import type { TopkOptions } from "../../mod.ts";
import { mulberry32, normals, routableLogits } from "../../tests/_generators.ts";

/** The router options every peer implements: sigmoid or post-softmax (K-way), with the DeepSeek-V3 extras. */
export interface CaseOptions {
  /** Experts chosen per token. */
  topk: number;
  /** sigmoid (normalised over the chosen when K > 1), or softmax over the K chosen logits (post-softmax). */
  scoreFunction: "sigmoid" | "softmax";
  /** Number of contiguous expert groups of the group limit. */
  numGroups?: number;
  /** Groups kept per token. */
  groupTopk?: number;
  /** Factor applied to the chosen values. */
  scalingFactor?: number;
  /** Per-expert selection bias [E] (sigmoid only). */
  expertBias?: Float32Array;
}

/** One row of the comparison. */
export interface Case {
  /** Short id, for `--cases` and the chart. */
  id: string;
  /** What the case is, in words. */
  name: string;
  tokens: number;
  experts: number;
  options: CaseOptions;
}

/** Seeded inputs of one case. */
export interface CaseData {
  /** [T, E] logits whose routing has a margin at every selection boundary (tests/_generators.ts). */
  logits: Float32Array;
  /** [T, E] upstream gradient of probs, for forward+backward. */
  gradProbs: Float32Array;
}

const dsv3 = (bias: Float32Array): CaseOptions => ({
  topk: 8,
  scoreFunction: "sigmoid",
  numGroups: 8,
  groupTopk: 4,
  scalingFactor: 2.5,
  expertBias: bias,
});
const DSV3_BIAS = normals(mulberry32(7), 256, 0.01);

/** The cases, in table order; the first is the one the targets are stated for. */
export const CASES: readonly Case[] = [
  {
    id: "dsv3",
    name: "DeepSeek-V3 8192x256 top-8 sigmoid, 8 groups top-4, bias, scale 2.5",
    tokens: 8192,
    experts: 256,
    options: dsv3(DSV3_BIAS),
  },
  {
    id: "dsv3-nogroup",
    name: "DeepSeek-V3 without groups 8192x256 top-8 sigmoid, bias, scale 2.5",
    tokens: 8192,
    experts: 256,
    options: {
      topk: 8,
      scoreFunction: "sigmoid",
      scalingFactor: 2.5,
      expertBias: DSV3_BIAS,
    },
  },
  {
    id: "qwen3",
    name: "Qwen3 8192x128 top-8 softmax",
    tokens: 8192,
    experts: 128,
    options: { topk: 8, scoreFunction: "softmax" },
  },
  {
    id: "mixtral",
    name: "Mixtral 8192x8 top-2 softmax",
    tokens: 8192,
    experts: 8,
    options: { topk: 2, scoreFunction: "softmax" },
  },
  {
    id: "wide",
    name: "wide 4096x1024 top-32 sigmoid",
    tokens: 4096,
    experts: 1024,
    options: { topk: 32, scoreFunction: "sigmoid" },
  },
  {
    id: "decode",
    name: "decode 16x256, DeepSeek-V3 options",
    tokens: 16,
    experts: 256,
    options: dsv3(DSV3_BIAS),
  },
];

/** Seeded logits (unambiguous routing) and a gradient for `c`. */
export function caseData(c: Case, seed = 1): CaseData {
  const rng = mulberry32(seed);
  return {
    logits: routableLogits(rng, c.tokens, c.experts, c.options),
    gradProbs: normals(mulberry32(seed + 1000), c.tokens * c.experts),
  };
}

/** The moe-router options of a case, asking for dense int32 indices (what every peer returns). */
export function routerOptions(c: Case): TopkOptions {
  const { expertBias, ...rest } = c.options;
  const options: TopkOptions = { ...rest, indexDtype: "int32" };
  if (expertBias) {
    options.expertBias = {
      data: expertBias,
      shape: [c.experts],
      dtype: "float32",
    };
  }
  return options;
}
