// The specialised top-k forward ("row-team" kernel) for the common router
// shapes: naive selection of K <= 16 experts out of rows whose length is a
// multiple of 4 (DeepSeek-V3, Qwen3, Mixtral, decode ...). Sizes are WGSL
// constants here, so that every per-lane list lives in registers and loops
// have fixed trip counts; the general kernel (_topk_kernels.ts) serves every
// other shape, with the same ordering and the same maths.
//
// Why it is faster: the general kernel runs K rounds of team-wide arg-max,
// two barriers each, and re-reads keys from workgroup memory; its latency
// per row is what bounds it on a real GPU. Here a team of TPR lanes (a power
// of two, at most 16, for about 16 experts a lane) owns a row; lane l owns
// the contiguous chunk of C = E / TPR experts from l * C, loads it up front,
// and keeps the keys and its own sorted top-K list in registers
// (straight-line code: one insertion per expert). One barrier later every
// lane of the row merges the TPR lists (K picks of the best head, read from
// workgroup memory laid out so that no two lanes of a warp hit one bank) and
// so holds the row's result without a broadcast. The routing output is
// assembled in workgroup memory and copied out as whole words (no atomics on
// storage, although neighbouring rows may share words).
//
// For K at or above the radix threshold (up to 64, no groups) the lanes
// instead find the K-th largest key with 8-bit histogram passes in workgroup
// memory, then write their picks to slots counted from the lanes before them
// (index order, no atomics), rank the K picks once, and each lane writes the
// probs of its own experts: no lane holds the whole top-K list or
// recomputes scores of other lanes' experts. On an H200 that tail took the
// wide case (E = 1024, K = 32) from 108.9 us to 82.2 us a call.
//
// Ordering is the CPU's: keys (order-preserving u32 images of the selection
// scores, NaN lowest, -0 as +0) descending, ties to the lower index.
import type { FloatDType, ScoreFunction } from "../_types.ts";
import { routeRowBytes, type TopkPlan } from "../_validate.ts";
import { MATH_WGSL } from "./_math.ts";
import type { KernelSource, StorageBinding } from "./_shader.ts";

/** What a fast forward pipeline is specialised on; also its cache key. */
export interface FastForwardKey {
  kernel: "fast-forward";
  /** Radix selection (K >= the radix threshold) instead of per-lane lists and a merge. */
  radix: boolean;
  score: ScoreFunction;
  pre: boolean;
  E: number;
  K: number;
  /** Lanes per row. */
  tpr: number;
  /** Threads per workgroup. */
  wg: number;
  /** Groups and kept groups; 0 without the group limit. */
  G: number;
  GK: number;
  dt: FloatDType;
  /** The bias dtype, or null without a bias. */
  bias: FloatDType | null;
}
// The routing output's format is a uniform (fmt, with its row bytes rb), not
// a specialisation: the staging area is sized for the largest format.

/** Largest K the fast kernel unrolls. */
const FAST_MAX_K = 16;
/**
 * Experts a lane owns where the row allows: on an H200, Qwen3's forward
 * (E = 128) took 15.3 us with 16 experts a lane against 22.0 us with 32
 * (more lanes hide more latency; the merge grows with the lanes); on an
 * H100, 8 a lane took 23.5 us against 15.2 us with 16.
 */
const FAST_CHUNK = 16;
/** Largest K of the radix path (the picks are ranked in workgroup memory). */
const FAST_MAX_RADIX_K = 64;
/**
 * Most lanes per row of the radix path. On an H200 the wide case (E = 1024,
 * K = 32) took 82.2 us with 32 lanes a row and 83.4 us with 64.
 */
const FAST_MAX_RADIX_TPR = 32;
/** Most lanes per row (each merge step scans one head per lane). */
const FAST_MAX_TPR = 16;
/** Most experts one lane owns. */
const FAST_MAX_CHUNK = 64;
/** Workgroup memory the fast kernel may use (WebGPU's default limit). */
const FAST_MAX_WG_BYTES = 16384;

/** Bytes of workgroup memory a fast kernel of `k` declares. */
function workgroupBytes(k: FastForwardKey): number {
  const rpw = k.wg / k.tpr;
  // radix: two 256-bin histograms, three counts per lane, the picks (key, index, value) and the ranked values
  // naive: the lanes' lists, and the picks' values
  const slots = k.radix ? rpw * (512 + 3 * k.tpr + 4 * k.K) : k.tpr > 1 ? k.wg * 2 * k.K + rpw * k.K : 0;
  const red = k.pre ? k.wg : 0;
  // groups: their scores, and the lanes' shares of a group they split
  const groups = k.G > 0 ? rpw * k.G + (k.tpr > k.G ? k.wg * (k.K / k.GK) : 0) : 0;
  return 4 * (slots + red + groups + stagingWords(k));
}

/** Words of the routing-output staging area: one workgroup's rows in the largest format (bytemap or int64). */
function stagingWords(k: FastForwardKey): number {
  return Math.ceil(((k.wg / k.tpr) * Math.max(k.E, 8 * k.K)) / 4);
}

/**
 * The fast kernel's key for a top-k forward plan, or null where the shape
 * needs the general kernel (K > 16 naive or > 64 radix, E not a multiple of
 * 4, groups that do not split evenly over the lanes, radix with groups, ...).
 */
