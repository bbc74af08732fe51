"""Training: ``train(model_cfg, train_cfg)`` runs the loop the ``fastxlstm train`` command runs.

AdamW with weight-decay groups (``optim.AdamW``: on CUDA the gradient clip folded into the update),
linear warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast on CUDA (fp32
master weights) and fp32 on the CPU, optional activation checkpointing, torch.compile and carried
(stateful) recurrent state; DDP or FSDP2 under torchrun. The loss is computed from the final hidden
states in row chunks (``loss.lm_head_loss``), never holding the (B, T, vocab) logits (under DDP,
from the logits of its forward). Validation loss and bits per byte at fixed windows, with a sample.
A tqdm bar, metrics as JSON lines, a loss-curve PNG at the end.

Nothing is lost: resumable checkpoints (weights loadable by ``fastxlstm.load``, optimizer,
scheduler, step, RNG states, data position) are written to a temporary directory and renamed, the
last ``keep_last`` are kept, a manifest of sizes and SHA-256 sums names any corrupt file on resume,
and SIGINT/SIGTERM save one and exit (the on-disk layout: ``train_state.py``). On the CPU, N steps straight and N/2 + resume + N/2 give
bit-identical weights.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import distributed as dist
from . import train_state as ckpt
from .checkpoint import ARCHITECTURES
from .checkpoint import save as save_model
from .config import PRESETS, ModelConfig
from .data import Batches, Dataset, eval_windows, load_data, windows
from .loss import lm_head_loss
from .optim import AdamW
from .tokenizer import HFTokenizer
from .train_config import Parallel, TrainConfig

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PLOT = "loss.png"
# consecutive steps with non-finite gradients (each skipped by optim.AdamW) after which training stops
MAX_SKIPPED_STREAK = 20


@dataclass(frozen=True)
class TrainResult:
    """What a run did."""

    out: Path
    step: int
    """The step reached (the checkpoint's step when interrupted)."""
    first_val_loss: float | None
    """Validation loss at step 0 (None for a resumed run)."""
    val_loss: float | None
    """Validation loss at the end (None when interrupted)."""
    sample: str | None
    interrupted_by: str | None
    """'SIGINT' or 'SIGTERM' when a signal stopped the run, else None."""


def train(model_cfg: ModelConfig, cfg: TrainConfig) -> TrainResult:
    """Train ``model_cfg`` as ``cfg`` says (under torchrun: on this rank, with the others)."""
    env = dist.init(cfg.parallel, cfg.device)
    try:
        return _Run(model_cfg, cfg, env).run()
    finally:
        dist.cleanup()


def resolve_configs(preset: str | None, model_overrides: dict, train_overrides: dict,
                    config_file: str | None = None, arch: str | None = None) -> tuple[object, TrainConfig]:
    """Configs of a run from a preset, a JSON/TOML file ({"arch", "preset", "model": {...}, "train": {...}})
    and explicit overrides, in rising precedence. ``arch`` is xlstm_large (the default; presets apply)
    or xlstm_stack (the original mLSTM/sLSTM stack: StackConfig fields, byte vocabulary by default).
    With ``resume``, the checkpoint's own configs take the place of the preset and the defaults, so
    ``--resume`` alone continues the same run."""
    file = _read_config_file(config_file) if config_file else {}
    train_d = {**file.get("train", {}), **train_overrides}
    model_d = {**file.get("model", {}), **model_overrides}
    preset = preset or file.get("preset")
    arch = arch or file.get("arch")
    resume = train_d.get("resume")
    if resume:
        out = TrainConfig.from_dict({k: v for k, v in train_d.items() if k == "out"}).out
        path = ckpt.find_checkpoint(out, resume)
        ckpt.verify_checkpoint(path, hashes=False)           # sizes only here; the run checks the sums too
        saved_train = json.loads((path / ckpt.TRAIN_CONFIG).read_text())
        saved = json.loads((path / "config.json").read_text())
        if arch and arch != saved["architecture"]:
            raise ValueError(f"checkpoint {path} holds an {saved['architecture']} model, not {arch}")
        base = _model_base(saved["architecture"], preset) if preset else saved["config"]
        cfg_cls = _arch(saved["architecture"])[0]
        return (cfg_cls.from_dict({**base, **model_d}),
                TrainConfig.from_dict({**saved_train, **train_d, "resume": str(path)}))
    arch = arch or "xlstm_large"
    return _arch(arch)[0].from_dict({**_model_base(arch, preset), **model_d}), TrainConfig.from_dict(train_d)


def model_class(model_cfg) -> type:
    """The model class of a config (XLSTMLarge for ModelConfig, XLSTMStackLM for StackConfig)."""
    for cfg_cls, model_cls in ARCHITECTURES.values():
        if type(model_cfg) is cfg_cls:
            return model_cls
    raise TypeError(f"no model architecture takes a {type(model_cfg).__name__}")


# --- the run -------------------------------------------------------------------------------------

class _Run:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, env: dist.DistEnv):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out)
        self.data: Dataset = load_data(cfg)
        if self.data.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"the data has a vocabulary of {self.data.vocab_size} ids but the model's vocab_size "
                             f"is {model_cfg.vocab_size}: pass --vocab-size {self.data.vocab_size} or another preset")
        self.model_cfg = model_cfg
        dev = env.device
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
        self.batches = Batches(self.data.train, cfg, rank=env.rank, world=env.world_size)
        self.val_starts = eval_windows(self.data.val, cfg, rank=env.rank, world=env.world_size)
        torch.manual_seed(cfg.seed)
        self.model_cls = model_class(model_cfg)
        if (cfg.stateful or cfg.document_end_id is not None) and not hasattr(model_cfg, "num_heads"):
            raise ValueError("stateful and packed-document (document_end_id) training are implemented for the "
                             "xlstm_large architecture only")
        if cfg.document_end_id is not None and cfg.document_end_id >= model_cfg.vocab_size:
            raise ValueError(f"document_end_id {cfg.document_end_id} is not a token id of a vocabulary of "
                             f"{model_cfg.vocab_size}")
        with torch.device(dev):
            model = self.model_cls(model_cfg)
        self.inner = model                               # the plain module: names, config, sampling
        if cfg.activation_checkpointing:
            for block in dist.blocks_of(model):
                block.forward = functools.partial(_checkpointed, block.forward)
        if cfg.compile:
            compile_model(model, whole_stack=cfg.parallel is Parallel.NONE)
        self.model = dist.wrap(model, cfg.parallel, device=dev,
                               param_dtype=torch.bfloat16 if self.bf16 and dev.type == "cuda" else None)
        # the loss from hidden states, chunked, never the (B, T, vocab) logits; not under DDP, whose
        # gradient hooks are armed by its forward() only
        self.fused_loss = hasattr(model, "hidden_states") and cfg.parallel is not Parallel.DDP
        self.optimizer = _adamw(self.model, cfg, fused=dev.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.max_steps,
                                              min_ratio=cfg.min_lr_ratio))
        self.step = 0
        self.carry: list | None = [None] * cfg.grad_accum if cfg.stateful else None
        self.records: list[dict] = []
        self.skipped_reported = 0                        # steps skipped for non-finite gradients, told so far
        self.stop_signal: int | None = None
        self.tb = None                                   # the TensorBoard writer, from run() on
        # its class now: a missing package fails before anything runs
        self.tb_class = _tensorboard_writer_class() if cfg.tensorboard and env.is_rank0 else None

    # -- main loop --

    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        if env.is_rank0:
            self.out.mkdir(parents=True, exist_ok=True)
        first_val = None
        if cfg.resume:
            self._resume(Path(cfg.resume))
        if self.tb_class is not None:                    # a resumed run drops the events logged after its checkpoint
            self.tb = self.tb_class(log_dir=str(self.out / TENSORBOARD),
                                     purge_step=self.step + 1 if cfg.resume else None)
        n_all = sum(p.numel() for p in self.inner.parameters())
        self._print(f"fastxlstm train: {self.model_cls.__name__}, {n_all:,} parameters "
                    f"({n_all - self.inner.embedding.weight.numel():,} without the embedding) on "
                    f"{env.world_size} x {env.device.type}, {'bf16 autocast' if self.bf16 else 'fp32'}"
                    f"{', ' + cfg.parallel.value if cfg.parallel is not Parallel.NONE else ''}; "
                    f"{self.data.describe()}; {cfg.batch_size} x {cfg.seq_len} tokens per step; "
                    f"run directory {self.out}")
        if self.step == 0:
            first_val = self._evaluate()
            self._log({"step": 0, "loss": self._initial_train_loss(), **first_val})
            first_val = first_val["val_loss"]
        handlers = self._install_signal_handlers()
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (env.is_rank0 and cfg.progress))
        self.bar = bar
        tokens_per_step = cfg.batch_size * cfg.seq_len
        t_last, step_last, saved_at = time.perf_counter(), self.step, None
        val = None
        try:
            while self.step < cfg.max_steps and self.stop_signal is None:
                loss, grad_norm = self._train_step()
                self.step += 1
                bar.update(1)
                self._agree_on_stop()
                last = self.step == cfg.max_steps
                evaluate = last or (cfg.eval_every and self.step % cfg.eval_every == 0)
                if evaluate or self.step % cfg.log_every == 0 or self.stop_signal is not None:
                    loss = dist.all_reduce(loss.detach().float().clone()).item() / env.world_size
                    now = time.perf_counter()
                    tps = (self.step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
                    record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm), "tokens": self.step * tokens_per_step,
                              "tokens_per_s": tps}
                    skipped = self._report_skipped_steps()
                    if skipped:
                        record["skipped_steps"] = skipped
                    if evaluate:
                        val = self._evaluate()
                        record.update(val)
                    self._log(record)
                    self._stop_if_diverged()
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                    if evaluate and not last:
                        self._show_sample()
                    t_last, step_last = time.perf_counter(), self.step
                if last or self.stop_signal is not None or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                    self._save_checkpoint()
                    saved_at = self.step
                if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step and not last:
                    if saved_at != self.step:
                        self._save_checkpoint()
                    break
        finally:
            bar.close()
            self._restore_signal_handlers(handlers)
            if self.tb is not None:
                self.tb.close()
        interrupted = signal.Signals(self.stop_signal).name if self.stop_signal is not None else None
        sample = None
        if interrupted:
            self._print(f"{interrupted}: saved a checkpoint at step {self.step} in {self.out / ckpt.CKPT_DIR}; "
                        f"continue with: fastxlstm train --out {self.out} --resume")
        elif self.step >= cfg.max_steps:
            self._save_final_model()
            sample = self._show_sample(final=True)
        if env.is_rank0:
            _plot(self.out)
        return TrainResult(self.out, self.step, first_val, val["val_loss"] if val and not interrupted else None,
                           sample, interrupted)

    def _train_step(self):
        cfg, model = self.cfg, self.model
        total = torch.zeros((), device=self.env.device)
        for a in range(cfg.grad_accum):
            x, y = self.batches.micro_batch(self.step, a)
            x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
            with self._grad_sync(a == cfg.grad_accum - 1), self._autocast():
                loss, state = self._loss(model, x, y, self.carry[a] if self.carry is not None else None,
                                         fused=self.fused_loss)
                (loss / cfg.grad_accum).backward()
            if self.carry is not None:
                self.carry[a] = [type(s)(*(t.detach() for t in s)) for s in state]
            total += loss.detach() / cfg.grad_accum
        grad_norm = self.optimizer.clip_and_step(cfg.grad_clip or math.inf)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def _report_skipped_steps(self) -> int:
        """Steps skipped so far for non-finite gradients (the optimizer counts them on the device;
        read at a log, where the host waits for the loss anyway), new ones reported."""
        if self.optimizer.skipped_steps is None:
            return 0
        total = int(self.optimizer.skipped_steps)
        if total > self.skipped_reported:
            self._print(f"step {self.step}: {total - self.skipped_reported} step(s) since the last log had "
                        f"non-finite gradients; their updates were skipped, the weights are unchanged by them")
            self.skipped_reported = total
        return total

    def _stop_if_diverged(self) -> None:
        """A run of MAX_SKIPPED_STREAK skipped steps stops training with an error that says what to do."""
        streak = int(self.optimizer.skipped_streak) if self.optimizer.skipped_streak is not None else 0
        if streak >= MAX_SKIPPED_STREAK:
            raise RuntimeError(
                f"training diverged: the last {streak} steps (to step {self.step}) all had non-finite gradients "
                f"and were skipped. Lower the learning rate (--lr, now {self.cfg.lr:g}) or check the data; the "
                f"weights are those of step {self.step - streak}, checkpoints are in {self.out / ckpt.CKPT_DIR}")

    def _loss(self, model, x, y, state=None, *, fused: bool, reduction: str = "mean"):
        """Cross-entropy of next tokens ``y`` (float32) and the state after ``x``: from the hidden
        states with the chunked LM-head loss (``fused``), else from the logits. With packed documents
        the batch runs as one (1, B*T) row whose state restarts at every row start and after every
        document_end_id."""
        entry = model.hidden_states if fused else model
        B, T = x.shape
        if self.cfg.document_end_id is None:
            out, state = entry(x, state)
        else:
            flat = x.reshape(1, B * T)
            out, state = entry(flat, cu_seqlens=document_offsets(flat[0], T, self.cfg.document_end_id))
            out, state = out.view(B, T, -1), None
        if fused:
            head = self.inner.lm_head.weight                 # unsharded here: FSDP hooks hidden_states too
            cap = getattr(self.model_cfg, "output_logit_soft_cap", None)
            return lm_head_loss(out, head, y, soft_cap=cap, reduction=reduction), state
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction=reduction), state

    def _grad_sync(self, sync: bool):
        """Reduce gradients across ranks only on the last micro-step."""
        if self.cfg.parallel is Parallel.DDP and not sync:
            return self.model.no_sync()
        if self.cfg.parallel is Parallel.FSDP:
            self.model.set_requires_gradient_sync(sync)
        return nullcontext()

    def _autocast(self):
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # -- evaluation and samples --

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Mean validation loss (nats per token) over the fixed windows of all ranks, and bits per byte."""
        cfg, model = self.cfg, dist.unwrap(self.model)
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        micro = self.batches.micro
        for lo in range(0, len(self.val_starts), micro):
            x, y = windows(self.data.val, self.val_starts[lo:lo + micro], cfg.seq_len)
            with self._autocast():
                loss, _ = self._loss(model, x.to(self.env.device), y.to(self.env.device),
                                     fused=hasattr(model, "hidden_states"), reduction="sum")
            total[0] += loss.double()
            total[1] += y.numel()
        model.train()
        loss = (dist.all_reduce(total)[0] / total[1]).item()
        out = {"val_loss": loss}
        if self.data.bytes_per_token:
            out["val_bpb"] = loss / math.log(2) / self.data.bytes_per_token
        return out

    @torch.no_grad()
    def _initial_train_loss(self) -> float:
        """The loss of step 0's batch before any update (the first point of the training curve)."""
        model, total = dist.unwrap(self.model), torch.zeros((), device=self.env.device)
        for a in range(self.cfg.grad_accum):
            x, y = self.batches.micro_batch(0, a)
            with self._autocast():
                loss, _ = self._loss(model, x.to(self.env.device), y.to(self.env.device),
                                     fused=hasattr(model, "hidden_states"))
            total += loss
        return dist.all_reduce(total / self.cfg.grad_accum).item() / self.env.world_size

    def _show_sample(self, final: bool = False) -> str | None:
        cfg, tok = self.cfg, self.data.tokenizer
        if not cfg.sample_tokens or tok is None:
            return None
        text = sample(dist.unwrap(self.model), tok, cfg.sample_prompt, cfg.sample_tokens,
                      temperature=cfg.temperature, seed=cfg.seed, autocast=self._autocast,
                      world_size=self.env.world_size)
        head = "sample" if final else f"sample at step {self.step}"
        self._print(f"--- {head} (temperature {cfg.temperature}) ---\n{text}\n---")
        return text

    # -- checkpoints --

    def _save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step_N atomically (temp dir, then rename); keep the last keep_last."""
        env, cfg = self.env, self.cfg
        weights = self._plain_model()                    # collectives: every rank takes part
        optim_state = dist.optimizer_state_dict(self.model, self.optimizer)
        tmp = None
        if env.is_rank0:
            tmp = ckpt.staging_dir(self.out / ckpt.CKPT_DIR, self.step)
            save_model(weights, tmp)
            state = {"step": self.step, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                     "rng": ckpt.rng_state(), "data": {"next_step": self.step, "seed": cfg.seed,
                                                       "sampler": "stateful" if cfg.stateful else "random"},
                     "world_size": env.world_size}
            torch.save(state, tmp / ckpt.TRAINER_STATE)
            _write_config(tmp / ckpt.TRAIN_CONFIG, cfg)
        tmp = dist.broadcast_object(tmp)
        if self.carry is not None:                       # each rank's carried recurrent state
            torch.save([[tuple(t.cpu() for t in s) for s in c] if c is not None else None for c in self.carry],
                       tmp / f"carry_rank{env.rank}.pt")
        dist.barrier()
        final = ckpt.publish(tmp, self.step, cfg.keep_last) if env.is_rank0 else None
        dist.barrier()
        return final

    def _resume(self, path: Path) -> None:
        env = self.env
        error = None
        if env.is_rank0:
            try:
                ckpt.verify_checkpoint(path)
            except RuntimeError as e:
                error = str(e)
        error = dist.broadcast_object(error)
        if error:
            raise RuntimeError(error)
        saved = json.loads((path / "config.json").read_text())["config"]
        ours = json.loads(json.dumps(self.model_cfg.to_dict()))
        if saved != ours:
            diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
            raise ValueError(f"checkpoint {path} holds another model: " +
                             ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in diff.items()))
        state = torch.load(path / ckpt.TRAINER_STATE, map_location="cpu", weights_only=True)
        dist.load_full_state_dict(self.model, load_file(path / "model.safetensors"))
        dist.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        if self.carry is not None:
            carry_file = path / f"carry_rank{env.rank}.pt"
            if not carry_file.is_file():
                raise RuntimeError(f"checkpoint {path} has no carried state for rank {env.rank} "
                                   f"(saved with stateful off, or with another world size)")
            from .ops import MLSTMState
            saved_carry = torch.load(carry_file, map_location="cpu", weights_only=True)
            self.carry = [[MLSTMState(*(t.to(env.device) for t in s)) for s in c] if c is not None else None
                          for c in saved_carry]
        if env.is_rank0:                                 # drop metrics logged after the checkpoint
            metrics = self.out / METRICS
            if metrics.is_file():
                kept = [line for line in metrics.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= self.step]
                ckpt.atomic_text(metrics, "".join(line + "\n" for line in kept))
        self._print(f"resumed from {path} at step {self.step}")

    def _plain_model(self) -> torch.nn.Module | None:
        """An unsharded plain model for saving (rank 0; None elsewhere under FSDP)."""
        if self.cfg.parallel is not Parallel.FSDP:
            return self.inner
        full = dist.full_state_dict(self.model)
        if not self.env.is_rank0:
            return None
        with torch.device("meta"):
            plain = self.model_cls(self.model_cfg)
        plain.load_state_dict(full, assign=True)
        return plain

    def _save_final_model(self) -> None:
        plain = self._plain_model()
        if self.env.is_rank0:
            save_model(plain, self.out)
            tok = self.data.tokenizer
            if isinstance(tok, HFTokenizer):
                shutil.copyfile(tok.path, self.out / "tokenizer.json")
            _write_config(self.out / ckpt.TRAIN_CONFIG, self.cfg)
            self._print(f"saved the model to {self.out} (load it with fastxlstm.load({str(self.out)!r}))")
        dist.barrier()

    # -- signals, logging --

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            self._print(f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
                        f"(send it again to abort without saving)")
        try:
            return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:                               # not the main thread: no handlers there
            return {}

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        for s, h in old.items():
            signal.signal(s, h)

    def _agree_on_stop(self) -> None:
        """Every rank stops at the same step when any one of them got a signal."""
        if self.env.world_size > 1:
            flag = torch.tensor([self.stop_signal or 0], device=self.env.device)
            got = int(dist.all_reduce(flag, "max").item())
            self.stop_signal = got or None

    def _log(self, record: dict) -> None:
        if not self.env.is_rank0:
            return
        self.records.append(record)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
        if "val_loss" in record:
            bpb = f", {record['val_bpb']:.3f} bits/byte" if "val_bpb" in record else ""
            self._print(f"step {record['step']}: train loss {record['loss']:.4f}, "
                        f"validation loss {record['val_loss']:.4f}{bpb}")

    def _print(self, msg: str) -> None:
        if self.env.is_rank0:
            bar = getattr(self, "bar", None)
            (bar.write if bar is not None and not bar.disable else print)(msg)


# --- pieces --------------------------------------------------------------------------------------

def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up to 1, then cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer, prompt: str, max_tokens: int, *, temperature: float = 0.7,
           seed: int = 0, autocast=nullcontext, world_size: int = 1) -> str:
    """Prompt + ``max_tokens`` sampled tokens (greedy at temperature 0), decoding over carried state.
    Under FSDP every rank must call it (the forward passes are collective); all draw the same tokens."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [0]
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    with _eager(), autocast():
        logits, state = model(torch.tensor([ids], device=device))
        out = []
        for _ in range(max_tokens):
            last = logits[0, -1].float().cpu()
            if temperature == 0:
                nxt = int(last.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen))
            if world_size > 1:
                nxt = dist.broadcast_object(nxt)
            out.append(nxt)
            logits, state = model(torch.tensor([[nxt]], device=device), state)
    model.train(was_training)
    return prompt + tokenizer.decode(out)


