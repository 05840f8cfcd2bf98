/**
 * The router as an ONNX graph, encoded by hand: a tiny protobuf writer and
 * the few ONNX messages it needs (ModelProto, GraphProto, NodeProto,
 * AttributeProto, TensorProto, ValueInfoProto), so that the comparison needs
 * no python and no onnx package. Field numbers are those of onnx/onnx.proto.
 *
 * @module
 */
import type { CaseOptions } from "./cases.ts";

// ---------------------------------------------------------------------------
// Protobuf wire format: varints, length-delimited fields, fixed32 floats

const VARINT = 0;
const FIXED32 = 5;
const LEN = 2;

/** Appends protobuf fields to a growing byte list. */
class Writer {
  readonly bytes: number[] = [];

  #varint(v: bigint | number): void {
    // negative int64 values are written as their 64-bit two's complement (10 bytes)
    let x = BigInt.asUintN(64, BigInt(v));
    while (x >= 0x80n) {
      this.bytes.push(Number(x & 0x7fn) | 0x80);
      x >>= 7n;
    }
    this.bytes.push(Number(x));
  }

  #tag(field: number, wire: number): void {
    this.#varint((field << 3) | wire);
  }

  int(field: number, v: number | bigint): this {
    this.#tag(field, VARINT);
    this.#varint(v);
    return this;
  }

  float(field: number, v: number): this {
    this.#tag(field, FIXED32);
    this.bytes.push(...new Uint8Array(new Float32Array([v]).buffer));
    return this;
  }

  raw(field: number, data: Uint8Array | number[]): this {
    this.#tag(field, LEN);
    this.#varint(data.length);
    for (const b of data) this.bytes.push(b);
    return this;
  }

  string(field: number, s: string): this {
    return this.raw(field, new TextEncoder().encode(s));
  }

  message(field: number, m: Writer): this {
    return this.raw(field, m.bytes);
  }
}

// ---------------------------------------------------------------------------
// ONNX messages

/** TensorProto.DataType codes used here. */
const DATA_TYPE = { float: 1, int64: 7 } as const;
type ElemType = keyof typeof DATA_TYPE;

/** TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian). */
function tensorProto(name: string, type: ElemType, dims: readonly number[], values: readonly number[]): Writer {
  const w = new Writer();
  for (const d of dims) w.int(1, d);
  w.int(2, DATA_TYPE[type]);
  if (name) w.string(8, name);
  const raw = type === "float"
    ? new Uint8Array(Float32Array.from(values).buffer)
    : new Uint8Array(BigInt64Array.from(values, (v) => BigInt(v)).buffer);
  return w.raw(9, raw);
}

/** An attribute value: an int, a float, or a one-element tensor. */
type AttrValue = { i: number } | { f: number } | { t: Writer };

/** AttributeProto: name (1), f (2), i (3), t (5), type (20: FLOAT 1, INT 2, TENSOR 4). */
function attribute(name: string, value: AttrValue): Writer {
  const w = new Writer().string(1, name);
  if ("f" in value) return w.float(2, value.f).int(20, 1);
  if ("i" in value) return w.int(3, value.i).int(20, 2);
  return w.message(5, value.t).int(20, 4);
}

/** ValueInfoProto: name (1), type (2) = TypeProto { tensor_type (1) { elem_type (1), shape (2) } }. */
function valueInfo(name: string, type: ElemType, dims: readonly (number | string)[]): Writer {
  const shape = new Writer();
  for (const d of dims) {
    // TensorShapeProto.Dimension: dim_value (1) or dim_param (2)
    shape.message(1, typeof d === "number" ? new Writer().int(1, d) : new Writer().string(2, d));
  }
  const tensorType = new Writer().int(1, DATA_TYPE[type]).message(2, shape);
  return new Writer().string(1, name).message(2, new Writer().message(1, tensorType));
}

/** Collects the nodes and constants of one graph. */
class GraphBuilder {
  readonly nodes: Writer[] = [];
  readonly initializers: Writer[] = [];
  #count = 0;

  /** Adds a node; returns the names of its outputs (`outputs` of them, or the names given). */
  node(op: string, inputs: string[], attrs: Record<string, AttrValue> = {}, outputs: number | string[] = 1): string[] {
    const outs = typeof outputs === "number"
      ? Array.from({ length: outputs }, (_, i) => `${op.toLowerCase()}_${this.#count}_${i}`)
      : outputs;
    // NodeProto: input (1), output (2), name (3), op_type (4), attribute (5)
    const w = new Writer();
    for (const i of inputs) w.string(1, i);
    for (const o of outs) w.string(2, o);
    w.string(3, `${op}_${this.#count++}`).string(4, op);
    for (const [name, value] of Object.entries(attrs)) {
      w.message(5, attribute(name, value));
    }
    this.nodes.push(w);
    return outs;
  }

  /** Adds a node with one output and returns its name. */
  op(op: string, inputs: string[], attrs: Record<string, AttrValue> = {}): string {
    return this.node(op, inputs, attrs)[0] as string;
  }

  /** Adds a constant (an initializer) and returns its name. */
  constant(name: string, type: ElemType, dims: readonly number[], values: readonly number[]): string {
    this.initializers.push(tensorProto(name, type, dims, values));
    return name;
  }