export function fastForwardKey(plan: TopkPlan): FastForwardKey | null {
  const { E, K } = plan;
  const radix = K >= plan.radixThreshold;
  const grouped = plan.groupTopk > 0;
  if (E % 4 !== 0 || K > (radix ? FAST_MAX_RADIX_K : FAST_MAX_K) || (radix && grouped)) return null;
  let tpr = 1;
  if (radix) {
    // as many lanes as the row splits into (up to 32): a row's histograms take the
    // same memory whatever its lanes, so more lanes means fewer rows a workgroup
    while (tpr < FAST_MAX_RADIX_TPR && E % (8 * tpr) === 0) tpr *= 2;
  } else {
    while (E / tpr > FAST_CHUNK && tpr < FAST_MAX_TPR) tpr *= 2;
  }
  if (grouped) {
    const G = plan.numGroups;
    // lanes own whole groups (tpr divides G), or a group's lanes share it (G divides tpr)
    while (tpr > 1 && G % tpr !== 0 && tpr % G !== 0) tpr /= 2;
    const gsize = E / G;
    if (gsize % 4 !== 0 || K / plan.groupTopk > 8) return null;
  }
  const C = E / tpr;
  if (!Number.isInteger(C) || C % 4 !== 0 || C > FAST_MAX_CHUNK) return null;
  const rB = routeRowBytes(plan.route, E, K);
  // the largest workgroup (of 128, 64, 32 threads) whose rows fit the workgroup memory
  for (const wg of radix ? [128, 64, 32] : [K <= 8 ? 128 : 64]) {
    const key: FastForwardKey = {
      kernel: "fast-forward",
      radix,
      score: plan.score,
      pre: plan.pre,
      E,
      K,
      tpr,
      wg,
      G: grouped ? plan.numGroups : 0,
      GK: grouped ? plan.groupTopk : 0,
      dt: plan.dtype,
      bias: plan.bias !== null ? "float32" : plan.biasGpu !== null ? plan.biasGpu.dtype : null,
    };
    if (wg < tpr || ((wg / tpr) * rB) % 4 !== 0 || workgroupBytes(key) > FAST_MAX_WG_BYTES) continue;
    return key;
  }
  return null;
}

/** Rows one workgroup of a fast kernel routes. */
export function fastRowsPerWorkgroup(k: FastForwardKey): number {
  return k.wg / k.tpr;
}

// WGSL for 0..n-1 joined by `sep`
function each(n: number, f: (i: number) => string, sep = "\n"): string {
  return Array.from({ length: n }, (_, i) => f(i)).join(sep);
}

/** Element type of a float buffer read or written a quad (4 experts) at a time. */
function quadElem(dt: FloatDType): string {
  return dt === "float32" ? "vec4<u32>" : "vec2<u32>";
}

// WGSL of `load(q)`, the quad q of buffer `src` widened to f32, and of
// `store(q, v)`, v narrowed into quad q of buffer `dst` (16-bit dtypes by bit
// manipulation, rounding as on the CPU)
function quadFns(dt: FloatDType, load: string, src: string, store: string, dst: string): string {
  if (dt === "float32") {
    return `fn ${load}(q: u32) -> vec4<f32> { return bitcast<vec4<f32>>(${src}[q]); }
fn ${store}(q: u32, v: vec4<f32>) { ${dst}[q] = bitcast<vec4<u32>>(v); }`;
  }
  const widen = (h: string) => dt === "float16" ? `f16ToF32(${h})` : `bitcast<f32>((${h}) << 16u)`;
  const narrow = (v: string) => dt === "float16" ? `f32ToF16(${v})` : `f32ToBf16(${v})`;
  return `fn ${load}(q: u32) -> vec4<f32> {
  let w = ${src}[q];
  return vec4<f32>(${widen("w.x & 0xffffu")}, ${widen("w.x >> 16u")}, ${widen("w.y & 0xffffu")}, ${
    widen("w.y >> 16u")
  });
}
fn ${store}(q: u32, v: vec4<f32>) {
  ${dst}[q] = vec2<u32>(${narrow("v.x")} | (${narrow("v.y")} << 16u), ${narrow("v.z")} | (${narrow("v.w")} << 16u));
}`;
}

// WGSL constants of a specialised kernel
function constsOf(values: Record<string, number>): string {
  return `const NONE: u32 = 0xffffffffu;\n${
    Object.entries(values).map(([n, v]) => `const ${n}: u32 = ${v}u;`).join("\n")
  }`;
}

// A specialised kernel's source: sizes are constants, so the only uniforms
// are the dispatch's rows, the scaling factor and the routing output's format
// and row bytes.
function fastKernel(
  k: FastForwardKey | FastBackwardKey,
  storage: StorageBinding[],
  helpers: string,
  body: string,
  workgroupSize: number,
): KernelSource {
  return {
    label: `moe-router ${JSON.stringify(k)}`,
    uniforms: [["T", "u32"], ["scale", "f32"], ["fmt", "u32"], ["rb", "u32"]],
    storage,
    consts: {},
    helpers,
    body,
    workgroupSize,
  };
}

