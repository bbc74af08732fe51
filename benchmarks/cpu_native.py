"""CPU throughput of a small xLSTM-Large: fastxlstm native vs the official xlstm package's native
kernels, same weights, side by side in one process. Appends a dated section to RESULTS.md.

    python benchmarks/cpu_native.py [--embedding-dim 256 --blocks 4 --batch 4 --seq 512 --reps 5]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from fastxlstm import ModelConfig, XLSTMLarge


def official_model(cfg: ModelConfig):
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    return xLSTMLarge(xLSTMLargeConfig(
        embedding_dim=cfg.embedding_dim, num_heads=cfg.num_heads, num_blocks=cfg.num_blocks,
        vocab_size=cfg.vocab_size, chunk_size=cfg.chunk_size, mode="train", return_last_states=True,
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native", autocast_kernel_dtype="float32", ffn_proj_factor=cfg.ffn_proj_factor))


def interleaved_median_ms(fns: list, reps: int) -> list[float]:
    """Median ms of each fn, alternating between them every rep so load changes hit all alike."""
    for fn in fns:
        fn()                                               # warm-up
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embedding-dim", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50304, embedding_dim=args.embedding_dim, num_heads=args.heads,
                      num_blocks=args.blocks, chunk_size=64)
    ours = XLSTMLarge(cfg)
    official = official_model(cfg)
    official.load_state_dict(ours.state_dict())
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def fwd(model):
        def run():
            with torch.no_grad():
                first(model(x))
        return run

    def fwd_bwd(model):
        def run():
            model.zero_grad(set_to_none=True)
            first(model(x)).float().logsumexp(-1).mean().backward()
        return run

    models = {"fastxlstm native": ours, "xlstm 2.0.6 native_autograd": official}
    f_ms = interleaved_median_ms([fwd(m) for m in models.values()], args.reps)
    fb_ms = interleaved_median_ms([fwd_bwd(m) for m in models.values()], args.reps)
    rows = list(zip(models, f_ms, fb_ms))
    tokens = args.batch * args.seq
    date = datetime.date.today().isoformat()
    cmd = (f"python benchmarks/cpu_native.py --embedding-dim {args.embedding_dim} --blocks {args.blocks} "
           f"--heads {args.heads} --batch {args.batch} --seq {args.seq} --reps {args.reps}")
    lines = [f"\n## CPU native path vs the official native kernels ({date})\n",
             f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; command: `{cmd}`",
             f"- model: xLSTM-Large E={cfg.embedding_dim}, {cfg.num_blocks} blocks, {cfg.num_heads} heads, "
             f"vocab {cfg.vocab_size}, chunk 64, float32; batch {args.batch}x{args.seq}; median of {args.reps}\n",
             "| implementation | fwd ms | fwd tokens/s | fwd+bwd ms | fwd+bwd tokens/s |", "| --- | --- | --- | --- | --- |"]
    for name, fwd, fb in rows:
        lines.append(f"| {name} | {fwd:.1f} | {tokens / fwd * 1e3:,.0f} | {fb:.1f} | {tokens / fb * 1e3:,.0f} |")
    (_, f0, b0), (_, f1, b1) = rows
    lines.append(f"\nfastxlstm / official speed: forward {f1 / f0:.2f}x, forward+backward {b1 / b0:.2f}x\n")
    text = "\n".join(lines)
    print(text)
    with open(args.results, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
