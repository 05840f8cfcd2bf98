/**
 * The comparison's outputs: the console table, bench/RESULTS.md and the SVG
 * bar chart of moe-router's speed-ups.
 *
 * @module
 */
import type { Case } from "./cases.ts";
import type { Timing } from "./timing.ts";
import type { Check } from "./validate.ts";

/** The implementations compared, in table order. */
export const IMPLS = [
  "moe-1",
  "moe-all",
  "moe-1-save",
  "moe-all-save",
  "plain",
  "tfjs-wasm",
  "tfjs-cpu",
  "ort-1",
  "ort-all",
] as const;
/** One implementation. */
export type Impl = typeof IMPLS[number];
/** What was timed: the forward, forward then backward, or (moe-router) the backward alone. */
export type Mode = "forward" | "forward+backward" | "backward";

/** One implementation on one case and mode: its check and, when it passed, its timing. */
export interface Entry {
  /** Absent for moe-router itself (the reference of the checks). */
  check?: Check;
  /** Absent when not timed: failed check, or not available (`note`). */
  timing?: Timing;
  /** Why there is no timing, when it is not a failed check. */
  note?: string;
}

/** Everything measured for one case. */
export interface CaseResult {
  c: Case;
  results: Record<Mode, Partial<Record<Impl, Entry>>>;
}

/** One target of the issue and whether this run met it. */
export interface TargetResult {
  target: string;
  measured: string;
  met: boolean;
}

/** Labels of the implementations; `threads` is the all-threads count. */
export function implLabel(impl: Impl, threads: number): string {
  switch (impl) {
    case "moe-1":
      return "moe-router (WebAssembly SIMD), 1 thread";
    case "moe-all":
      return `moe-router (WebAssembly SIMD), ${threads} threads`;
    case "moe-1-save":
      return "moe-router, 1 thread, saving for backward";
    case "moe-all-save":
      return `moe-router, ${threads} threads, saving for backward`;
    case "plain":
      return "plain TypeScript loop";
    case "tfjs-wasm":
      return "TensorFlow.js, wasm backend (SIMD)";
    case "tfjs-cpu":
      return "TensorFlow.js, cpu backend";
    case "ort-1":
      return "onnxruntime-node, 1 thread";
    case "ort-all":
      return `onnxruntime-node, ${threads} threads`;
  }
}

const isMoe = (impl: Impl) => impl.startsWith("moe-");

/** Milliseconds per call of `impl`, or undefined when it was not timed. */
export function msOf(r: CaseResult, mode: Mode, impl: Impl): number | undefined {
  return r.results[mode][impl]?.timing?.ms;
}

/** The fastest peer (not moe-router) of a case and mode. */
export function fastestPeer(r: CaseResult, mode: Mode): { impl: Impl; ms: number } | undefined {
  let best: { impl: Impl; ms: number } | undefined;
  for (const impl of IMPLS) {
    const ms = msOf(r, mode, impl);
    if (isMoe(impl) || ms === undefined) continue;
    if (!best || ms < best.ms) best = { impl, ms };
  }
  return best;
}

/** moe-router's best time (one thread or all threads) on a case and mode. */
export function bestMoe(r: CaseResult, mode: Mode): { impl: Impl; ms: number } | undefined {
  const one = msOf(r, mode, "moe-1");
  const all = msOf(r, mode, "moe-all");
  if (one === undefined) return undefined;
  return all !== undefined && all < one ? { impl: "moe-all", ms: all } : { impl: "moe-1", ms: one };
}

const fmtMs = (ms: number) =>
  ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms >= 1 ? ms.toFixed(2) : ms.toFixed(3);
const fmtX = (x: number) => x >= 100 ? `${x.toFixed(0)}x` : x >= 10 ? `${x.toFixed(1)}x` : `${x.toFixed(2)}x`;

/** Rows of the results table of one mode (forward or forward+backward). */
function tableRows(results: readonly CaseResult[], mode: Mode, threads: number): string[][] {
  const rows: string[][] = [];
  for (const r of results) {
    const one = msOf(r, mode, "moe-1");
    const all = msOf(r, mode, "moe-all");
    for (const impl of IMPLS) {
      const e = r.results[mode][impl];
      if (!e) continue;
      const ms = e.timing?.ms;
      const status = e.check ? (e.check.ok ? "ok" : "FAILED") : (e.note ? "n/a" : "reference");
      const speedup = (ours: number | undefined) =>
        ms === undefined || ours === undefined || isMoe(impl) ? "" : fmtX(ms / ours);
      rows.push([
        r.c.id,
        implLabel(impl, threads),
        status,
        ms === undefined ? (e.note ?? (e.check && !e.check.ok ? "not timed" : "")) : fmtMs(ms),
        e.timing ? fmtMs(e.timing.minMs) : "",
        ms === undefined ? "" : (ms * 1e6 / (r.c.tokens * r.c.experts)).toFixed(2),
        speedup(one),
        speedup(all),
      ]);
    }
  }
  return rows;
}