/** The fast forward kernel for a key. */
export function fastForwardKernel(k: FastForwardKey): KernelSource {
  const { E, K, tpr: TPR, wg: WG, G, GK, score, pre, dt } = k;
  const C = E / TPR;
  const Q = C / 4;
  const RPW = WG / TPR;
  const SW = stagingWords(k);
  const grouped = G > 0;
  const gsize = grouped ? E / G : 0;
  const lpg = grouped && TPR > G ? TPR / G : 1; // lanes per group (they split it)
  const gpl = grouped && lpg === 1 ? C / gsize : 0; // groups per lane (it owns them)
  const per = grouped ? K / GK : 0;
  const softmax = score === "softmax";
  const post = softmax && !pre;
  const storage: StorageBinding[] = [
    { name: "logits", elem: quadElem(dt), access: "read" },
    { name: "probs", elem: quadElem(dt), access: "read_write" },
    { name: "inter", elem: "vec4<f32>", access: "read_write" },
    { name: "route", elem: "u32", access: "read_write" },
    { name: "bias", elem: "u32", access: "read" },
  ];

  let biasFn = "fn biasAt(e: u32) -> f32 { return 0.0; }";
  if (k.bias === "float32") biasFn = "fn biasAt(e: u32) -> f32 { return bitcast<f32>(bias[e]); }";
  else if (k.bias !== null) {
    const h = "((bias[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu)";
    biasFn = `fn biasAt(e: u32) -> f32 { return ${
      k.bias === "float16" ? `f16ToF32(${h})` : `bitcast<f32>(${h} << 16u)`
    }; }`;
  }

  let helpers = /* wgsl */ `${MATH_WGSL}
${constsOf({ E, K, TPR, C, Q, RPW })}
var<workgroup> rst: array<atomic<u32>, ${SW}>;
${
    TPR > 1 && !k.radix
      ? `var<workgroup> slot: array<u32, ${WG * 2 * K}>;
var<workgroup> rv: array<f32, ${RPW * K}>;`
      : ""
  }
${
    k.radix
      ? `var<workgroup> hist: array<atomic<u32>, ${RPW * 512}>;
var<workgroup> csum: array<u32, ${RPW * TPR}>;
var<workgroup> eqc: array<u32, ${RPW * TPR}>;
var<workgroup> gtc: array<u32, ${RPW * TPR}>;
var<workgroup> pk: array<u32, ${RPW * K}>;
var<workgroup> px: array<u32, ${RPW * K}>;
var<workgroup> pv: array<f32, ${RPW * K}>;
var<workgroup> rv: array<f32, ${RPW * K}>;`
      : ""
  }
${grouped ? `var<workgroup> gsc: array<u32, ${RPW * G}>;` : ""}
${lpg > 1 ? `var<workgroup> gpart: array<u32, ${WG * per}>;` : ""}
${pre ? `var<workgroup> red: array<f32, ${WG}>;` : ""}

// quadX(q): the four logits of quad q (experts 4q .. 4q + 3 of the batch), widened; storeProbs(q, v)
${quadFns(dt, "quadX", "logits", "storeProbs", "probs")}
fn xAt(i: u32) -> f32 { return quadX(i >> 2u)[i & 3u]; }
${biasFn}
// does (ak, ai) rank above (bk, bi)? key descending, then index ascending
fn beats(ak: u32, ai: u32, bk: u32, bi: u32) -> bool { return ak > bk || (ak == bk && ai < bi); }
${
    pre
      ? `
// max / sum of v over the lanes of a team, in lane order (the same on every lane)
fn teamMax(v: f32, li: u32, lane: u32) -> f32 {
  workgroupBarrier();
  red[li] = v;
  workgroupBarrier();
  var acc = red[li - lane];
  for (var i = 1u; i < TPR; i = i + 1u) { acc = max(acc, red[li - lane + i]); }
  return acc;
}
fn teamSum(v: f32, li: u32, lane: u32) -> f32 {
  workgroupBarrier();
  red[li] = v;
  workgroupBarrier();
  var acc = red[li - lane];
  for (var i = 1u; i < TPR; i = i + 1u) { acc = acc + red[li - lane + i]; }
  return acc;
}`
      : ""
  }
`;

  // insertion of (key, e) into a sorted list held as an array of (key,
  // index) pairs: an element seen later has a higher index, so it goes above
  // an equal key only if strictly greater; the list keeps (key desc, index
  // asc). A function (inlined by GPU compilers) keeps the shader text short,
  // which software compilers (llvmpipe, SwiftShader) are slow on.
  const insertFn = (name: string, n: number) => {
    const kk = (j: number) => `(*l)[${2 * j}]`;
    const xx = (j: number) => `(*l)[${2 * j + 1}]`;
    return `fn ${name}(l: ptr<function, array<u32, ${2 * n}>>, kv: u32, ix: u32) {
  if (kv > ${kk(n - 1)}) {
    ${each(n, (j) => `let c${j} = kv > ${kk(j)};`, " ")}
    ${
      each(
        n,
        (jj) => {
          const j = n - 1 - jj;
          return j === 0
            ? `${kk(0)} = select(${kk(0)}, kv, c0); ${xx(0)} = select(${xx(0)}, ix, c0);`
            : `${kk(j)} = select(select(${kk(j)}, kv, c${j}), ${kk(j - 1)}, c${j - 1}); ${xx(j)} = select(select(${
              xx(j)
            }, ix, c${j}), ${xx(j - 1)}, c${j - 1});`;
        },
        "\n    ",
      )
    }
  }
}`;
  };
  if (!k.radix) helpers += insertFn("insK", K) + "\n" + (grouped && per !== K ? insertFn("insG", per) + "\n" : "");
  const emptyList = (name: string, n: number) =>
    `var ${name}: array<u32, ${2 * n}>; ${each(n, (j) => `${name}[${2 * j + 1}] = NONE;`, " ")}`;

  let body = /* wgsl */ `
  let row = li / TPR;
  let lane = li % TPR;
  let t = wg * RPW + row;
  let live = t < P.T;
  let q0 = t * (E / 4u) + lane * Q; // the lane's first quad
  let e0 = lane * C;                 // the lane's first expert
  ${
    k.radix ? "" : `${each(K, (j) => `var k${j} = 0u; var x${j} = NONE;`, " ")}
  ${emptyList("lst", K)}`
  }
`;

  // ---- scores and keys -------------------------------------------------------------
  // Straight-line code over the lane's Q quads (Q is a constant): every load
  // is issued up front, and the keys stay in registers (r<e> for expert e0 + e).
  const scoreOf = score === "sigmoid" ? "msigmoid" : "msqrtsoftplus";
  // the radix path reads a lane's scores (or logits) again after the selection: declared outside the live block
  const bind = (name: string) => k.radix ? `${name} =` : `let ${name} =`;
  const loads = each(Q, (q) => `${bind(`xq${q}`)} quadX(q0 + ${q}u);`, " ");
  // the key of the lane's expert 4q + c from the quad's scores s<q>
  const keyOfQuad = (q: number, c: number) =>
    k.bias !== null ? `keyOf(s${q}[${c}] + biasAt(e0 + ${4 * q + c}u))` : `keyOf(s${q}[${c}])`;
  const keys = each(C, (e) => `r${e} = ${keyOfQuad(e >> 2, e & 3)};`, " ");
  body += `
  ${each(C, (e) => `var r${e} = 0u;`, " ")}
  ${k.radix ? each(Q, (q) => `${pre ? "" : `var xq${q} = vec4<f32>(0.0);`} var s${q} = vec4<f32>(0.0);`, " ") : ""}
`;
  if (post) {
    body += `
  // post softmax: select on the logits
  if (live) {
    ${loads}
    ${each(C, (e) => `r${e} = keyOf(xq${e >> 2}[${e & 3}]);`, " ")}
  }
`;
  } else if (pre) {
    body += `
  // pre softmax: max-subtracted softmax over the row (team max and sum)
  var mx = negInf();
  var zs = 0.0;
  ${each(Q, (q) => `var xq${q} = vec4<f32>(0.0);`, " ")}
  if (live) {
    ${each(Q, (q) => `xq${q} = quadX(q0 + ${q}u);`, " ")}
    ${each(Q, (q) => `mx = max(max(max(mx, xq${q}.x), xq${q}.y), max(xq${q}.z, xq${q}.w));`, " ")}
  }
  let m = teamMax(mx, li, lane);
  if (live) {
    ${each(C, (e) => `zs = zs + mexp(xq${e >> 2}[${e & 3}] - m);`, " ")}
  }
  let z = teamSum(zs, li, lane);
  if (live) {
    ${
      each(
        Q,
        (q) =>
          `${
            bind(`s${q}`)
          } vec4<f32>(mexp(xq${q}.x - m) / z, mexp(xq${q}.y - m) / z, mexp(xq${q}.z - m) / z, mexp(xq${q}.w - m) / z);\n    inter[q0 + ${q}u] = s${q};`,
        "\n    ",
      )
    }
    ${keys}
  }
`;
  } else {
    body += `
  // ${score}: the intermediate keeps ${score === "sigmoid" ? "the scores" : "the logits"}; keys of s + bias
  if (live) {
    ${loads}
    ${
      each(
        Q,
        (q) =>
          `${
            bind(`s${q}`)
          } vec4<f32>(${scoreOf}(xq${q}.x), ${scoreOf}(xq${q}.y), ${scoreOf}(xq${q}.z), ${scoreOf}(xq${q}.w));\n    inter[q0 + ${q}u] = ${
            score === "sigmoid" ? `s${q}` : `xq${q}`
          };`,
        "\n    ",
      )
    }
    ${keys}
  }
`;
  }

  if (!k.radix) {
    // ---- the lane's top-K (within the kept groups) ------------------------------------------
    const insertAll = (from: number, to: number) =>
      each(to - from, (i) => `\n      insK(&lst, r${from + i}, e0 + ${from + i}u);`, "");
    if (!grouped) {
      body += `
  if (live) {${insertAll(0, C)}
  }
`;
    } else {
      // a group's score: the sum of its top \`per\` selection scores, largest first
      const groupScore = (lg: number) =>
        `{
      ${emptyList("glist", per)}
      ${each(gsize, (i) => `${per === K ? "insK" : "insG"}(&glist, r${lg * gsize + i}, ${i}u);`, " ")}
      var sum = 0.0;
      ${each(per, (j) => `sum = sum + floatOfKey(glist[${2 * j}]);`, " ")}
      gsc[gbase + lane * ${gpl}u + ${lg}u] = keyOf(sum);
    }`;
      const keepGroup = (lg: number) =>
        `{
      let g = lane * ${gpl}u + ${lg}u;
      let kg = gsc[gbase + g];
      var above = 0u;
      for (var h = 0u; h < ${G}u; h = h + 1u) {
        let kh = gsc[gbase + h];
        if (kh > kg || (kh == kg && h < g)) { above = above + 1u; }
      }
      if (above < ${GK}u) {${insertAll(lg * gsize, (lg + 1) * gsize)}
      }
    }`;
      const ins = per === K ? "insK" : "insG";
      body += lpg === 1
        ? `
  // group limit: the lane owns ${gpl} whole group(s) of ${gsize}; a group's score
  // is the sum of its top ${per} selection scores, largest first; the ${GK} best
  // groups are kept (ties: lower group)
  let gbase = row * ${G}u;
  if (live) {
    ${each(gpl, groupScore, "\n    ")}
  }
  workgroupBarrier();
  if (live) {
    ${each(gpl, keepGroup, "\n    ")}
  }
`
        : `
  // group limit: ${lpg} lanes share a group of ${gsize}; a group's score is the
  // sum of its top ${per} selection scores, largest first, merged from the
  // lanes' own top ${per}; the ${GK} best groups are kept (ties: lower group)
  let gbase = row * ${G}u;
  {
    ${emptyList("glist", per)}
    ${each(C, (i) => `${ins}(&glist, r${i}, ${i}u);`, " ")}
    ${each(per, (j) => `gpart[li * ${per}u + ${j}u] = glist[${2 * j}];`, " ")}
  }
  workgroupBarrier();
  if (live && lane % ${lpg}u == 0u) {
    ${emptyList("glist", per)}
    ${each(lpg * per, (i) => `${ins}(&glist, gpart[li * ${per}u + ${i}u], ${i}u);`, " ")}
    var sum = 0.0;
    ${each(per, (j) => `sum = sum + floatOfKey(glist[${2 * j}]);`, " ")}
    gsc[gbase + lane / ${lpg}u] = keyOf(sum);
  }
  workgroupBarrier();
  if (live) {
    let g = lane / ${lpg}u;
    let kg = gsc[gbase + g];
    var above = 0u;
    for (var h = 0u; h < ${G}u; h = h + 1u) {
      let kh = gsc[gbase + h];
      if (kh > kg || (kh == kg && h < g)) { above = above + 1u; }
    }
    if (above < ${GK}u) {${insertAll(0, C)}
    }
  }
`;
    }

    body += `
  ${each(K, (j) => `k${j} = lst[${2 * j}]; x${j} = lst[${2 * j + 1}];`, " ")}
`;

    // ---- merge the lanes' lists ------------------------------------------------------
    if (TPR > 1) {
      const heads = each(
        TPR,
        (l) => `var hk${l} = slot[rb + ${l}u]; var hx${l} = slot[rb + ${WG + l}u]; var n${l} = 0u;`,
        "\n  ",
      );
      const pick = (j: number) => `
  {
    var bk = hk0; var bx = hx0; var bl = 0u;
    ${
        each(
          TPR - 1,
          (m) => `if (beats(hk${m + 1}, hx${m + 1}, bk, bx)) { bk = hk${m + 1}; bx = hx${m + 1}; bl = ${m + 1}u; }`,
          "\n    ",
        )
      }
    k${j} = bk; x${j} = bx;${
        j < K - 1
          ? "\n    " + each(
            TPR,
            (l) =>
              `if (bl == ${l}u) { n${l} = n${l} + 1u; hk${l} = slot[rb + ${l}u + ${
                2 * WG
              }u * n${l}]; hx${l} = slot[rb + ${WG + l}u + ${2 * WG}u * n${l}]; }`,
            "\n    ",
          )
          : ""
      }
  }`;
      body += `
  // merge: every lane of the row takes the row's TPR sorted lists from
  // workgroup memory and picks the best head K times (the same result on
  // every lane, so nothing needs to be sent back)
  ${each(K, (j) => `slot[${2 * j * WG}u + li] = k${j}; slot[${(2 * j + 1) * WG}u + li] = x${j};`, " ")}
  workgroupBarrier();
  let rb = li - lane;
  ${heads}
  ${each(K, pick, "")}
`;
    }
  } else {
    // ---- radix selection ------------------------------------------------------------
    const BPL = 256 / TPR; // histogram bins a lane sums and clears
    const PMW = Math.ceil(C / 32); // words of the lane's pick mask
    body += `
  // select (radix): up to four 8-bit passes over the keys find the prefix of
  // the K-th largest key and how many of the keys sharing it to take (need):
  // the lowest indices first, counted lane by lane (lanes own consecutive
  // experts).
  // Histograms are double-buffered: a pass clears the other one's bins.
  let hb0 = row * 512u;
  var prefix = 0u;
  var pmask = 0u;
  var need = K;
  var done = false;
  for (var p = 0u; p < 4u; p = p + 1u) {
    let shift = 24u - 8u * p;
    let hb = hb0 + (p & 1u) * 256u;
    if (live && !done) {
      ${
      each(C, (e) =>
        `if ((r${e} & pmask) == prefix) { atomicAdd(&hist[hb + ((r${e} >> shift) & 255u)], 1u); }`, "\n      ")
    }
    }
    workgroupBarrier();
    var cs = 0u;
    for (var i = 0u; i < ${BPL}u; i = i + 1u) {
      cs = cs + atomicLoad(&hist[hb + lane * ${BPL}u + i]);
      atomicStore(&hist[hb0 + ((p + 1u) & 1u) * 256u + lane * ${BPL}u + i], 0u);
    }
    csum[row * TPR + lane] = cs;
    workgroupBarrier();
    // from the top: the lanes' bin ranges, then the bins of the one holding
    // the need-th key; a bin holding exactly the keys still needed ends the search
    if (!done) {
      var c = TPR - 1u;
      loop {
        let n = csum[row * TPR + c];
        if (n >= need || c == 0u) { break; }
        need = need - n;
        c = c - 1u;
      }
      var bin = c * ${BPL}u + ${BPL - 1}u;
      loop {
        let n = atomicLoad(&hist[hb + bin]);
        if (n >= need || bin == c * ${BPL}u) { break; }
        need = need - n;
        bin = bin - 1u;
      }
      prefix = prefix | (bin << shift);
      pmask = pmask | (255u << shift);
      done = atomicLoad(&hist[hb + bin]) == need;
    }
  }
  // the picks: every key above the prefix, and the first \`need\` keys equal to
  // it (lowest index first). Lane l's picks take slots [off, off + n) in
  // index order, off counted from the lanes before it (no atomics).
  var gt = 0u;
  var eq = 0u;
  ${
      each(
        C,
        (e) =>
          `{ let h = r${e} & pmask; gt = gt + select(0u, 1u, h > prefix); eq = eq + select(0u, 1u, h == prefix); }`,
        "\n  ",
      )
    }
  gtc[row * TPR + lane] = gt;
  eqc[row * TPR + lane] = eq;
  workgroupBarrier();
  var before = 0u;
  var off = 0u;
  for (var i = 0u; i < lane; i = i + 1u) {
    before = before + eqc[row * TPR + i];
    off = off + gtc[row * TPR + i];
  }
  off = off + min(need, before);
  let pb = row * ${K}u;
  ${each(PMW, (w) => `var pm${w} = 0u;`, " ")}
  if (live) {
    var at = off;
    ${
      each(
        C,
        (e) =>
          `{ let h = r${e} & pmask; if (h > prefix || (h == prefix && before < need)) { if (h == prefix) { before = before + 1u; } pk[pb + at] = r${e}; px[pb + at] = e0 + ${e}u; pv[pb + at] = ${
            post ? `xq${e >> 2}[${e & 3}]` : `s${e >> 2}[${e & 3}]`
          }; at = at + 1u; pm${e >> 5} = pm${e >> 5} | ${1 << (e & 31) >>> 0}u; } }`,
        "\n    ",
      )
    }
  }
  workgroupBarrier();
  // rank the picks (key descending; slots are in index order, so ties go to
  // the lower slot): the dense order and the order of the sums
  ${
      post
        ? `// post softmax: m from the best key, not from a logit (the compiler must not fold x - m to 0 where x is inf)
  var mk = 0u;
  for (var j = 0u; j < K; j = j + 1u) { mk = max(mk, pk[pb + j]); }
  let m = floatOfKey(mk);`
        : ""
    }
  for (var i = lane; i < K; i = i + TPR) {
    let ki = pk[pb + i];
    var above = 0u;
    for (var j = 0u; j < K; j = j + 1u) {
      let kj = pk[pb + j];
      above = above + select(0u, 1u, kj > ki || (kj == ki && j < i));
    }
    ${post ? "let v = mexp(pv[pb + i] - m);\n    pv[pb + i] = v;" : "let v = pv[pb + i];"}
    rv[pb + above] = v;
    if (live && P.fmt >= 2u) {
      let xi = px[pb + i];
      let p = row * K + above;
      if (P.fmt == 2u) { atomicOr(&rst[p >> 1u], xi << ((p & 1u) * 16u)); } else if (P.fmt == 3u) { atomicStore(&rst[p], xi); } else { atomicStore(&rst[2u * p], xi); }
    }
  }
  workgroupBarrier();
  // the sum in selection order, as on the naive path
  ${
      pre ? "let zz = 1.0;" : `var zz = 0.0;
  for (var j = 0u; j < K; j = j + 1u) { zz = zz + rv[pb + j]; }${
        post ? "" : K === 1 ? "\n  zz = 1.0;" : "\n  zz = zz + EPS;"
      }`
    }
  // each lane writes its own experts: probs = c * v / z where chosen, 0
  // elsewhere${post ? "; intermediate: the K-way softmax, -inf elsewhere" : ""}; the routing map's bits
  if (live) {
    var at = off;
    ${
      each(
        Q,
        (q) =>
          `{
      var pq = vec4<f32>(0.0);
      ${post ? "var iq = vec4<f32>(negInf());" : ""}
      ${
            each(
              4,
              (c) => {
                const e = 4 * q + c;
                const bit = `(pm${e >> 5} & ${1 << (e & 31) >>> 0}u) != 0u`;
                return `if (${bit}) { let v = pv[pb + at]; at = at + 1u; pq[${c}] = P.scale * (v / zz);${
                  post ? ` iq[${c}] = v / zz;` : ""
                } if (P.fmt == 0u) { let b = row * P.rb + e0 + ${e}u; atomicOr(&rst[b >> 2u], 1u << ((b & 3u) * 8u)); } else if (P.fmt == 1u) { let b = row * P.rb + ((e0 + ${e}u) >> 3u); atomicOr(&rst[b >> 2u], 1u << ((b & 3u) * 8u + ((e0 + ${e}u) & 7u))); } }`;
              },
              "\n      ",
            )
          }
      storeProbs(q0 + ${q}u, pq);
      ${post ? `inter[q0 + ${q}u] = iq;` : ""}
    }`,
        "\n    ",
      )
    }
  }
`;
  }

  if (!k.radix) {
    // ---- values -------------------------------------------------------------------------
    // v(xs): the value of expert xs of the row (post softmax: m from the key,
    // not from the logit: the compiler must not fold x0 - m to 0 where it is inf)
    const valueOf = (xs: string) =>
      post
        ? `mexp(xAt(base + ${xs}) - floatOfKey(k0))`
        : pre
        ? `mexp(xAt(base + ${xs}) - m) / z`
        : `${scoreOf}(xAt(base + ${xs}))`;
    // with several lanes a row, lane l computes the values of picks l, l +
    // TPR, ... (one score each, not K) and shares them in workgroup memory
    const shared = TPR > 1;
    const sharedValues = shared
      ? `${
        each(
          Math.ceil(K / TPR),
          (i) =>
            `{
    let jj = lane + ${i * TPR}u;
    var xs = 0u;
    ${each(K, (j) => `xs = select(xs, x${j}, jj == ${j}u);`, " ")}
    if (live && jj < K) { rv[row * K + jj] = ${valueOf("xs")}; }
  }`,
          "\n  ",
        )
      }
  workgroupBarrier();`
      : "";
    const vals = each(K, (j) => `let v${j} = ${shared ? `rv[row * K + ${j}u]` : valueOf(`x${j}`)};`, " ");
    const values = pre ? `${vals}\n    let zz = 1.0;` : `${vals}
    var zz = 0.0;
    ${each(K, (j) => `zz = zz + v${j};`, " ")}${post ? "" : `\n    zz = zz + EPS;${K === 1 ? "\n    zz = 1.0;" : ""}`}`;

    // ---- writes ---------------------------------------------------------------------------
    // the routing output of the row into the staging area (P.fmt: 0 bytemap,
    // 1 bitmap_u8, 2 int16, 3 int32, 4 int64; P.rb bytes a row)
    const mine = (j: number) => `x${j} >= e0 && x${j} < e0 + C`;
    const routeWrites = `if (P.fmt == 0u) {
      ${
      each(
        K,
        (j) => `if (${mine(j)}) { let b = row * P.rb + x${j}; atomicOr(&rst[b >> 2u], 1u << ((b & 3u) * 8u)); }`,
        "\n      ",
      )
    }
    } else if (P.fmt == 1u) {
      ${
      each(
        K,
        (j) =>
          `if (${
            mine(j)
          }) { let b = row * P.rb + (x${j} >> 3u); atomicOr(&rst[b >> 2u], 1u << ((b & 3u) * 8u + (x${j} & 7u))); }`,
        "\n      ",
      )
    }
    } else if (lane == 0u) {
      ${
      each(
        K,
        (j) =>
          `{ let p = row * K + ${j}u; if (P.fmt == 2u) { atomicOr(&rst[p >> 1u], x${j} << ((p & 1u) * 16u)); } else if (P.fmt == 3u) { atomicStore(&rst[p], x${j}); } else { atomicStore(&rst[2u * p], x${j}); } }`,
        "\n      ",
      )
    }
    }`;

    body += `
  let base = t * E;
  ${sharedValues}
  if (live) {
    ${values}
    // probs = c * v / z at the chosen experts, 0 elsewhere${
      post ? "; intermediate: the K-way softmax, -inf elsewhere" : ""
    }
    ${each(K, (j) => `let p${j} = P.scale * (v${j} / zz);`, " ")}
    ${post ? each(K, (j) => `let y${j} = v${j} / zz;`, " ") : ""}
    for (var q = 0u; q < Q; q = q + 1u) {
      let gq = lane * Q + q;
      var pv = vec4<f32>(0.0);
      ${post ? "var iv = vec4<f32>(negInf());" : ""}
      ${
      each(
        K,
        (j) => `if ((x${j} >> 2u) == gq) { pv[x${j} & 3u] = p${j};${post ? ` iv[x${j} & 3u] = y${j};` : ""} }`,
        "\n      ",
      )
    }
      storeProbs(q0 + q, pv);
      ${post ? "inter[q0 + q] = iv;" : ""}
    }
    ${routeWrites}
  }
`;
  }
  body += `
  workgroupBarrier();
  // the workgroup's routing output, whole words
  let words = (P.T * P.rb + 3u) / 4u;
  let rw = RPW * P.rb / 4u;
  for (var i = li; i < rw; i = i + ${WG}u) {
    let w = wg * rw + i;
    if (w < words) { route[w] = atomicLoad(&rst[i]); }
  }
`;

  return fastKernel(k, storage, helpers, body, WG);
}

