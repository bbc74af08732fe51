"""The original xLSTM stack: full forward == prefill + steps (conv state included), backends
agree, official initialisation, bad configs raise."""

import os

import torch

if not torch.cuda.is_available():
    # before the first import of any Triton kernel (they are decorated at import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastxlstm.ops import Backend, triton_available  # noqa: E402
from fastxlstm.stack import StackConfig, XLSTMStack, XLSTMStackLM  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

TINY = dict(vocab_size=61, embedding_dim=32, num_blocks=4, slstm_at=(1, 3), chunk_size=4, backend="native")


def test_full_forward_equals_prefill_plus_steps():
    model = XLSTMStackLM(StackConfig(**TINY)).double()
    ids = torch.randint(0, 61, (2, 15))
    full, full_state = model(ids)
    logits, state = model(ids[:, :6])                      # prefill crosses mLSTM chunk edges
    steps = [logits]
    for t in range(6, 15):
        logits, state = model(ids[:, t:t + 1], state)
        steps.append(logits)
    assert_close("logits", full, torch.cat(steps, 1), torch.float64)
    for b, (a, s) in enumerate(zip(full_state, state)):
        assert_close(f"block {b} conv state", a.conv, s.conv, torch.float64)
        for x, y in zip(a.cell, s.cell):
            assert_close(f"block {b} cell state", x, y, torch.float64)


def test_split_sequence_state_passing_and_long_context():
    """Two calls with state equal one; no context-length limit (the official layer has one)."""
    model = XLSTMStackLM(StackConfig(**TINY)).double()
    ids = torch.randint(0, 61, (1, 300))
    full, _ = model(ids)
    a, s = model(ids[:, :137])
    b, _ = model(ids[:, 137:], s)
    assert_close("split logits", full, torch.cat([a, b], 1), torch.float64)


def test_reference_backend_agrees_with_native():
    torch.manual_seed(0)
    native = XLSTMStackLM(StackConfig(**TINY)).double()
    ref = XLSTMStackLM(StackConfig(**{**TINY, "backend": "reference"})).double()
    ref.load_state_dict(native.state_dict())
    ids = torch.randint(0, 61, (2, 11))
    assert_close("logits", ref(ids)[0], native(ids)[0], torch.float64)


def test_backward_reaches_every_parameter():
    model = XLSTMStackLM(StackConfig(**TINY))
    with torch.no_grad():                                  # R and gate weights start at 0: wake them up
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    logits, _ = model(torch.randint(0, 61, (2, 9)))
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_official_initialisation():
    cfg = StackConfig(**{**TINY, "num_blocks": 5, "slstm_at": (0, 4), "slstm_num_heads": 2})
    stack = XLSTMStack(cfg)
    first, last = stack.blocks[0].layer, stack.blocks[4].layer
    assert torch.all(first.recurrent_weight == 0)
    fb = first.bias[:, 1]                                  # forget gate: +5 down to -7 in each head
    assert torch.allclose(fb[:, 0], torch.full((2,), 5.0)) and torch.allclose(fb[:, -1], torch.full((2,), -7.0))
    assert torch.all(fb[:, 1:] < fb[:, :-1])
    assert (last.bias[0, 1, 1:-1] > fb[0, 1:-1]).all()     # later blocks: more gates stay open
    assert torch.all(first.bias[:, [0, 2, 3]] == 0)
    m = stack.blocks[1].layer
    assert torch.all(m.fgate.weight == 0) and torch.allclose(m.fgate.bias, torch.linspace(3, 6, 4))
    std = m.q_proj.weight.std().item()
    assert abs(std - (2 / (5 * 32)) ** 0.5) < 0.03


def test_weight_tying():
    model = XLSTMStackLM(StackConfig(**{**TINY, "tie_word_embeddings": True}))
    assert model.lm_head.weight is model.embedding.weight


