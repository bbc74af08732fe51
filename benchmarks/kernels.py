"""mLSTM kernel benchmark: fastxlstm triton against its peers, side by side in one process.

Peers: mlstm-kernels 2.0.6 `chunkwise--triton_xl_chunk` (TFLA; float32 gates, since bf16 gates
abort under triton 3.6) and `chunkwise--triton_limit_chunk`; fla-core 0.6.0 `chunk_simple_gla`
((B, S, H, D) layout, gate = logsigmoid(f)); torch SDPA causal flash attention at 32 heads of 128.
Inputs are bf16 random normal, gates N(0, 3) and N(2, 3); fwd = the forward alone, fwd+bwd = the
forward and the backward of (h * dh).sum() for all inputs.

FLOP yardsticks (those of ../shared/reference/measured-anchors-h200.md, so figures compare):
  mLSTM / simple GLA forward: B*H*S*(4*Dqk*Dv + 64*(Dqk + Dv)); forward+backward: 3x forward.
  causal attention forward: 2*B*H*S^2*D; forward+backward: 3.5x forward.
Peak memory is torch.cuda.max_memory_allocated over one call, inputs included.

    python benchmarks/kernels.py                    # full table (8 shapes)
    python benchmarks/kernels.py --quick            # the goal shape only: 7B heads, B8 S8192
    python benchmarks/kernels.py --quick --sweep    # also sweep fastxlstm tile configs there
    python benchmarks/kernels.py --quick --profile  # also print ours' GPU time per kernel there
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fastxlstm.ops.mlstm import triton as tri  # noqa: E402

TOKENS = 65_536
HEAD_SHAPES = [(8, 256, 512), (16, 128, 256)]
LENGTHS = [2048, 8192, 32768, 65536]


def mlstm_flop(B, S, H, K, V):
    return B * H * S * (4 * K * V + 64 * (K + V))


def attn_flop(B, S, H=32, D=128):
    return 2 * B * H * S * S * D


def timed(fn, reps, warmup=3):
    """Median ms over reps CUDA-event-timed calls after warm-up, and peak GiB of one call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def inputs(B, S, H, K, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, device="cuda", generator=g) * scale + shift)  # noqa: E731
    q, k = r(B, S, H, K).bfloat16(), r(B, S, H, K).bfloat16()
    v = r(B, S, H, V).bfloat16()
    i, f = r(B, S, H, scale=3.0), r(B, S, H, scale=3.0, shift=2.0)
    return q, k, v, i, f


def kernels(B, S, H, K, V):
    """name -> (make(): (forward closure, leaves)), for the mLSTM-like kernels at one shape."""
    out = {}

    def ours(L):
        def run(q, k, v, i, f):
            return tri.mlstm(q, k, v, i, f, chunk_size=L)[0]

        def make():
            return run, list(inputs(B, S, H, K, V))
        return make

    for L in (64, 128, 256):
        out[f"fastxlstm triton L{L}"] = ours(L)

    def mk(name, L):
        def make():
            from mlstm_kernels.torch import get_mlstm_kernel
            fn = get_mlstm_kernel(name)
            q, k, v, i, f = inputs(B, S, H, K, V)
            x = [t.transpose(1, 2).contiguous() for t in (q, k, v, i, f)]   # (B, H, S, ...)
            return (lambda q, k, v, i, f: fn(q, k, v, i, f, chunk_size=L)), x
        return make

    out["TFLA xl_chunk L128"] = mk("chunkwise--triton_xl_chunk", 128)
    out["TFLA xl_chunk L64"] = mk("chunkwise--triton_xl_chunk", 64)
    out["limit_chunk L64"] = mk("chunkwise--triton_limit_chunk", 64)

    def gla():
        from fla.ops.simple_gla import chunk_simple_gla
        q, k, v, i, f = inputs(B, S, H, K, V)
        g = F.logsigmoid(f)
        return (lambda q, k, v, g: chunk_simple_gla(q, k, v, g, scale=K ** -0.5)[0]), [q, k, v, g]

    out["fla chunk_simple_gla"] = gla
    return out


def build_call(make, mode):
    """The timed closure of one kernel in one mode ("fwd" or "fwdbwd")."""
    fwd, leaves = make()
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                fwd(*leaves)
    else:
        leaves = [t.requires_grad_(True) for t in leaves]
        h = fwd(*leaves)
        dh = torch.randn_like(h)
        del h

        def fn():
            torch.autograd.grad(fwd(*leaves), leaves, dh)
    return fn


def run_one(make, mode, reps):
    return timed(build_call(make, mode), reps)


def profile_kernels(make, mode, rows=12):
    """GPU time per kernel of one call (torch.profiler, mean of 3 calls after warm-up)."""
    from torch.profiler import ProfilerActivity, profile
    fn = build_call(make, mode)
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / 3e3
    print(f"profile {mode}: {total:.3f} ms of GPU time per call, {sum(e.count for e in events) // 3} kernels", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"  {e.self_device_time_total / 3e3:8.3f} ms  {e.count // 3:4d}x  {e.key[:90]}", flush=True)


