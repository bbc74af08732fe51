"""Training throughput: fastxlstm against the official xlstm 2.0.6 xLSTMLarge, side by side in one run.

The step, the same for every stage: forward under bf16 autocast (float32 master weights), float32
cross-entropy of the soft-capped logits against shifted random tokens, backward, the gradient clip
to norm 1.0, AdamW(lr 1e-4, betas (0.9, 0.95), wd 0.1), zero_grad; the same batch every step. Both
models get the same config, batch and update. The official model's optimizer is torch's fused AdamW
after clip_grad_norm_; ours is the one ``fastxlstm train`` uses, ``fastxlstm.optim.AdamW``, whose
``clip_and_step`` folds the clip into its update kernel (the same arithmetic; stage suffix
``torch-adamw``: torch's, for comparison). Ours computes the loss with the chunked LM-head loss
(``fastxlstm.loss``, no (B, T, vocab) logits; stage suffix ``fused``) or, for comparison, from the
full logits as the official model must (``logits``). Optional per stage: activation checkpointing per
block (``ac``) and torch.compile of each block (``compile``). The official model runs its TFLA kernel
(``chunkwise--triton_xl_chunk``) with float32 gates, since bf16 gates abort under triton 3.6.

MFU = 6 * N * tokens/s / 989.5e12 (H100/H200 SXM dense bf16 datasheet), N = parameters without the
input embedding (the LM head counted), the same formula for both; recomputation is not counted.

    python benchmarks/training.py --out OUT                        # one H200: every stage, ~4 minutes
    python benchmarks/training.py --preset tiny --device cpu --seq 64 --steps 2 --warmup 1 \\
        --official-kernel chunkwise--native_autograd --out OUT      # a CPU smoke run of the harness

FSDP2 scaling (``--fsdp``): the 1.3b preset sharded with ``fastxlstm.distributed.wrap`` exactly as
``fastxlstm train --parallel fsdp`` does (fully_shard per block and root, bf16 parameters, float32
reduction), BATCH x SEQ tokens per GPU. Run it once alone (one GPU: the plain model, no sharding)
and once under torchrun; scaling = tokens/s of N GPUs over tokens/s of one:

    python benchmarks/training.py --fsdp --stages "ours B4 fused" --out OUT/x1
    torchrun --standalone --nproc-per-node 2 benchmarks/training.py --fsdp --stages "ours B4 fused" --out OUT/x2

Every stage runs in turn in this process; one that fails (out of memory included) is reported and
the rest go on. Rows print as JSON lines and a table, and OUT/training.json is rewritten after every
stage, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastxlstm import distributed as dist  # noqa: E402
from fastxlstm.config import PRESETS  # noqa: E402
from fastxlstm.loss import lm_head_loss  # noqa: E402
from fastxlstm.model import XLSTMLarge  # noqa: E402
from fastxlstm.optim import AdamW  # noqa: E402
from fastxlstm.train_config import Parallel  # noqa: E402

PEAK_FLOPS = 989.5e12


@dataclass(frozen=True)
class Stage:
    impl: str                     # "ours" or "official"
    batch: int
    fused: bool = True            # ours: the chunked LM-head loss instead of the full logits
    ac: bool = False              # activation checkpointing per block
    compile: bool = False         # torch.compile, as fastxlstm train --compile in one process
    torch_adamw: bool = False     # ours with torch's fused AdamW and clip_grad_norm_, not fastxlstm.optim's

    @property
    def name(self) -> str:
        if self.impl == "official":
            return f"official B{self.batch}"
        return " ".join([f"ours B{self.batch}", "fused" if self.fused else "logits"] +
                        ["ac"] * self.ac + ["compile"] * self.compile + ["torch-adamw"] * self.torch_adamw)


# most telling first: a run cut short by its budget keeps the comparison and the memory goal
DEFAULT_STAGES = [Stage("ours", 4), Stage("official", 4), Stage("ours", 8), Stage("ours", 8, ac=True),
                  Stage("ours", 4, fused=False), Stage("ours", 4, compile=True), Stage("ours", 8, compile=True),
                  Stage("ours", 8, ac=True, compile=True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--stages", default=None,
                    help="comma-separated stage names (default: all of: "
                         + ", ".join(s.name for s in DEFAULT_STAGES) + "); any 'ours B<n> fused|logits [ac] [compile]'")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--official-kernel", default="chunkwise--triton_xl_chunk")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip stages that would start after this many seconds")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 over the torchrun world (plain model when alone)")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="the mLSTM chunk size for both models (default: the preset's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    stages = DEFAULT_STAGES if args.stages is None else [parse_stage(s) for s in args.stages.split(",")]
    env_d = dist.init(Parallel.FSDP if int(os.environ.get("WORLD_SIZE", "1")) > 1 else Parallel.NONE,
                      args.device) if args.fsdp else None
    device = env_d.device if env_d else torch.device(args.device)
    rank0 = env_d is None or env_d.is_rank0
    world = env_d.world_size if env_d else 1
    cfg = PRESETS[args.preset]
    if args.chunk_size is not None:
        cfg = dataclasses.replace(cfg, chunk_size=args.chunk_size)
    t0 = time.perf_counter()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "preset": args.preset, "chunk_size": cfg.chunk_size, "seq": args.seq, "world_size": world,
           "fsdp": bool(args.fsdp), "matmul_tflop_s": measured_matmul_tflops(device)}
    rows = []
    say = functools.partial(_say, rank0)
    say({"env": env})
    try:
        for st in stages:
            if time.perf_counter() - t0 > args.budget_s:
                rows.append({"stage": st.name, "skipped": "time budget spent"})
                say(rows[-1])
                continue
            rows.append(run_stage(st, cfg, args, device, world))
            say(rows[-1])
            if rank0 and args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "training.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
        if rank0:
            print_table(rows)
    finally:
        if env_d:
            dist.cleanup()
    return 0


def parse_stage(name: str) -> Stage:
    """'ours B8 fused ac' or 'ours_B8_fused_ac' (no spaces to quote in a shell)."""
    words = name.replace("_", " ").split()
    if len(words) == 2 and words[0] == "official" and words[1][:1] == "B":
        return Stage("official", int(words[1][1:]))
    if len(words) < 3 or words[0] != "ours" or words[1][:1] != "B" or words[2] not in ("fused", "logits") or \
            not set(words[3:]) <= {"ac", "compile", "torch-adamw"}:
        raise SystemExit(f"bad stage {name!r}: 'official B<n>' or 'ours B<n> fused|logits [ac] [compile] "
                         f"[torch-adamw]' (or with _)")
    return Stage("ours", int(words[1][1:]), fused=words[2] == "fused", ac="ac" in words, compile="compile" in words,
                 torch_adamw="torch-adamw" in words)


def run_stage(st: Stage, cfg, args, device, world: int) -> dict:
    row = {"stage": st.name, "impl": st.impl, "batch": st.batch, "seq": args.seq, "world_size": world,
           "tokens_per_step": world * st.batch * args.seq, "fused_loss": st.fused and st.impl == "ours",
           "activation_checkpointing": st.ac, "compile": st.compile}
    model = opt = x = y = None
    t_stage = time.perf_counter()
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = build_ours(cfg, st) if st.impl == "ours" else build_official(cfg, args.official_kernel)
        n_all = sum(p.numel() for p in model.parameters())
        n = n_all - model.embedding.weight.numel()           # counted before sharding: the whole model
        row.update(params=n_all, params_no_embedding=n)
        if world > 1:
            model = dist.wrap(model, Parallel.FSDP, device=device,
                              param_dtype=torch.bfloat16 if device.type == "cuda" else None)
        # ours: the optimizer fastxlstm train uses (the clip folded into the update on CUDA)
        adamw = AdamW if st.impl == "ours" and not st.torch_adamw else torch.optim.AdamW
        opt = adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
        rank = int(os.environ.get("RANK", "0"))
        gen = torch.Generator(device=device).manual_seed(1 + rank)       # each rank its own batch
        ids = torch.randint(0, cfg.vocab_size, (st.batch, args.seq + 1), device=device, generator=gen)
        x, y = ids[:, :-1], ids[:, 1:]
        step = functools.partial(train_step, model, opt, x, y, device, fused=st.impl == "ours" and st.fused,
                                 cap=cfg.output_logit_soft_cap)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_warm = time.perf_counter()
        for _ in range(args.warmup):
            loss = step()
        sync(device)
        row["warmup_s"] = round(time.perf_counter() - t_warm, 1)          # includes compile / kernel JIT
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(device)
        dt = (time.perf_counter() - start) / args.steps
        tps = world * st.batch * args.seq / dt
        row.update(ms_per_step=dt * 1e3, tokens_per_s=tps, tokens_per_s_per_gpu=tps / world,
                   mfu=6 * n * tps / world / PEAK_FLOPS, loss=float(loss))
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    except torch.OutOfMemoryError as e:
        row.update(oom=True, error=str(e).split("\n")[0][:300])
    except Exception as e:                                     # report and go on with the other stages
        row.update(error=f"{type(e).__name__}: {str(e)[:500]}")
    finally:
        row["stage_wall_s"] = round(time.perf_counter() - t_stage, 1)
        del model, opt, x, y
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def train_step(model, opt, x, y, device, *, fused: bool, cap: float) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if fused:
            h, _ = model.hidden_states(x)
            loss = lm_head_loss(h, model.lm_head.weight, y, soft_cap=cap)
        else:
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    if isinstance(opt, AdamW):
        opt.clip_and_step(1.0)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def build_ours(cfg, st: Stage):
    """As a single-process ``fastxlstm train`` builds it: checkpointing per block, then compile
    (the block stack as one graph)."""
    from fastxlstm.train import _checkpointed, compile_model
    model = XLSTMLarge(cfg)
    for block in model.backbone.blocks:
        if st.ac:
            block.forward = functools.partial(_checkpointed, block.forward)
    if st.compile:
        # a fresh Dynamo, as in a process of its own: after a stage of another batch size Dynamo's
        # automatic dynamic shapes would compile this stage's batch dimension as symbolic (checked on
        # the CPU; the B8 stage after the B4 one ran ~1 % slower than the same step alone, runs 96/104)
        torch._dynamo.reset()
        compile_model(model, whole_stack=True)
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


def measured_matmul_tflops(device) -> float | None:
    """This GPU's bf16 rate on an 8192^3 matmul: how fast the machine of the run is, beside the
    datasheet peak MFU counts against (H200s of one pool ran the same step 512-534 ms)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return round(2 * 8192 ** 3 * 10 / (time.perf_counter() - start) / 1e12, 1)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _say(rank0: bool, obj) -> None:
    if rank0:
        print(json.dumps(obj), flush=True)


def print_table(rows: list[dict]) -> None:
    print("\n| stage | GPUs | B×S per GPU | ms/step | tokens/s | MFU | peak GiB | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "tokens_per_s" in r:
            print(f"| {r['stage']} | {r['world_size']} | {r['batch']}×{r['seq']} | {r['ms_per_step']:.1f} | "
                  f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r.get('peak_gib', float('nan')):.1f} | "
                  f"loss {r['loss']:.3f}, warm-up {r['warmup_s']} s |")
        else:
            note = r.get("skipped") or ("OOM" if r.get("oom") else r.get("error"))
            print(f"| {r['stage']} | {r.get('world_size', '')} | {r.get('batch', '')}×{r.get('seq', '')} "
                  f"| – | – | – | – | {note} |")
    done = {r["stage"]: r for r in rows if "tokens_per_s" in r}
    for name, r in done.items():
        peer = done.get(f"official B{r['batch']}")
        if r["impl"] == "ours" and peer:
            print(f"{name}: {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x the official tokens/s")


if __name__ == "__main__":
    sys.exit(main())
