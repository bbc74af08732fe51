"""The chunked LM-head cross-entropy against the plain formula: loss and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastxlstm.loss import lm_head_loss
from tests.helpers import assert_close


def _plain(h, w, y, cap, reduction="mean"):
    z = h @ w.T
    if cap:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction=reduction)


def _inputs(shape, V, E, dtype=torch.float64, ignore=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, E, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    w = torch.randn(V, E, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore] = -100
    return h, w, y


@pytest.mark.parametrize("cap", [30.0, 3.0, None])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_matches_the_formula_float64(cap, reduction, chunk_rows):
    """(B, T) = (3, 13): 39 rows, so chunks of 7 leave a remainder of 4; a fifth of targets ignored;
    logits of scale ~sqrt(E) * 2 so that a cap of 3 is well into tanh's curve."""
    h, w, y = _inputs((3, 13), V=50, E=16)
    ref = _plain(h, w, y, cap, reduction)
    g_ref = torch.autograd.grad(ref * 1.7, (h, w))           # a non-unit incoming gradient
    out = lm_head_loss(h, w, y, soft_cap=cap, reduction=reduction, chunk_rows=chunk_rows)
    g_out = torch.autograd.grad(out * 1.7, (h, w))
    assert out.dtype == torch.float64
    assert_close("loss", ref, out, torch.float64)
    assert_close("dh", g_ref[0], g_out[0], torch.float64)
    assert_close("dw", g_ref[1], g_out[1], torch.float64)
    assert (g_out[0][y == -100] == 0).all()                  # ignored rows get no gradient


def test_only_some_inputs_need_grad_and_no_grad():
    h, w, y = _inputs((2, 9), V=11, E=5)
    ref = _plain(h, w, y, 30.0)
    (dw_ref,) = torch.autograd.grad(ref, w)
    out = lm_head_loss(h.detach(), w, y, soft_cap=30.0, chunk_rows=4)
    (dw,) = torch.autograd.grad(out, w)
    assert_close("dw", dw_ref, dw, torch.float64)
    with torch.no_grad():
        out = lm_head_loss(h, w, y, soft_cap=30.0, chunk_rows=4)
    assert_close("loss", ref, out, torch.float64)
    assert not out.requires_grad


def test_all_ignored_is_nan_like_torch():
    h, w, y = _inputs((4,), V=6, E=3, ignore=1.0)
    assert torch.isnan(_plain(h, w, y, 30.0)) and torch.isnan(lm_head_loss(h, w, y, soft_cap=30.0))


def test_bf16_autocast_matches_the_unfused_path():
    """Under bf16 autocast both run the matmuls in bf16 and the rest in float32: agreement to bf16's
    tolerance, float32 master weights get float32 gradients."""
    h, w, y = _inputs((4, 33), V=300, E=64, dtype=torch.float32, ignore=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((30 * torch.tanh((h @ w.T).float() / 30)).reshape(-1, 300), y.reshape(-1))
        out = lm_head_loss(h, w, y, soft_cap=30.0, chunk_rows=50)
    g_ref, g_out = torch.autograd.grad(ref, (h, w)), torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float32 and g_out[1].dtype == torch.float32
    assert_close("loss", ref, out, torch.bfloat16)
    assert_close("dh", g_ref[0], g_out[0], torch.bfloat16)
    assert_close("dw", g_ref[1], g_out[1], torch.bfloat16)


def test_bad_shapes_raise():
    h, w, y = _inputs((2, 3), V=7, E=4)
    with pytest.raises(ValueError, match="targets"):
        lm_head_loss(h, w, y[:, :2])
    with pytest.raises(ValueError, match="weight"):
        lm_head_loss(h, w[:, :3], y)


def _model_cases():
    from fastxlstm.config import ModelConfig
    from fastxlstm.model import XLSTMLarge
    from fastxlstm.stack import StackConfig, XLSTMStackLM
    large = XLSTMLarge(ModelConfig(vocab_size=40, embedding_dim=16, num_heads=2, num_blocks=2, chunk_size=4,
                                   backend="native", bos_token_id=None, eos_token_id=None, pad_token_id=None))
    stack = XLSTMStackLM(StackConfig(vocab_size=40, embedding_dim=32, num_blocks=2, slstm_at=(1,),
                                     chunk_size=4, backend="native"))
    return [(large, 30.0), (stack, None)]          # the stack has no logit cap


@pytest.mark.parametrize("case", [0, 1], ids=["xlstm_large", "xlstm_stack"])
def test_hidden_states_and_the_loss_equal_forward(case):
    """What training runs (hidden_states + the chunked loss) equals cross-entropy of forward's
    logits: the loss and every parameter's gradient, in float64."""
    torch.manual_seed(0)
    model, cap = _model_cases()[case]
    model = model.double()
    ids = torch.randint(0, 40, (2, 11))
    y = torch.randint(0, 40, (2, 11))
    logits, state = model(ids)
    ref = F.cross_entropy(logits.reshape(-1, 40), y.reshape(-1))
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    h, state2 = model.hidden_states(ids)
    out = lm_head_loss(h, model.lm_head.weight, y, soft_cap=cap, chunk_rows=5)
    g_out = torch.autograd.grad(out, list(model.parameters()))
    assert_close("loss", ref, out, torch.float64)
    for (name, _), a, b in zip(model.named_parameters(), g_ref, g_out):
        assert_close(name, a, b, torch.float64)
    for s, s2 in zip(state, state2):
        for a, b in zip(torch.utils._pytree.tree_leaves(s), torch.utils._pytree.tree_leaves(s2)):
            assert torch.equal(a, b)