@pytest.mark.parametrize("field, value", [
    ("slstm_at", (4,)), ("slstm_at", (1, 1)), ("slstm_at", [1]), ("num_blocks", 0), ("embedding_dim", -8),
    ("mlstm_num_heads", 7), ("slstm_num_heads", 5), ("qkv_block_size", 5), ("slstm_forget_gate", "tanh"),
    ("ffn_act", "tanh"), ("backend", "cuda"), ("vocab_size", 0), ("norm_eps", 0.0), ("slstm_conv_kernel_size", -1),
])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        StackConfig(**{**TINY, field: value})


def test_bad_inputs_raise():
    model = XLSTMStackLM(StackConfig(**TINY))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[61]]))
    with pytest.raises(ValueError, match="state"):
        model(torch.tensor([[1]]), state=[None])
    with pytest.raises(ValueError, match="vocab_size"):
        XLSTMStackLM(StackConfig(**{**TINY, "vocab_size": None}))


def test_slstm_layer_keeps_autocast_dtype(monkeypatch):
    """Under bf16 autocast the cell op gets bf16 pre-activations (a float32 bias must not promote
    them: the Triton kernel sizes its tiles by dtype)."""
    from fastxlstm import ops
    from fastxlstm.layers.slstm import SLSTMLayer

    seen = []
    real = ops.slstm
    monkeypatch.setattr(ops, "slstm", lambda x, *a, **k: seen.append(x.dtype) or real(x, *a, **k))
    layer = SLSTMLayer(32, 4)
    layer.reset_parameters()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 5, 32), backend=Backend.NATIVE)
    assert seen == [torch.bfloat16]


def test_config_dict_round_trip():
    import json

    cfg = StackConfig(**TINY)
    assert StackConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="not_a_field"):
        StackConfig.from_dict({**cfg.to_dict(), "not_a_field": 1})


@pytest.mark.parametrize("backend", [Backend.NATIVE, Backend.TRITON])
@pytest.mark.parametrize("conv_kernel_size", [0, 4])
def test_slstm_layer_backends_agree_with_reference(backend, conv_kernel_size):
    """The layer's output, final state and every parameter gradient under each backend."""
    if backend is Backend.TRITON and not triton_available():
        pytest.skip("Triton not installed")
    from fastxlstm.layers.slstm import SLSTMLayer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = SLSTMLayer(32, 2, conv_kernel_size=conv_kernel_size).to(device)
    layer.reset_parameters(block_idx=1, num_blocks=3)
    with torch.no_grad():
        layer.recurrent_weight.normal_(0, 0.2)              # R starts at 0: make the recurrence matter
    x = torch.randn(3, 11, 32, device=device)
    outs = []
    for b in (Backend.REFERENCE, backend):
        layer.zero_grad()
        y, state = layer(x, backend=b)
        (y.square().sum() + state.cell.c.sum()).backward()
        outs.append((y, state, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y0, s0, g0), (y1, s1, g1) = outs
    assert_close("y", y0, y1, torch.float32)
    for a, b in zip(s0.cell, s1.cell):
        assert_close("cell state", a, b, torch.float32)
    for name in g0:
        assert_close(f"grad {name}", g0[name], g1[name], torch.float32)


def test_auto_backend_ignores_the_chunk_size_without_mlstm_blocks():
    # the mLSTM chunk size steers AUTO (Triton needs a power of two >= 16) only where mLSTM blocks use it
    small = dict(embedding_dim=32, num_blocks=2, chunk_size=8, mlstm_num_heads=2, slstm_num_heads=2)
    assert XLSTMStack(StackConfig(**small, slstm_at=(1,))).backend_for(torch.device("cuda")) is Backend.NATIVE
    only_slstm = XLSTMStack(StackConfig(**small, slstm_at=(0, 1))).backend_for(torch.device("cuda"))
    assert only_slstm is XLSTMStack(StackConfig(**{**small, "chunk_size": 64}, slstm_at=(0, 1))).backend_for(
        torch.device("cuda"))