def _eager():
    """A context that runs compiled modules eagerly (torch >= 2.6; a no-op before): a sample's
    shapes (its prompt, then one token at a time with a state) would each compile the stack anew.
    Without Dynamo loaded nothing is compiled, and the stance would only load it."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or "torch._dynamo" not in sys.modules:
        return nullcontext()
    return set_stance("force_eager")


def _adamw(model: torch.nn.Module, cfg: TrainConfig, *, fused: bool) -> AdamW:
    """Weight decay on matrices only: not on the embedding, norms or biases. fastxlstm's AdamW: the
    clip folded into the update on CUDA, torch's fused step where that does not serve (FSDP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def document_offsets(tokens: torch.Tensor, row_len: int, end_id: int) -> torch.Tensor:
    """cu_seqlens of a flat batch of rows: a document starts at every row start and after every
    ``end_id`` token. tokens (N,) with N a multiple of row_len -> sorted offsets from 0 to N."""
    n = tokens.numel()
    rows = torch.arange(0, n + 1, row_len, device=tokens.device)
    after_end = (tokens == end_id).nonzero().flatten() + 1
    return torch.unique(torch.cat([rows, after_end]))


def compile_model(model: torch.nn.Module, *, whole_stack: bool) -> None:
    """torch.compile the blocks: the whole stack of them as one graph (``whole_stack``), or each
    block alone. One graph lets Inductor fuse across the blocks' boundaries (a 1.3b 8x4096 step
    0.4-1.3 % faster on the H200, benchmarks/RESULTS.md); DDP and FSDP take each block alone, as
    torchtitan does, since their gradient hooks fire between blocks."""
    if whole_stack:
        dist.stack_of(model).compile()
    else:
        for block in dist.blocks_of(model):
            block.compile()