def sdpa(B, S, mode, reps):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(B, 32, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd")
               for _ in range(3))

    def f():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                f()
    else:
        do = torch.randn_like(q)

        def fn():
            torch.autograd.grad(f(), (q, k, v), do)
    return timed(fn, reps)


def check_ours(B, S, H, K, V):
    """Our bf16 forward against TFLA's and against native fp32 on a slice (sanity, not the test)."""
    from fastxlstm.ops.mlstm import native
    q, k, v, i, f = inputs(B, S, H, K, V, seed=1)
    h = tri.mlstm(q, k, v, i, f, chunk_size=128)[0].float()
    res = {}
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
        x = [t.transpose(1, 2).contiguous() for t in (q, k, v, i, f)]
        ht = get_mlstm_kernel("chunkwise--triton_xl_chunk")(*x, chunk_size=128).transpose(1, 2).float()
        res["vs TFLA rel L2"] = ((h - ht).norm() / ht.norm()).item()
    except Exception as e:  # noqa: BLE001
        res["vs TFLA"] = repr(e)[:200]
    sl = slice(0, 1)
    hn = native.mlstm(*(t[sl].float() for t in (q, k, v, i, f)), chunk_size=128)[0]
    res["vs native fp32 (batch 0) rel L2"] = ((h[sl] - hn).norm() / hn.norm()).item()
    return res