/** What a fast backward pipeline is specialised on; also its cache key. */
export interface FastBackwardKey {
  kernel: "fast-backward";
  score: ScoreFunction;
  pre: boolean;
  E: number;
  K: number;
  tpr: number;
  dt: FloatDType;
}

/** Threads per workgroup of the fast backward. */
const FAST_BWD_WG = 128;

/**
 * The fast backward's key for a top-k plan, or null where the general kernel
 * is needed (E not a multiple of 4, chunks over 16 experts).
 */
export function fastBackwardKey(
  plan: Pick<TopkPlan, "E" | "K" | "score" | "pre" | "dtype" | "route">,
): FastBackwardKey | null {
  const { E } = plan;
  if (E % 4 !== 0) return null;
  let tpr = 1;
  while (E / tpr > FAST_CHUNK && tpr < 32) tpr *= 2;
  const C = E / tpr;
  // more than 16 a lane was slower than the general kernel (E = 1024 on an H200: 35 us against 27)
  if (!Number.isInteger(C) || C % 4 !== 0 || C > FAST_CHUNK) return null;
  // (never a condition on the routing format: every format must give the same gradients)
  return { kernel: "fast-backward", score: plan.score, pre: plan.pre, E, K: plan.K, tpr, dt: plan.dtype };
}

