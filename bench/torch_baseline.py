"""Unfused PyTorch MoE router (the same maths as moe-router / TransformerEngine's
fused router), timed with CUDA events, eager and torch.compile.

    python3 bench/torch_baseline.py [--json out.json] [--iters N]

Cases match bench/gpu_bench.ts. Forward: scores, bias, group limit, top-k,
values, probs scattered to [T, E] and the bytemap routing map. Backward:
autograd of sum(probs * grad) with respect to the logits.
"""
import argparse
import json
import math

import torch


def router(logits, topk, score, groups=0, group_topk=0, bias=None, scale=1.0):
    x = logits.float()
    if score == "softmax":
        s = x  # post softmax: select on logits, softmax over the chosen
    else:
        s = torch.sigmoid(x)
    r = s + bias if bias is not None else s
    if group_topk > 0:
        T, E = r.shape
        g = r.view(T, groups, E // groups).topk(topk // group_topk, dim=-1).values.sum(-1)
        keep = torch.zeros_like(g).scatter_(1, g.topk(group_topk, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand(T, groups, E // groups).reshape(T, E)
        r = r.masked_fill(mask == 0, float("-inf"))
    idx = r.topk(topk, dim=-1).indices
    v = s.gather(1, idx)
    if score == "softmax":
        v = torch.softmax(v, dim=-1)
    elif topk > 1:
        v = v / (v.sum(-1, keepdim=True) + 1e-20)
    probs = torch.zeros_like(x).scatter(1, idx, v * scale)
    routing_map = torch.zeros_like(x, dtype=torch.bool).scatter(1, idx, True)
    return probs, routing_map


CASES = {
    "dsv3": dict(T=8192, E=256, topk=8, score="sigmoid", groups=8, group_topk=4, bias=True, scale=2.5),
    "qwen3": dict(T=8192, E=128, topk=8, score="softmax"),
    "mixtral": dict(T=8192, E=8, topk=2, score="softmax"),
    "wide": dict(T=4096, E=1024, topk=32, score="sigmoid"),
    "decode": dict(T=16, E=256, topk=8, score="sigmoid", groups=8, group_topk=4, bias=True, scale=2.5),
}


def time_cuda(fn, iters):
    # warm up for 0.3 s: an idle H200 runs at 345 MHz and needs sustained
    # work to reach full clocks (bench/gpu_bench.ts warms up the same way)
    import time
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000.0)  # us
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev = "cuda"
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    results = {}
    compiled = torch.compile(router, dynamic=False)
    for name, c in CASES.items():
        T, E = c["T"], c["E"]
        g = torch.Generator(device=dev).manual_seed(0)
        x = (torch.rand(T, E, device=dev, generator=g) - 0.5) * 6
        x.requires_grad_(True)
        grad = torch.rand(T, E, device=dev, generator=g) - 0.5
        bias = (0.01 * torch.sin(torch.arange(E, device=dev, dtype=torch.float32))) if c.get("bias") else None
        kw = dict(topk=c["topk"], score=c["score"], groups=c.get("groups", 0), group_topk=c.get("group_topk", 0),
                  bias=bias, scale=c.get("scale", 1.0))
        res = {}
        with torch.no_grad():
            res["eager_fwd_us"] = time_cuda(lambda: router(x, **kw), args.iters)
            try:
                res["compiled_fwd_us"] = time_cuda(lambda: compiled(x, **kw), args.iters)
            except Exception as e:  # noqa: BLE001
                res["compiled_fwd_us"] = math.nan
                print(name, "torch.compile failed:", repr(e)[:200])

        def fwd_bwd():
            p, _ = router(x, **kw)
            (p * grad).sum().backward()

        res["eager_fwd_bwd_us"] = time_cuda(fwd_bwd, args.iters)
        results[name] = res
        print(f"{name:8s} eager fwd {res['eager_fwd_us']:.1f} us, compiled fwd {res['compiled_fwd_us']:.1f} us, "
              f"eager fwd+bwd {res['eager_fwd_bwd_us']:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