  /** A tensor of the shape of `like`, filled with one float value. */
  filled(like: string, value: number): string {
    const shape = this.op("Shape", [like]);
    return this.op("ConstantOfShape", [shape], {
      value: { t: tensorProto("", "float", [1], [value]) },
    });
  }
}

/** Names of the graph's input and outputs. */
export const NAMES = {
  logits: "logits",
  probs: "probs",
  indices: "indices",
} as const;

/** What the ONNX graph computes: the options of one comparison case. */
export interface OnnxRouterSpec {
  experts: number;
  options: CaseOptions;
}

/**
 * The router forward as an ONNX model (opset 17): input `logits [T, E]`
 * (T symbolic), outputs `probs [T, E]` float and `indices [T, K]` int64.
 *
 * sigmoid: Sigmoid, Add bias; with groups, Reshape to [T, G, E/G], TopK of
 * K/GK per group, ReduceSum, TopK of GK groups, ScatterElements of 0 into a
 * -inf [T, G] tensor, Add it (broadcast) to the selection scores; TopK K,
 * GatherElements of the unbiased scores, ReduceSum, Add 1e-20, Div, Mul by
 * the scale, ScatterElements into zeros. softmax (post): TopK of the logits,
 * Softmax over the K, Mul, ScatterElements.
 */
export function buildRouterModel(spec: OnnxRouterSpec): Uint8Array {
  const { experts: E, options: o } = spec;
  const K = o.topk;
  const scale = o.scalingFactor ?? 1;
  const g = new GraphBuilder();
  const kTensor = (name: string, k: number) => g.constant(name, "int64", [1], [k]);
  let axisConstant: string | undefined; // [-1], added on first use (ONNX Runtime warns about unused constants)
  const lastAxis = () => axisConstant ??= g.constant("last_axis", "int64", [1], [-1]);
  const logits = NAMES.logits;

  let values: string; // [T, K] the values of the chosen experts, before the scale
  let indices: string; // [T, K] int64
  if (o.scoreFunction === "sigmoid") {
    const s = g.op("Sigmoid", [logits]);
    let r = o.expertBias ? g.op("Add", [s, g.constant("expert_bias", "float", [E], [...o.expertBias])]) : s;
    if (o.numGroups !== undefined && o.groupTopk !== undefined) {
      const G = o.numGroups;
      const GK = o.groupTopk;
      const grouped = g.op("Reshape", [r, g.constant("grouped_shape", "int64", [3], [-1, G, E / G])]);
      const [top] = g.node("TopK", [grouped, kTensor("k_per_group", K / GK)], {
        axis: { i: -1 },
      }, 2);
      const groupScores = g.op("ReduceSum", [top as string, lastAxis()], {
        keepdims: { i: 0 },
      });
      const [, keptGroups] = g.node("TopK", [groupScores, kTensor("k_groups", GK)], { axis: { i: -1 } }, 2);
      // 0 on the kept groups, -inf elsewhere; added to every expert of the group
      const penalty = g.op("ScatterElements", [
        g.filled(groupScores, -Infinity),
        keptGroups as string,
        g.filled(keptGroups as string, 0),
      ], { axis: { i: 1 } });
      const penalty3 = g.op("Unsqueeze", [penalty, lastAxis()]);
      const masked = g.op("Add", [grouped, penalty3]);
      r = g.op("Reshape", [masked, g.constant("flat_shape", "int64", [2], [-1, E])]);
    }
    indices = g.node("TopK", [r, kTensor("k", K)], { axis: { i: -1 } }, ["top_values", NAMES.indices])[1] as string;
    const v = g.op("GatherElements", [s, indices], { axis: { i: 1 } });
    if (K > 1) {
      const sum = g.op("ReduceSum", [v, lastAxis()], { keepdims: { i: 1 } });
      const den = g.op("Add", [sum, g.constant("eps", "float", [], [1e-20])]);
      values = g.op("Div", [v, den]);
    } else {
      values = v;
    }
  } else {
    // softmax after the selection: over the K chosen logits
    const top = "top_values";
    indices = g.node("TopK", [logits, kTensor("k", K)], { axis: { i: -1 } }, [top, NAMES.indices])[1] as string;
    values = g.op("Softmax", [top], { axis: { i: -1 } });
  }
  const scaled = scale === 1 ? values : g.op("Mul", [values, g.constant("scale", "float", [], [scale])]);
  g.node("ScatterElements", [g.filled(logits, 0), indices, scaled], {
    axis: { i: 1 },
  }, [NAMES.probs]);

  // GraphProto: node (1), name (2), initializer (5), input (11), output (12)
  const graph = new Writer();
  for (const n of g.nodes) graph.message(1, n);
  graph.string(2, "moe_router");
  for (const t of g.initializers) graph.message(5, t);
  graph.message(11, valueInfo(logits, "float", ["T", E]));
  graph.message(12, valueInfo(NAMES.probs, "float", ["T", E]));
  graph.message(12, valueInfo(NAMES.indices, "int64", ["T", K]));

  // ModelProto: ir_version (1), producer_name (2), graph (7), opset_import (8) { domain (1), version (2) }
  const model = new Writer().int(1, 8).string(2, "moe-router bench/compare")
    .message(7, graph);
  model.message(8, new Writer().string(1, "").int(2, 17));
  return new Uint8Array(model.bytes);
}
