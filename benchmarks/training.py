"""Training throughput: fastxlstm against the official xlstm 2.0.6 xLSTMLarge, side by side in one run.

The step (as in the measured anchors, item 4): forward, cross-entropy in float32 over the soft-capped
logits against shifted random tokens, backward, clip_grad_norm_(1.0), AdamW(lr 1e-4, betas (0.9,
0.95), wd 0.1, fused on CUDA), zero_grad; the same batch every step; float32 master weights and
bf16 autocast. Both models get the same config, batch and optimizer. The official model runs its
TFLA kernel (`chunkwise--triton_xl_chunk`) with float32 gates, since bf16 gates abort under triton
3.6 (anchors, failures item 1).

MFU = 6 * N * tokens/s / 989.5e12 (H100/H200 SXM dense bf16 datasheet), N = parameters without the
input embedding (the LM head counted), the same formula for both.

    python benchmarks/training.py --out results/                   # the H200: 1.3b, 4x4096 and 8x4096
    python benchmarks/training.py --preset tiny --device cpu --seq 64 --batches 2 --steps 2 \\
        --official-kernel chunkwise--native_autograd                  # a CPU smoke run

Each configuration runs in turn in this process; one that runs out of memory is reported as OOM and
the rest go on. Results print as JSON lines and a table, and go to OUT/training.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastxlstm.config import PRESETS  # noqa: E402
from fastxlstm.model import XLSTMLarge  # noqa: E402

PEAK_FLOPS = 989.5e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batches", default="4,8", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--official-kernel", default="chunkwise--triton_xl_chunk")
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--ac-if-oom", action="store_true", help="retry an OOM batch of ours with activation checkpointing")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip stages that would start after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = PRESETS[args.preset]
    t0 = time.perf_counter()
    rows = []
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "preset": args.preset, "seq": args.seq}
    print(json.dumps({"env": env}), flush=True)
    for b in map(int, args.batches.split(",")):
        stages = [("fastxlstm", False)] + ([] if args.no_official else [("official", False)])
        for impl, ac in stages:
            if time.perf_counter() - t0 > args.budget_s:
                print(json.dumps({"skipped": f"{impl} B{b}: time budget spent"}), flush=True)
                continue
            row = run_stage(impl, cfg, b, args, device, activation_checkpointing=ac)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if impl == "fastxlstm" and row.get("oom") and args.ac_if_oom:
                row = run_stage(impl, cfg, b, args, device, activation_checkpointing=True)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "training.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    return 0


def run_stage(impl: str, cfg, batch: int, args, device, *, activation_checkpointing: bool) -> dict:
    row = {"impl": impl, "batch": batch, "seq": args.seq, "tokens_per_step": batch * args.seq,
           "activation_checkpointing": activation_checkpointing}
    model = opt = None
    t_stage = time.perf_counter()
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = build_ours(cfg, activation_checkpointing) if impl == "fastxlstm" else \
                build_official(cfg, args.official_kernel)
        n_all = sum(p.numel() for p in model.parameters())
        n = n_all - embedding(model).weight.numel()
        row.update(params=n_all, params_no_embedding=n)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=device.type == "cuda")
        ids = torch.randint(0, cfg.vocab_size, (batch, args.seq + 1), device=device)
        x, y = ids[:, :-1], ids[:, 1:]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            loss = step(model, opt, x, y, device)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step(model, opt, x, y, device)
        sync(device)
        dt = (time.perf_counter() - start) / args.steps
        tps = batch * args.seq / dt
        row.update(ms_per_step=dt * 1e3, tokens_per_s=tps, mfu=6 * n * tps / PEAK_FLOPS, loss=float(loss))
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    except torch.OutOfMemoryError as e:
        row.update(oom=True, error=str(e).split("\n")[0][:300])
    except Exception as e:                                     # report and go on with the other stages
        row.update(error=f"{type(e).__name__}: {str(e)[:500]}")
    finally:
        row["stage_wall_s"] = round(time.perf_counter() - t_stage, 1)
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def step(model, opt, x, y, device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def build_ours(cfg, activation_checkpointing: bool):
    model = XLSTMLarge(cfg)
    if activation_checkpointing:
        import functools

        from fastxlstm.train import _checkpointed
        for block in model.backbone.blocks:
            block.forward = functools.partial(_checkpointed, block.forward)
    return model


def build_official(cfg, kernel: str):
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig
    oc = xLSTMLargeConfig(
        embedding_dim=cfg.embedding_dim, num_heads=cfg.num_heads, num_blocks=cfg.num_blocks,
        vocab_size=cfg.vocab_size, qk_dim_factor=cfg.qk_dim_factor, v_dim_factor=cfg.v_dim_factor,
        ffn_proj_factor=cfg.ffn_proj_factor, ffn_round_up_to_multiple_of=cfg.ffn_round_up_to_multiple_of,
        gate_soft_cap=cfg.gate_soft_cap, output_logit_soft_cap=cfg.output_logit_soft_cap, norm_eps=cfg.norm_eps,
        use_bias=cfg.use_bias, add_out_norm=cfg.add_out_norm, chunk_size=cfg.chunk_size, mode="train",
        return_last_states=True, chunkwise_kernel=kernel, sequence_kernel="native_sequence__triton",
        step_kernel="triton", autocast_kernel_dtype="bfloat16")
    model = xLSTMLarge(oc)
    if "triton" not in kernel:                       # the native kernels want gates in q's dtype
        return model
    for block in model.backbone.blocks:
        block.mlstm_layer.mlstm_backend = _Fp32Gates(block.mlstm_layer.mlstm_backend)
    return model


class _Fp32Gates(torch.nn.Module):
    """Pass i, f to the official kernel as float32 and q, k, v as bf16, with autocast off (so the
    kernel's custom_fwd does not cast the gates back to bf16). The bf16 -> fp32 cast is exact."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v, i, f, **kw):
        if not torch.is_autocast_enabled(q.device.type):
            return self.inner(q, k, v, i, f, **kw)
        dt = torch.bfloat16
        with torch.autocast(q.device.type, enabled=False):
            return self.inner(q.to(dt), k.to(dt), v.to(dt), i.float(), f.float(), **kw)


def embedding(model):
    return model.embedding


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(rows: list[dict]) -> None:
    print("\n| impl | B×S | ms/step | tokens/s | MFU | peak GiB | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = r["impl"] + (" + AC" if r["activation_checkpointing"] else "")
        if "tokens_per_s" in r:
            print(f"| {name} | {r['batch']}×{r['seq']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{100 * r['mfu']:.1f}% | {r.get('peak_gib', float('nan')):.1f} | loss {r['loss']:.3f} |")
        else:
            print(f"| {name} | {r['batch']}×{r['seq']} | – | – | – | – | {'OOM' if r.get('oom') else r.get('error')} |")
    by = {(r["impl"], r["batch"]): r for r in rows if "tokens_per_s" in r and not r["activation_checkpointing"]}
    for (impl, b), r in by.items():
        peer = by.get(("official", b))
        if impl == "fastxlstm" and peer:
            print(f"B{b}: fastxlstm / official tokens/s = {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