function tableHeader(threads: number): string[] {
  return [
    "case",
    "implementation",
    "check",
    "ms / call",
    "fastest call",
    "ns / (token x expert)",
    "moe-router 1 thread: x faster",
    `moe-router ${threads} threads: x faster`,
  ];
}

/** A plain-text table with aligned columns (numbers right-aligned). */
function textTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const right = (i: number) => i >= 3;
  const line = (cells: string[]) =>
    cells.map((c, i) => right(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)).join("  ").trimEnd();
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

function markdownTable(header: string[], rows: string[][]): string {
  const align = header.map((_, i) => i >= 3 ? "---:" : "---");
  const line = (cells: string[]) => `| ${cells.map((c) => c.replaceAll("|", "\\|")).join(" | ")} |`;
  return [line(header), line(align), ...rows.map(line)].join("\n");
}

/** The console report: the two tables, the backward ratios and the targets. */
export function consoleReport(
  results: readonly CaseResult[],
  targets: readonly TargetResult[],
  threads: number,
): string {
  const out: string[] = [];
  out.push("Forward (median ms per call; speed-up = peer time / moe-router time)");
  out.push(textTable(tableHeader(threads), tableRows(results, "forward", threads)));
  out.push("");
  out.push("Forward + backward (peers with gradients)");
  out.push(textTable(tableHeader(threads), tableRows(results, "forward+backward", threads)));
  out.push("");
  out.push("moe-router backward alone vs forward");
  out.push(
    textTable(["case", "threads", "forward ms", "backward ms", "forward / backward"], backwardRows(results)),
  );
  out.push("");
  out.push("Targets");
  for (const t of targets) {
    out.push(`  [${t.met ? "met" : "MISSED"}] ${t.target}: ${t.measured}`);
  }
  return out.join("\n");
}

function backwardRows(results: readonly CaseResult[]): string[][] {
  const rows: string[][] = [];
  for (const r of results) {
    for (const impl of ["moe-1", "moe-all"] as const) {
      // the forward a backward follows: the one that saves its state
      const f = msOf(r, "forward", `${impl}-save`);
      const b = msOf(r, "backward", impl);
      if (f === undefined || b === undefined) continue;
      rows.push([r.c.id, impl === "moe-1" ? "1" : "all", fmtMs(f), fmtMs(b), fmtX(f / b)]);
    }
  }
  return rows;
}

/** What RESULTS.md says about the machine and the run. */
export interface RunInfo {
  date: string;
  machine: string[];
  setup: string[];
  notes: string[];
}

/** bench/RESULTS.md. */
export function markdownReport(
  results: readonly CaseResult[],
  targets: readonly TargetResult[],
  threads: number,
  info: RunInfo,
): string {
  const caseList = results.map((r) => `- \`${r.c.id}\`: ${r.c.name}`);
  const md = [
    "# moe-router against the JavaScript peers (CPU)",
    "",
    "Generated by `deno task bench:compare` (bench/compare/main.ts); do not edit by hand. Setup, once:",
    "`npm ci --prefix bench/compare`.",
    "",
    `Run of ${info.date}.`,
    "",
    "![speed-ups of moe-router](speedups.svg)",
    "",
    "## Machine",
    "",
    ...info.machine.map((m) => `- ${m}`),
    "",
    "## What is compared",
    "",
    ...caseList,
    "",
    ...info.setup,
    "",
    "## Forward",
    "",
    "Median milliseconds per call (and the fastest call). The speed-up columns are the peer's median time divided " +
    "by moe-router's, routing alone (`saveForBackward: false`: the peers' outputs).",
    "",
    markdownTable(tableHeader(threads), tableRows(results, "forward", threads)),
    "",
    "## Forward + backward",
    "",
    "Only TensorFlow.js has gradients among the peers (`tf.grad`); moe-router runs its forward then its backward.",
    "",
    markdownTable(tableHeader(threads), tableRows(results, "forward+backward", threads)),
    "",
    "## moe-router backward alone",
    "",
    "Against the forward that a backward follows (the one that saves its state).",
    "",
    markdownTable(["case", "threads", "forward ms", "backward ms", "forward / backward"], backwardRows(results)),
    "",
    "## Targets (issue 4)",
    "",
    markdownTable(
      ["target", "measured", "met"],
      targets.map((t) => [t.target, t.measured, t.met ? "met" : "**missed**"]),
    ),
    "",
    "## Notes",
    "",
    ...info.notes.map((n) => `- ${n}`),
    "",
  ];
  return md.join("\n");
}

// ---------------------------------------------------------------------------
// SVG bar chart

/** The bars of each case: moe-router's forward against the peers, then forward+backward against TensorFlow.js. */
function chartedPeers(threads: number): { mode: Mode; impl: Impl; label: string }[] {
  return [
    { mode: "forward", impl: "plain", label: "plain TypeScript loop" },
    { mode: "forward", impl: "tfjs-wasm", label: "TF.js wasm (SIMD)" },
    { mode: "forward", impl: "tfjs-cpu", label: "TF.js cpu" },
    { mode: "forward", impl: "ort-1", label: "onnxruntime-node, 1 thread" },
    { mode: "forward", impl: "ort-all", label: `onnxruntime-node, ${threads} threads` },
    { mode: "forward+backward", impl: "tfjs-wasm", label: "TF.js wasm, forward+backward" },
    { mode: "forward+backward", impl: "tfjs-cpu", label: "TF.js cpu, forward+backward" },
  ];
}