def _checkpointed(forward, x, state=None, **kwargs):
    from torch.utils.checkpoint import checkpoint
    return checkpoint(forward, x, state, use_reentrant=False, **kwargs)


def _write_config(path: Path, cfg: TrainConfig) -> None:
    """The run's TrainConfig as --resume reads it back (without this invocation's resume/stop)."""
    path.write_text(json.dumps({**cfg.to_dict(), "resume": None, "stop_at_step": None}, indent=2) + "\n")


def _arch(name: str) -> tuple[type, type]:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _model_base(arch: str, preset: str | None) -> dict:
    """The model fields flags and files override: a preset's (xlstm_large) or the stack's defaults."""
    if arch == "xlstm_large":
        name = preset or "tiny"
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return PRESETS[name].to_dict()
    _arch(arch)
    if preset:
        raise ValueError(f"presets are xlstm_large models; for {arch} give its fields (--config FILE or flags)")
    return {"vocab_size": 256}


def _read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path}: no such file")
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except ImportError:
        raise RuntimeError(f"config file {path}: TOML needs Python >= 3.11 (use JSON)") from None
    except ValueError as e:
        raise ValueError(f"config file {path} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: must hold a table/object with the keys arch, preset, model and "
                         f"train; got a {type(data).__name__}")
    unknown = sorted(set(data) - {"arch", "preset", "model", "train"})
    if unknown:
        raise ValueError(f"config file {path}: top-level keys must be arch, preset, model and train; got {unknown}")
    return data


def _tensorboard_writer_class():
    """torch's SummaryWriter class, or a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install tensorboard "
                           f"(or fastxlstm[tensorboard]); {e}") from None
    return SummaryWriter


def _plot(out: Path) -> None:
    """loss.png from metrics.jsonl: training loss per logged step, validation loss per evaluation."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed, so no {PLOT} was drawn: pip install matplotlib")
        return
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_yscale("log")
    ax.set_title(f"fastxlstm train: {out}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / f".{PLOT}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out / PLOT)