def table(rows):
    lines = ["| kernel | shape | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB fwd / fwd+bwd |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        def cell(mode, key):
            x = r.get(mode)
            if isinstance(x, dict):
                return f"{x[key]:.2f}" if key == "ms" else f"{x[key]:.1f}"
            return f"fails: {x}" if key == "ms" else "–"
        mem = " / ".join(f"{r[m]['gib']:.1f}" if isinstance(r.get(m), dict) else "–" for m in ("fwd", "fwdbwd"))
        lines.append(f"| {r['kernel']} | {r['shape']} | {cell('fwd', 'ms')} | {cell('fwd', 'tflops')} | "
                     f"{cell('fwdbwd', 'ms')} | {cell('fwdbwd', 'tflops')} | {mem} |")
    return "\n".join(lines)


def measure(name, make, B, S, H, K, V, reps, modes=("fwd", "fwdbwd")):
    row = {"kernel": name, "shape": f"B{B} S{S} H{H} {K}/{V}"}
    for mode in modes:
        try:
            ms, gib = run_one(make, mode, reps)
            fl = mlstm_flop(B, S, H, K, V) * (3 if mode == "fwdbwd" else 1)
            row[mode] = {"ms": ms, "gib": gib, "tflops": fl / ms / 1e9}
        except Exception as e:  # noqa: BLE001
            row[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            traceback.print_exc(limit=2)
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


# Variants that compile without register spills for sm_90 under triton 3.6 (compiled off-device;
# benchmarks/NOTES-kernels.md), each group's first entry the current default. fwd_out (chunk >= 128)
# may pipeline; fwd_out_short (chunk 64) stays at one stage (two miscompile there under triton 3.6).
SWEEP = {
    "fwd_state": [dict(BK=64, BV=128, W=4, S=2), dict(BK=128, BV=64, W=8, S=2), dict(BK=64, BV=64, W=4, S=2)],
    # P=True: the score blocks formed once by their own kernel (compiled for sm_90: no spills at these tiles)
    "fwd_out": [dict(BT=64, BK=128, BV=128, W=4, S=2, P=False), dict(BT=64, BK=128, BV=128, W=4, S=2, P=True),
                dict(BT=64, BK=128, BV=256, W=8, S=2, P=True), dict(BT=64, BK=256, BV=128, W=4, S=2, P=True),
                dict(BT=64, BK=128, BV=256, W=8, S=2, P=False)],
    "bwd_state": [dict(BK=64, BV=128, W=8, S=2), dict(BK=64, BV=64, W=4, S=2), dict(BK=128, BV=64, W=8, S=2),
                  dict(BK=64, BV=64, W=4, S=3)],
    "bwd_scores": [dict(BT=64, BK=64, BV=64, W=4, S=2), dict(BT=64, BK=128, BV=128, W=8, S=2),
                   dict(BT=64, BK=64, BV=64, W=8, S=2)],
    "bwd_dqk": [dict(BK=64, BV=64, W=8, S=3), dict(BK=64, BV=128, W=8, S=2),
                dict(BK=32, BV=64, W=8, S=3), dict(BK=64, BV=64, W=4, S=3)],
    "bwd_dv": [dict(BK=128, BV=128, W=8, S=2), dict(BK=64, BV=128, W=8, S=3),
               dict(BK=64, BV=256, W=8, S=2), dict(BK=64, BV=64, W=4, S=3)],
}


def _ours_plain(B, S, H, K, V, L):
    def make():
        return (lambda q, k, v, i, f: tri.mlstm(q, k, v, i, f, chunk_size=L)[0]), list(inputs(B, S, H, K, V))
    return make


def sweep(B, S, H, K, V, L, reps, log):
    """Coordinate sweep: each kernel's tiles on their own (the kernels' times add up)."""
    best = {}
    for name, variants in SWEEP.items():
        mode = "fwdbwd" if name.startswith("bwd") else "fwd"
        # below chunk 128 the kernels read a group's _short tiles where there are some
        group = f"{name}_short" if L < 128 and f"{name}_short" in tri.CONFIG else name
        if group == "fwd_out_short":
            variants = [dict(v, S=1) for v in variants]     # two stages miscompile there (see CONFIG)
        base = dict(tri.CONFIG[group])
        results = []
        for cfg in variants:
            tri.CONFIG[group] = dict(cfg)
            try:
                ms, _ = run_one(_ours_plain(B, S, H, K, V, L), mode, reps)
            except Exception as e:  # noqa: BLE001
                ms = float("inf")
                print(f"sweep {group} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            results.append((ms, cfg))
            log.append({"group": group, "cfg": cfg, "L": L, "mode": mode, "ms": ms})
            print(f"sweep L{L} {group} {cfg} {mode} {ms:.3f} ms", flush=True)
        ms, cfg = min(results, key=lambda x: x[0])
        tri.CONFIG[group] = dict(cfg) if ms < float("inf") else base
        best[group] = tri.CONFIG[group]
    return best


def measure_sdpa(S, reps):
    B = TOKENS // S
    row = {"kernel": "SDPA flash H32 D128", "shape": f"B{B} S{S} H32 128/128"}
    for mode in ("fwd", "fwdbwd"):
        try:
            ms, gib = sdpa(B, S, mode, reps)
            row[mode] = {"ms": ms, "gib": gib, "tflops": attn_flop(B, S) * (3.5 if mode == "fwdbwd" else 1) / ms / 1e9}
        except Exception as e:  # noqa: BLE001
            row[mode] = f"{type(e).__name__}: {str(e)[:160]}"
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip", default="", help="comma-separated kernel-name substrings to leave out")
    ap.add_argument("--sweep-chunk", type=int, default=128)
    ap.add_argument("--only", default="", help="measure only kernels whose name contains one of these")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print ours' per-kernel GPU time at the goal shape, L128")
    ap.add_argument("--other", default="fastxlstm triton L128,TFLA xl_chunk L128",
                    help="kernels measured at the shapes other than the goal shape (name substrings)")
    args = ap.parse_args()
    import triton
    dev = torch.cuda.get_device_properties(0)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {dev.name} {dev.multi_processor_count} SMs "
          f"torch {torch.__version__} triton {triton.__version__}", flush=True)
    log = {"sweep": [], "rows": [], "checks": {}}
    os.makedirs(args.out, exist_ok=True)
    goal = (8, 8192, 8, 256, 512)
    shapes = [goal] + ([] if args.quick else [
        (TOKENS // S, S, H, K, V) for (H, K, V) in HEAD_SHAPES for S in LENGTHS if (TOKENS // S, S, H, K, V) != goal])
    skip = [s for s in args.skip.split(",") if s]
    log["checks"]["B8 S8192 H8"] = check_ours(*goal)
    print("check", log["checks"]["B8 S8192 H8"], flush=True)
    if args.profile:
        for mode in ("fwd", "fwdbwd"):
            profile_kernels(_ours_plain(*goal, 128), mode)
    attn_done = set()
    for B, S, H, K, V in shapes:
        for name, make in kernels(B, S, H, K, V).items():
            if any(s in name for s in skip) or (args.only and not any(s in name for s in args.only.split(","))):
                continue
            if (B, S, H, K, V) != goal and not any(s in name for s in args.other.split(",")):
                continue
            log["rows"].append(measure(name, make, B, S, H, K, V, args.reps))
            with open(os.path.join(args.out, "kernels.json"), "w") as fh:
                json.dump(log, fh, indent=1)
        if S not in attn_done and not args.no_sdpa:
            attn_done.add(S)
            log["rows"].append(measure_sdpa(S, args.reps))
    md = table(log["rows"])
    print(md, flush=True)
    with open(os.path.join(args.out, "kernels.md"), "w") as fh:
        fh.write(md + "\n")
    if args.sweep:  # after the table, so a time limit cuts the sweep, not the table
        best = sweep(8, 8192, 8, 256, 512, args.sweep_chunk, args.reps, log["sweep"])
        log["best"] = best
        print(f"best at L{args.sweep_chunk}: {json.dumps(best)}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.json"), "w") as fh:
        json.dump(log, fh, indent=1)
    with open(os.path.join(args.out, "kernels.md"), "w") as fh:
        fh.write(md + "\n")


if __name__ == "__main__":
    main()