/** Rows one workgroup of the fast backward handles. */
export function fastBackwardRowsPerWorkgroup(k: FastBackwardKey): number {
  return FAST_BWD_WG / k.tpr;
}

/**
 * The fast backward kernel: lane l of a row's team owns the contiguous chunk
 * of C = E / TPR experts from l * C; it reads its part of the routing output
 * as a bit mask, sums over its chosen experts in index order, and the team
 * adds the lanes' sums in lane order (so the sums, hence the gradients, are
 * the same for every routing format); then it writes its chunk.
 */
export function fastBackwardKernel(k: FastBackwardKey): KernelSource {
  const { E, K, tpr: TPR, score, pre, dt } = k;
  const WG = FAST_BWD_WG;
  const C = E / TPR;
  const Q = C / 4;
  const RPW = WG / TPR;
  const softmax = score === "softmax";
  const storage: StorageBinding[] = [
    { name: "grad", elem: quadElem(dt), access: "read" },
    { name: "inter", elem: "vec4<f32>", access: "read" },
    { name: "route", elem: "u32", access: "read" },
    { name: "out", elem: quadElem(dt), access: "read_write" },
  ];
  const helpers = /* wgsl */ `${MATH_WGSL}
${constsOf({ E, K, TPR, C, RPW })}
var<workgroup> red: array<vec2<f32>, ${WG}>;
${quadFns(dt, "gradQuad", "grad", "storeOut", "out")}
// the lane's chosen experts as bits (bit i: expert e0 + i) from the routing
// output (P.fmt: 0 bytemap, 1 bitmap_u8, 2 int16, 3 int32, 4 int64)
fn chosenBits(t: u32, e0: u32) -> u32 {
  var bits = 0u;
  if (P.fmt == 0u) {
    let w0 = (t * E + e0) >> 2u;
    for (var i = 0u; i < C / 4u; i = i + 1u) {
      let w = route[w0 + i];
      ${each(4, (b) => `if (((w >> ${8 * b}u) & 255u) != 0u) { bits = bits | (1u << (4u * i + ${b}u)); }`, " ")}
    }
  } else if (P.fmt == 1u) {
    let b = t * P.rb * 8u + e0; // bit offset of the chunk (rows are whole bytes)
    let lo = route[b >> 5u] >> (b & 31u);
    var hi = 0u;
    if ((b & 31u) + C > 32u) { hi = route[(b >> 5u) + 1u] << (32u - (b & 31u)); }
    bits = (lo | hi)${C < 32 ? ` & ${(2 ** C - 1) >>> 0}u` : ""};
  } else {
    for (var j = 0u; j < K; j = j + 1u) {
      let p = t * K + j;
      var e = NONE;
      if (P.fmt == 2u) { e = (route[p >> 1u] >> ((p & 1u) * 16u)) & 0xffffu; }
      else if (P.fmt == 3u) { e = route[p]; }
      else if (route[2u * p + 1u] == 0u) { e = route[2u * p]; }
      if (e >= e0 && e < e0 + C) { bits = bits | (1u << (e - e0)); }
    }
  }
  return bits;
}
`;
  // per expert c of quad q: y (inter), g (grad * scale), chosen flag
  const act = score === "sigmoid" ? "y" : "msqrtsoftplus(y)";
  let sums: string;
  let value: string;
  if (softmax) {
    sums = `acc.x = acc.x + g * y;`;
    value = pre ? `y * (select(0.0, g, ch) - d.x)` : `select(0.0, y * (g - d.x), ch)`;
  } else {
    sums = `let a = ${act}; acc = acc + vec2<f32>(a, g * a);`;
    const dAct = score === "sigmoid"
      ? "y * (1.0 - y)"
      : "select(msigmoid(y), 1.0, !isNan(y) && y > SOFTPLUS_LINEAR) / (2.0 * msqrtsoftplus(y) + EPS)";
    value = `select(0.0, ${K > 1 ? "(g / d.x - d.y)" : "g"} * (${dAct}), ch)`;
  }
  const body = /* wgsl */ `
  let row = li / TPR;
  let lane = li % TPR;
  let t = wg * RPW + row;
  let live = t < P.T;
  let q0 = t * (E / 4u) + lane * ${Q}u;
  let e0 = lane * C;
  var bits = 0u;
  var acc = vec2<f32>(0.0, 0.0);
  ${each(Q, (q) => `var y${q} = vec4<f32>(0.0); var g${q} = vec4<f32>(0.0);`, " ")}
  if (live) {
    bits = chosenBits(t, e0);
    ${each(Q, (q) => `y${q} = inter[q0 + ${q}u]; g${q} = gradQuad(q0 + ${q}u) * P.scale;`, " ")}
    // the lane's sums over its chosen experts, in index order
    ${
    each(
      C,
      (e) =>
        `if ((bits & ${(2 ** e) >>> 0}u) != 0u) { let y = y${e >> 2}[${e & 3}]; let g = g${e >> 2}[${
          e & 3
        }]; ${sums} }`,
      "\n    ",
    )
  }
  }
  // the team's sums, lane by lane (the same order on every lane)
  red[li] = acc;
  workgroupBarrier();
  var sd = red[li - lane];
  for (var i = 1u; i < TPR; i = i + 1u) { sd = sd + red[li - lane + i]; }
  ${
    softmax
      ? "let d = sd;"
      : "let S = sd.x + EPS;\n  let d = vec2<f32>(S, sd.y / (S * S)); // x: S = sum(a) + eps, y: D / S^2"
  }
  if (live) {
    ${
    each(
      Q,
      (q) =>
        `{ var v = vec4<f32>(0.0);\n      ${
          each(
            4,
            (c) =>
              `{ let ch = (bits & ${
                (2 ** (4 * q + c)) >>> 0
              }u) != 0u; let y = y${q}[${c}]; let g = g${q}[${c}]; v[${c}] = ${value}; }`,
            "\n      ",
          )
        }\n      storeOut(q0 + ${q}u, v); }`,
      "\n    ",
    )
  }
  }
`;
  return fastKernel(k, storage, helpers, body, WG);
}