const esc = (s: string) => s.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");

/**
 * A horizontal bar chart on a log scale: for each case, the speed-up of
 * moe-router over each peer (peer time / moe-router time), a bar from 1x
 * (as fast) to the right when moe-router is faster, to the left when it is
 * slower. Dark: moe-router on one thread; light: on all threads. A peer that
 * failed its check gets a note instead of a bar.
 */
export function speedupSvg(results: readonly CaseResult[], threads: number): string {
  const peers = chartedPeers(threads);
  const left = 250;
  const width = 920;
  const plotW = width - left - 90;
  const barH = 7;
  const rowH = 20;
  const headH = 26;
  const top = 56;
  const hasThreads = results.some((r) => msOf(r, "forward", "moe-all") !== undefined);

  // the axis: whole decades covering every speed-up, and 1x
  let lo = 1;
  let hi = 10;
  for (const r of results) {
    for (const p of peers) {
      const peer = msOf(r, p.mode, p.impl);
      for (const impl of ["moe-1", "moe-all"] as const) {
        const ours = msOf(r, p.mode, impl);
        if (peer === undefined || ours === undefined) continue;
        lo = Math.min(lo, peer / ours);
        hi = Math.max(hi, peer / ours);
      }
    }
  }
  const dLo = Math.floor(Math.log10(lo));
  const dHi = Math.ceil(Math.log10(hi));
  const xOf = (v: number) => left + plotW * (Math.log10(v) - dLo) / (dHi - dLo);
  const x1 = xOf(1);

  const height = top + results.length * (headH + peers.length * rowH) + 30;
  const gridBottom = height - 24;
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="#fff"/>`,
    `<text x="8" y="20" font-size="15" font-weight="bold">` +
    `How many times faster moe-router is than each peer (log scale; right of 1x: faster)</text>`,
    `<rect x="8" y="32" width="12" height="${barH}" fill="#1f5fa8"/>` +
    `<text x="24" y="39" fill="#444">moe-router, 1 thread</text>`,
  ];
  if (hasThreads) {
    parts.push(
      `<rect x="170" y="32" width="12" height="${barH}" fill="#8db8e8"/>` +
        `<text x="186" y="39" fill="#444">moe-router, ${threads} threads</text>`,
    );
  }
  for (let d = dLo; d <= dHi; d++) {
    const x = xOf(10 ** d).toFixed(1);
    const label = d < 0 ? (10 ** d).toFixed(-d) : `${10 ** d}`;
    parts.push(`<line x1="${x}" y1="${top - 6}" x2="${x}" y2="${gridBottom}" stroke="${d === 0 ? "#888" : "#ddd"}"/>`);
    parts.push(`<text x="${x}" y="${gridBottom + 14}" text-anchor="middle" fill="#555">${label}x</text>`);
  }

  let y = top;
  for (const r of results) {
    parts.push(`<text x="8" y="${y + 16}" font-weight="bold">${esc(r.c.name)}</text>`);
    y += headH;
    for (const p of peers) {
      parts.push(`<text x="${left - 8}" y="${y + 13}" text-anchor="end">${esc(p.label)}</text>`);
      const e = r.results[p.mode][p.impl];
      const peer = e?.timing?.ms;
      if (peer === undefined) {
        const why = e?.check && !e.check.ok ? "failed its check: not timed" : (e?.note ?? "not measured");
        parts.push(`<text x="${x1 + 4}" y="${y + 13}" fill="#a00">${esc(why)}</text>`);
        y += rowH;
        continue;
      }
      const bars: { impl: Impl; fill: string; dy: number }[] = [{
        impl: "moe-1",
        fill: "#1f5fa8",
        dy: hasThreads ? 2 : 5,
      }];
      if (hasThreads) bars.push({ impl: "moe-all", fill: "#8db8e8", dy: 2 + barH });
      let end = x1;
      const labels: string[] = [];
      for (const b of bars) {
        const ours = msOf(r, p.mode, b.impl);
        if (ours === undefined) continue;
        const x = xOf(peer / ours);
        const from = Math.min(x, x1);
        const w = Math.max(1, Math.abs(x - x1));
        parts.push(
          `<rect x="${from.toFixed(1)}" y="${y + b.dy}" width="${w.toFixed(1)}" height="${barH}" fill="${b.fill}"/>`,
        );
        end = Math.max(end, x);
        labels.push(fmtX(peer / ours));
      }
      parts.push(`<text x="${(end + 4).toFixed(1)}" y="${y + 13}" fill="#222">${esc(labels.join(" / "))}</text>`);
      y += rowH;
    }
  }
  parts.push(`</svg>`);
  return parts.join("\n") + "\n";
}
