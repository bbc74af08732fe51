"""Generation benchmark: fastxlstm against the official xlstm 2.0.6 xLSTMLarge, side by side in one run.

One set of random bf16 weights (the xLSTM-7B shape by default) is shared by both models (our
parameter names are the official ones). Measured, each stage guarded by a time budget so a partial
run still reports what it finished:
  ceilings   device copy bandwidth (-> decode roofline: non-embedding weights + fp32 state read and
             written per step) and the bf16 matmul rate (-> prefill roofline 2 N_nonemb FLOP/token)
  fused      the fused decode step (generation/fused.py) vs model(token, state): logits, states,
             the extra weight memory, GPU kernels per step of each
  check      our prefill logits vs the official model's; CUDA-graph decode tokens == eager
  prefill    tokens/s at 1x2048 and 8x2048 (ours: generation.prefill; official: model(tokens))
  ttft       time to the first new token at prompts of 128, 8k and 32k tokens, batch 1
  decode     tokens/s at batch 1, 16, 64 after prompts of 128 and 8k: ours through generate()
             (CUDA graph, steps after warm-up/capture) with the fused step (the default) and
             without it (fused=False), the official model through its own generate() (batch 1)
             and with its step + argmax captured in a CUDA graph
  hf         transformers' xLSTMForCausalLM.generate with the same weights, and our bridge under it
  memory     allocated memory after 1k and after 16k generated tokens (ours, batch 1)

    python benchmarks/generation.py --out results/            # on a GPU, official xlstm installed
    python benchmarks/generation.py --shape tiny --device cpu  # a smoke run of the harness
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastxlstm.config import PRESETS, ModelConfig  # noqa: E402
from fastxlstm.generation import GenerationStats, generate, prefill  # noqa: E402
from fastxlstm.generation.fused import FusedStep  # noqa: E402
from fastxlstm.model import XLSTMLarge  # noqa: E402

SHAPES = {
    "7b": PRESETS["7b"],
    "tiny": ModelConfig(vocab_size=512, embedding_dim=128, num_heads=4, num_blocks=2, chunk_size=64),
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.t_start = time.perf_counter()
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.results: dict = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                              "shape": args.shape, "stages": {}}
        self.out = args.out

    # --- plumbing ---------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t_start)

    def stage(self, name, need_s, fn, *a):
        if self.args.stages and name.split("_after_")[0] not in self.args.stages and name not in ("env", "build"):
            return None
        if self.left() < need_s:
            self.results["stages"][name] = {"skipped": f"time budget ({self.left():.0f} s left, needs ~{need_s} s)"}
            print(f"[{name}] skipped: time", flush=True)
            return None
        t0 = time.perf_counter()
        try:
            r = fn(*a)
            self.results["stages"][name] = r
        except Exception as e:  # a failed stage is reported, the others still run
            r = None
            self.results["stages"][name] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        print(f"[{name}] {time.perf_counter() - t0:.1f} s: {json.dumps(self.results['stages'][name])}", flush=True)
        self.save()
        if self.cuda:
            torch.cuda.empty_cache()
        return r

    def save(self):
        if self.out:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "generation.json"), "w") as f:
                json.dump(self.results, f, indent=1)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn, reps=3, warmup=1):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]

    def tokens(self, B, T, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, self.cfg.vocab_size, (B, T), generator=g)

    # --- setup ------------------------------------------------------------------------------------
    def env(self):
        r = {"torch": torch.__version__, "device": str(self.device)}
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            r.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
            try:
                import triton
                r["triton"] = triton.__version__
            except ImportError:
                pass
        try:
            import xlstm
            r["xlstm"] = getattr(xlstm, "__version__", "installed")
        except ImportError:
            r["xlstm"] = None
        return r

    def build(self):
        self.cfg = SHAPES[self.args.shape]
        if self.args.chunk_size is not None:
            self.cfg = dataclasses.replace(self.cfg, chunk_size=self.args.chunk_size)
        dtype = getattr(torch, self.args.dtype)
        torch.manual_seed(0)
        self.official = None
        if not self.args.no_official:
            try:
                from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig
            except ImportError:
                print("official xlstm not installed: fastxlstm only", flush=True)
            else:
                c = self.cfg
                kernels = (dict(chunkwise_kernel=self.args.official_chunkwise, sequence_kernel="native_sequence__triton",
                                step_kernel="triton") if self.cuda else
                           dict(chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
                                step_kernel="native"))
                oc = xLSTMLargeConfig(embedding_dim=c.embedding_dim, num_heads=c.num_heads, num_blocks=c.num_blocks,
                                      vocab_size=c.vocab_size, ffn_proj_factor=c.ffn_proj_factor, mode="inference",
                                      return_last_states=True, chunk_size=c.chunk_size, **kernels)
                prev = torch.get_default_dtype()
                torch.set_default_dtype(dtype)
                try:
                    with self.device:
                        self.official = xLSTMLarge(oc).eval()
                finally:
                    torch.set_default_dtype(prev)
        with torch.device("meta"):
            self.ours = XLSTMLarge(self.cfg)
        if self.official is not None:           # the very same weight tensors: no second copy
            self.ours.load_state_dict(self.official.state_dict(), assign=True)
        else:
            self.ours = XLSTMLarge(self.cfg).to(device=self.device, dtype=dtype)
        self.ours.eval()
        n = self.ours.num_params()
        n_emb = self.ours.embedding.weight.numel()
        self.weight_bytes = (n - n_emb) * torch.finfo(dtype).bits // 8
        c = self.cfg
        self.state_bytes = 4 * c.num_blocks * c.num_heads * (c.qk_head_dim * c.v_head_dim + c.qk_head_dim + 1)
        self.n_nonemb = n - n_emb
        return {"params": n, "non_embedding_params": n - n_emb, "weight_gb_read_per_step": self.weight_bytes / 1e9,
                "state_mb_per_sequence": self.state_bytes / 1e6, "official": self.official is not None,
                "official_kernels": self.args.official_chunkwise if self.official is not None else None,
                "our_backend": self.ours.backend_for(self.device).value, "chunk_size": c.chunk_size}

    # --- ceilings ---------------------------------------------------------------------------------
    def ceilings(self):
        if not self.cuda:
            return {"note": "no ceilings on the CPU"}
        x = torch.empty(2**30, dtype=torch.bfloat16, device=self.device)   # 2 GiB
        y = torch.empty_like(x)
        t = self.timed(lambda: y.copy_(x), reps=10, warmup=3)
        bw = 2 * x.numel() * 2 / t
        del x, y
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=self.device)
        b = torch.randn_like(a)
        t = self.timed(lambda: a @ b, reps=10, warmup=3)
        flops = 2 * 8192**3 / t
        self.bw, self.flops = bw, flops
        rl = {B: B / ((self.weight_bytes + 2 * B * self.state_bytes) / bw) for B in (1, 16, 64)}
        return {"copy_tb_s": bw / 1e12, "matmul_tflop_s": flops / 1e12,
                "decode_roofline_tok_s": {str(k): round(v, 1) for k, v in rl.items()},
                "prefill_roofline_tok_s": flops / (2 * self.n_nonemb)}

    # --- checks -----------------------------------------------------------------------------------
    def check(self):
        r = {}
        ids = self.tokens(1, 300, seed=1).to(self.device)
        with torch.inference_mode():
            ours, _ = self.ours(ids)
            if self.official is not None:
                off, _ = self.official(ids)
                off = off.float()
                r["prefill_logits_rel_l2_vs_official"] = ((ours - off).norm() / off.norm()).item()
                r["prefill_argmax_agreement"] = (ours.argmax(-1) == off.argmax(-1)).float().mean().item()
        if self.cuda:
            p = self.tokens(2, 70, seed=2).tolist()
            g = generate(self.ours, p, max_new_tokens=9, eos_token_id=None, cuda_graph=True)
            e = generate(self.ours, p, max_new_tokens=9, eos_token_id=None, cuda_graph=False)
            r["graph_tokens_equal_eager"] = g == e
            kw = dict(max_new_tokens=9, eos_token_id=None, temperature=0.8, top_k=50, top_p=0.95, seed=[1, 2])
            r["graph_sampled_tokens_equal_eager"] = (generate(self.ours, p, cuda_graph=True, **kw)
                                                     == generate(self.ours, p, cuda_graph=False, **kw))
        return r

    def fused_check(self):
        """One decode step after a 70-token prompt: the fused step against model(token, state)."""
        ids = self.tokens(1, 71, seed=8).to(self.device)            # batch 1: the decode stage reuses its compile
        with torch.inference_mode():
            _, state = self.ours(ids[:, :70])
            ref, ref_state = self.ours(ids[:, 70:], state)
            step = FusedStep(self.ours)
            out, out_state = step(ids[:, 70:], state)
            rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
            r = {"fused_step_logits_rel_l2_vs_model": rel(out, ref),
                 "fused_step_argmax_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                 "fused_step_state_c_rel_l2_vs_model": max(rel(a.c, b.c) for a, b in zip(out_state, ref_state)),
                 "fused_extra_weight_gib": step.extra_bytes / 2**30}
            if self.cuda:
                step(ids[:, 70:], state)                        # compiled by now: count the kernels of a step
                r["kernels_per_step_fused"] = self.kernels(lambda: step(ids[:, 70:], state))
                r["kernels_per_step_model"] = self.kernels(lambda: self.ours(ids[:, 70:], state))
        del step
        return r

    def kernels(self, fn):
        """GPU kernels launched by fn (torch.profiler; None where it is unavailable)."""
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                self.sync()
            return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        except Exception as e:  # a diagnostic only
            return f"{type(e).__name__}: {e}"

    # --- prefill and time to first token --------------------------------------------------------------
    def prefill_bench(self):
        r = {}
        for B, T in ((1, 2048), (8, 2048)):
            ids = self.tokens(B, T, seed=3)
            rows = ids.tolist()
            t = self.timed(lambda: prefill(self.ours, rows), reps=3)
            row = {"ours_tok_s": B * T / t}
            if self.official is not None:
                dev_ids = ids.to(self.device)

                def off():
                    with torch.inference_mode():
                        self.official(dev_ids)
                to = self.timed(off, reps=3)
                row["official_tok_s"] = B * T / to
                row["ratio"] = to / t
            r[f"{B}x{T}"] = row
        return r

    def ttft(self):
        r = {}
        for T in self.args.ttft_lengths:
            if self.left() < 20:
                r[str(T)] = "skipped: time"
                continue
            prompt = self.tokens(1, T, seed=4)
            rows = prompt.tolist()

            def ours():
                stats = GenerationStats()
                generate(self.ours, rows, max_new_tokens=1, eos_token_id=None, stats=stats)
                return stats.first_token_s
            ours()
            t = sorted(ours() for _ in range(3))[1]
            row = {"ours_s": t}
            if self.official is not None:
                def off():
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        logits, _ = self.official(prompt.to(self.device))
                        logits[:, -1].argmax(-1).cpu()
                    return time.perf_counter() - t0
                off()
                to = sorted(off() for _ in range(3))[1]
                row.update(official_s=to, ratio=to / t)
            r[str(T)] = row
        return r

    # --- decode -----------------------------------------------------------------------------------
    def decode(self, T, batches):
        r = {}
        for B in batches:
            if self.left() < 15 + B * T / 20000:
                r[str(B)] = "skipped: time"
                continue
            prompts = self.tokens(B, T, seed=5).tolist()
            steps = self.args.decode_steps
            stats = GenerationStats()
            row = {}
            try:
                generate(self.ours, prompts, max_new_tokens=1 + 1 + steps, eos_token_id=None, stats=stats)
            except Exception as e:       # keep an eager figure rather than none
                traceback.print_exc()
                row["ours_graph_error"] = f"{type(e).__name__}: {e}"
                stats = GenerationStats()
                generate(self.ours, prompts, max_new_tokens=1 + 16, eos_token_id=None, stats=stats, cuda_graph=False)
                row["ours_eager"] = True
            row.update({"ours_tok_s": stats.decode_tokens_per_s, "ours_step_ms": 1e3 * stats.decode_s / stats.decode_steps,
                   "ours_capture_s": stats.capture_s, "ours_peak_gib": stats.peak_memory / 2**30})
            if self.cuda and not self.args.no_unfused:       # the same decode through model(token, state)
                plain = GenerationStats()
                generate(self.ours, prompts, max_new_tokens=1 + 1 + steps, eos_token_id=None, stats=plain,
                         fused=False)
                row.update(ours_unfused_tok_s=plain.decode_tokens_per_s,
                           ours_unfused_step_ms=1e3 * plain.decode_s / plain.decode_steps,
                           fused_speedup=stats.decode_tokens_per_s / plain.decode_tokens_per_s)
            if B == 1:
                self.b1_rate = stats.decode_tokens_per_s
            if self.cuda and hasattr(self, "bw"):
                roof = B / ((self.weight_bytes + 2 * B * self.state_bytes) / self.bw)
                row["ours_fraction_of_roofline"] = stats.decode_tokens_per_s / roof
            if self.official is not None and self.cuda:
                tps, peak = self.official_graph_decode(prompts, steps)
                row.update(official_graph_tok_s=tps, official_graph_peak_gib=peak,
                           ratio_vs_official_graph=stats.decode_tokens_per_s / tps)
                if B == 1 and T == self.args.decode_prompts[0]:
                    row["official_generate_tok_s"] = self.official_generate(prompts, 32)
            r[str(B)] = row
        return r

    def official_graph_decode(self, prompts, steps):
        """The official forward step + argmax captured in a CUDA graph over its (in-place) state."""
        model = self.official
        ids = torch.tensor(prompts, device=self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            tok, state = self.official_prefill(ids)

            def body():
                out, _ = model(tok, state)          # the official stack copies the new state into `state`
                tok.copy_(out[:, -1:].argmax(-1))

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
            g.replay()
            self.sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                g.replay()
            self.sync()
            dt = time.perf_counter() - t0
        del g, state
        return len(prompts) * steps / dt, torch.cuda.max_memory_allocated(self.device) / 2**30

    def official_prefill(self, ids):
        """The official forward over row groups (its full bf16 logits of 64 x 8k tokens would not fit);
        returns the greedy next token (B, 1) and the joined state dict."""
        rows = max(1, 65536 // ids.shape[1])
        toks, states = [], []
        for a in range(0, ids.shape[0], rows):
            logits, st = self.official(ids[a:a + rows])
            toks.append(logits[:, -1:].argmax(-1))
            states.append(st)
            del logits
        state = {k: tuple(torch.cat([s[k][j] for s in states]) for j in range(3)) for k in states[0]}
        return torch.cat(toks), state

    def official_generate(self, prompts, n):
        ids = torch.tensor(prompts, device=self.device)
        with torch.inference_mode():
            self.official.generate(ids, max_length=4)
            self.sync()
            t0 = time.perf_counter()
            self.official.generate(ids, max_length=n)
            self.sync()
            t_all = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.official(ids)
            self.sync()
            t_prefill = time.perf_counter() - t0
        return len(prompts) * n / max(t_all - t_prefill, 1e-9)

    # --- transformers ------------------------------------------------------------------------------
    def transformers_generate(self):
        """transformers' own xLSTMForCausalLM.generate (same weights) and our bridge under it, greedy,
        prompt 128, 32 new tokens; tokens/s of the decode (the prefill forward's time subtracted)."""
        import transformers

        from fastxlstm.hf import hf_config, to_hf

        hc = hf_config(self.cfg)
        if self.official is not None and self.cuda:     # what a user with the xlstm package gets
            hc.chunkwise_kernel, hc.sequence_kernel, hc.step_kernel = (
                "chunkwise--triton_limit_chunk", "native_sequence__triton", "triton")
        with torch.device("meta"):
            ref = transformers.xLSTMForCausalLM(hc)
        sd = {("backbone.embeddings.weight" if k == "embedding.weight" else k): v
              for k, v in self.ours.state_dict().items()}
        ref.load_state_dict(sd, assign=True)
        ref.eval()
        r = {"transformers": transformers.__version__, "xlstm_package": self.official is not None,
             "kernels": [hc.chunkwise_kernel, hc.sequence_kernel, hc.step_kernel]}
        for name, model in (("transformers_xLSTMForCausalLM", ref), ("fastxlstm_hf_bridge", to_hf(self.ours))):
            for B in (1, 16):
                if self.left() < 15:
                    r[f"{name}_B{B}"] = "skipped: time"
                    continue
                ids = self.tokens(B, 128, seed=7).to(self.device)
                with torch.inference_mode():
                    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
                    self.sync()
                    t0 = time.perf_counter()
                    model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                    self.sync()
                    t_all = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    model(ids)
                    self.sync()
                    t_pre = time.perf_counter() - t0
                r[f"{name}_B{B}_tok_s"] = B * 32 / max(t_all - t_pre, 1e-9)
        del ref
        return r

    # --- memory vs generated length -----------------------------------------------------------------
    def memory(self):
        if not self.cuda:
            return {"note": "CUDA memory only"}
        n = self.args.memory_tokens
        rate = getattr(self, "b1_rate", 250.0)
        while n > 2048 and n / rate > self.left() - 10:      # as many tokens as the time left allows
            n //= 2
        stats = GenerationStats()
        generate(self.ours, self.tokens(1, 128, seed=6).tolist(), max_new_tokens=n, eos_token_id=None, stats=stats)
        mem = stats.memory_allocated
        return {"allocated_after_1k_gib": mem.get(1024, 0) / 2**30, f"allocated_after_{n}_gib": mem[n] / 2**30,
                "equal": mem.get(1024) == mem[n], "decode_tok_s": stats.decode_tokens_per_s}

    def run(self):
        self.stage("env", 0, self.env)
        if self.stage("build", 0, self.build) is None:
            return self.results
        self.stage("ceilings", 10, self.ceilings)
        self.stage("fused", 15, self.fused_check)
        self.stage("check", 15, self.check)
        self.stage("prefill", 20, self.prefill_bench)
        self.stage(f"decode_after_{self.args.decode_prompts[0]}", 20, self.decode, self.args.decode_prompts[0],
                   self.args.batches)
        self.stage("ttft", 20, self.ttft)
        if not self.args.no_transformers:
            self.stage("transformers", 25, self.transformers_generate)
        # the state has a fixed size, so a long prompt changes no decode step: the cheap batches first
        small = [b for b in self.args.batches if b <= 16]
        for T in self.args.decode_prompts[1:]:
            self.stage(f"decode_after_{T}", 25, self.decode, T, small)
        self.stage("memory", 2048 / getattr(self, "b1_rate", 250.0) + 10, self.memory)
        for T in self.args.decode_prompts[1:]:
            big = [b for b in self.args.batches if b > 16]
            if big:
                self.stage(f"decode_after_{T}_large_batch", 40, self.decode, T, big)
        return self.results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None, help="directory for generation.json")
    p.add_argument("--budget-s", type=float, default=200.0, help="stop starting stages after this long")
    p.add_argument("--no-official", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--official-chunkwise", default="chunkwise--triton_limit_chunk",
                   help="official chunkwise kernel (xl_chunk with bf16 gates aborts under triton 3.6)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="the mLSTM chunk size of both models' prefill (default: the shape's config)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--decode-prompts", type=int, nargs="+", default=[128, 8192])
    p.add_argument("--decode-steps", type=int, default=128)
    p.add_argument("--ttft-lengths", type=int, nargs="+", default=[128, 8192, 32768])
    p.add_argument("--memory-tokens", type=int, default=16384)
    p.add_argument("--no-unfused", action="store_true", help="skip our unfused decode (fused=False) rows")
    p.add_argument("--stages", nargs="+", default=None,
                   help="run only these stages (ceilings fused check prefill decode ttft transformers memory)")
    args = p.parse_args(argv)
    results = Bench(args).run()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
