"""AdamW with the gradient clip folded into the update (``ops.adamw``).

``AdamW.clip_and_step(max_norm)`` is ``clip_grad_norm_(params, max_norm)`` followed by ``step()``,
with the same result, but on CUDA the clip's coefficient goes into each parameter's update instead
of a pass that rescales every gradient in place. It is a ``torch.optim.AdamW``: the same
hyperparameters, param groups, state (``step``, ``exp_avg``, ``exp_avg_sq``) and state dict, so
checkpoints move between the two. Where the kernel does not serve (CPU, FSDP's sharded DTensors,
options such as amsgrad) it clips in place and runs torch's step.

A step whose gradients are not finite (their norm is inf or NaN) is skipped: the weights and
moments stay as they were, where clip_grad_norm_ + step would write NaN into every weight. The
kernel skips on the device (a NaN coefficient), so the host never waits for the norm; torch's path
reads the norm (a sync on CUDA). ``skipped_steps`` and ``skipped_streak`` (the current run of
skipped steps) are device tensors the training loop reads when it logs. On the kernel's path a
skipped step still advances the host-side step count of the bias correction.
"""

from __future__ import annotations

import math

import torch

from .ops import adamw as adamw_op

__all__ = ["AdamW", "grad_norm"]

_KERNEL_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, in float32 (as clip_grad_norm_ computes it)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in torch._foreach_norm(grads)]))


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW plus ``clip_and_step``. kernel: None: the Triton update where it serves
    (plain float32 CUDA parameters and gradients, Triton installed, no amsgrad / maximize /
    capturable / differentiable); True: also for CPU tensors (under TRITON_INTERPRET=1, for
    tests); False: never (torch's step after an in-place clip)."""

    def __init__(self, params, *args, kernel: bool | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.kernel = kernel
        self._grad_coef: torch.Tensor | None = None       # clip_and_step's, for the step it calls
        self.skipped_steps: torch.Tensor | None = None     # int64 device scalars, from the first clip_and_step
        self.skipped_streak: torch.Tensor | None = None

    @torch.no_grad()
    def clip_and_step(self, max_norm: float = math.inf) -> torch.Tensor:
        """Clip the gradients' total 2-norm to ``max_norm`` (math.inf: no clip) and take a step;
        returns the norm before clipping, a plain tensor (FSDP's DTensor norm gathered). On the
        kernel's path the gradients are left unscaled (they are zeroed or freed next); on torch's
        they are scaled in place."""
        params = self._params_with_grad()
        if not self._kernel_path(params):
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm      # FSDP: a DTensor
            finite = torch.isfinite(norm)
            self._count_skips(finite)
            if finite:
                self.step()
            return norm
        norm = grad_norm([p.grad for p in params])
        finite = torch.isfinite(norm)
        self._count_skips(finite)
        # clip_grad_norm_'s coefficient, as a device scalar (no host sync); NaN skips the update
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if math.isfinite(max_norm) else torch.ones_like(norm)
        self._grad_coef = torch.where(finite, coef, torch.full_like(coef, math.nan))
        self.step()          # through step(), so LR schedulers and step hooks see it
        return norm

    def _count_skips(self, finite: torch.Tensor) -> None:
        bad = (~finite).to(torch.int64)
        if self.skipped_steps is None:
            self.skipped_steps, self.skipped_streak = torch.zeros_like(bad), torch.zeros_like(bad)
        self.skipped_steps += bad
        self.skipped_streak.add_(1).mul_(bad)

    def step(self, closure=None):
        coef, self._grad_coef = self._grad_coef, None
        # a coefficient comes from clip_and_step, which has just chosen the kernel's path
        if coef is None and not self._kernel_path(self._params_with_grad()):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._kernel_step(coef)
        return loss

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _kernel_path(self, params: list[torch.Tensor]) -> bool:
        if self.kernel is False or not params:
            return False
        if any(group.get(opt) for group in self.param_groups for opt in _KERNEL_UNSUPPORTED):
            return False
        return bool(self.kernel) or all(adamw_op.kernel_serves(p, p.grad) for p in params)

    def _kernel_step(self, coef: torch.Tensor | None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    # torch's non-fused initial state: a float32 step count on the CPU
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device.type != "cpu":
                    state["step"] = state["step"].cpu()     # from a fused optimizer's state dict: synced once
            steps = [self.state[p]["step"] for p in params]
            if not steps:
                continue
            torch._foreach_add_(steps, 1.0)
            # one launch per group and step count (a group's parameters share theirs, unless some
            # were added to it later)
            by_step: dict[int, list[torch.Tensor]] = {}
            for p, s in zip(params, torch.stack(steps).tolist()):
                by_step.setdefault(int(s), []).append(p)
            for step, ps in by_step.items():
                adamw_op.adamw_(ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps],
                                [self.state[p]["exp_avg_sq"] for p in ps], step=step, lr=float(group["lr"]),
                                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                grad_coef=coef, kernel=True)
