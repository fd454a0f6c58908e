#!/usr/bin/env python3
"""PyTorch peers for `moe bench`, run on the GPU machine in the same session.

Measures what a user would otherwise run for one MoE layer, on the shapes of BENCHMARKS.md with
the same routing distribution (k distinct uniformly random experts per token, random weights):
  * grouped_mm: sort by expert, gather, torch._grouped_mm for both projections, SiLU-and-mul,
    weighted index_add (bf16);
  * naive: a Python loop over experts with one matmul pair each (bf16).
Also the ceilings the floors use: the bf16 and FP8 dense matmul rates (8192^3) and the
device-to-device copy bandwidth. Writes one JSON object (argv[1], default peers.json).
"""
import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

SHAPES = {  # name: (experts, top_k, hidden, intermediate)
    "deepseek-v3": (256, 8, 7168, 2048),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
TOKENS = [1, 8, 64, 512, 4096]


def ms(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def routing(m, k, e, gen):
    ids = torch.argsort(torch.rand(m, e, generator=gen, device="cuda"), dim=1)[:, :k].to(torch.int64)
    w = torch.rand(m, k, generator=gen, device="cuda") + 0.05
    return ids, w / w.sum(1, keepdim=True)


def grouped(x, ids, w, w13t, w2t, e):
    k = ids.shape[1]
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=e), 0).to(torch.int32)
    h = torch._grouped_mm(x[tok], w13t, offs=offs)
    g, u = h.chunk(2, -1)
    y = torch._grouped_mm(F.silu(g) * u, w2t, offs=offs)
    out = torch.zeros_like(x)
    out.index_add_(0, tok, y * w.flatten()[order, None].to(y.dtype))
    return out


def naive(x, ids, w, w13, w2, e):
    out = torch.zeros_like(x)
    for ex in range(e):
        tok, slot = (ids == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        g, u = (x[tok] @ w13[ex].T).chunk(2, -1)
        y = (F.silu(g) * u) @ w2[ex].T
        out.index_add_(0, tok, y * w[tok, slot, None].to(y.dtype))
    return out


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "peers.json"
    dev = torch.cuda.get_device_name()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16_tflops = 2 * 8192**3 / ms(lambda: a @ b) / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.tensor(1.0, device="cuda")
    fp8_tflops = 2 * 8192**3 / ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e9
    del a, b, a8, b8
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() / ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (e, k, h, i) in SHAPES.items():
        w13 = torch.empty(e, 2 * i, h, device="cuda", dtype=torch.bfloat16).uniform_(-(3 / h) ** 0.5, (3 / h) ** 0.5)
        w2 = torch.empty(e, h, i, device="cuda", dtype=torch.bfloat16).uniform_(-(3 / i) ** 0.5, (3 / i) ** 0.5)
        w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)
        for m in TOKENS:
            x = torch.empty(m, h, device="cuda", dtype=torch.bfloat16).uniform_(-1.7, 1.7)
            ids, w = routing(m, k, e, gen)
            row = {"shape": name, "m": m, "grouped_mm_ms": None, "naive_ms": None}
            try:
                ref = naive(x, ids, w, w13, w2, e)
                got = grouped(x, ids, w, w13t, w2t, e)
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 2e-2, f"grouped_mm disagrees with the loop: {err}"
                row["grouped_mm_ms"] = ms(lambda: grouped(x, ids, w, w13t, w2t, e))
            except Exception as ex:  # noqa: BLE001 - reported, the other peer still runs
                row["grouped_mm_error"] = str(ex)[:200]
            row["naive_ms"] = ms(lambda: naive(x, ids, w, w13, w2, e))
            rows.append(row)
            print(name, m, row, flush=True)
        del w13, w2, w13t, w2t
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump({"device": dev, "bf16_tflops": bf16_tflops, "fp8_tflops": fp8_tflops, "copy_gbps": copy_gbps, "rows": rows}, f, indent=1)
    print(f"{dev}: bf16 {bf16_tflops:.0f} TFLOP/s, fp8 {fp8_tflops:.0f} TFLOP/s, copy {copy_gbps:.0f} GB/s")


if __name__ == "__main__":
    main()
