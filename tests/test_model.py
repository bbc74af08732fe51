"""XLSTMLarge: decoding equals the full forward, backends agree, bad input is refused by name."""

import dataclasses

import pytest
import torch

from fastxlstm import PRESETS, Backend, MLSTMState, ModelConfig, XLSTMLarge
from tests.helpers import assert_close

CFG = ModelConfig(vocab_size=97, embedding_dim=64, num_heads=4, num_blocks=2, chunk_size=16)


def random_model(cfg=CFG, dtype=torch.float64, scale=0.3):
    """Weights far from the init, so gates and states take all their regimes."""
    model = XLSTMLarge(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model


def test_full_forward_equals_prefill_plus_steps():
    model = random_model()
    x = torch.randint(0, CFG.vocab_size, (3, 40))
    full, state_full = model(x)
    logits, state = model(x[:, :17])
    outs = [logits]
    for t in range(17, 40):
        logits, state = model(x[:, t:t + 1], state)
        outs.append(logits)
    assert_close("logits", full, torch.cat(outs, 1), torch.float64)
    for a, b in zip(state_full, state):
        for field in MLSTMState._fields:
            assert_close(f"state.{field}", getattr(a, field), getattr(b, field), torch.float64)


def test_rows_of_a_batch_are_independent():
    model = random_model()
    x = torch.randint(0, CFG.vocab_size, (3, 21))
    full, _ = model(x)
    alone, _ = model(x[1:2])
    assert_close("row 1", full[1:2], alone, torch.float64)


def test_backends_agree_with_reference():
    model = random_model()
    x = torch.randint(0, CFG.vocab_size, (2, 35))
    ref_model = XLSTMLarge(dataclasses.replace(CFG, backend=Backend.REFERENCE)).double()
    ref_model.load_state_dict(model.state_dict())
    assert_close("logits", ref_model(x)[0], model(x)[0], torch.float64)


def test_train_mode_backward_reaches_every_parameter():
    model = XLSTMLarge(CFG).train()
    x = torch.randint(0, CFG.vocab_size, (2, 33))
    logits, _ = model(x)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bfloat16_model_runs_and_returns_float32_logits():
    model = XLSTMLarge(CFG).to(torch.bfloat16)
    logits, state = model(torch.randint(0, CFG.vocab_size, (2, 20)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert all(t.dtype == torch.float32 for s in state for t in s)


def test_logits_are_soft_capped():
    model = random_model(scale=2.0)
    logits, _ = model(torch.randint(0, CFG.vocab_size, (1, 10)))
    assert logits.abs().max() <= CFG.output_logit_soft_cap


def test_init_follows_the_documented_recipe():
    cfg = dataclasses.replace(CFG, embedding_dim=256, num_blocks=4)
    model = XLSTMLarge(cfg)
    E = cfg.embedding_dim
    small = (2 / (5 * E)) ** 0.5
    assert abs(model.embedding.weight.std().item() - small) < 0.05 * small
    layer = model.backbone.blocks[0].mlstm_layer
    assert torch.all(layer.igate_preact.bias == cfg.igate_bias_init)
    assert torch.allclose(layer.fgate_preact.bias, torch.linspace(3, 6, cfg.num_heads))
    assert torch.all(layer.igate_preact.weight == 0)
    wang = 2 / (cfg.num_blocks * E ** 0.5)
    assert abs(layer.out_proj.weight.std().item() - wang) < 0.05 * wang


def test_ffn_width_follows_the_literal_factor():
    assert PRESETS["7b"].ffn_dim == 10944
    assert dataclasses.replace(CFG, embedding_dim=768, ffn_proj_factor=2.6667).ffn_dim == 2112
    assert dataclasses.replace(CFG, embedding_dim=768, ffn_proj_factor=8 / 3).ffn_dim == 2048


@pytest.mark.parametrize("field,value,match", [
    ("num_heads", 3, "num_heads"), ("embedding_dim", 0, "embedding_dim"), ("vocab_size", -1, "vocab_size"),
    ("chunk_size", 0, "chunk_size"), ("backend", "gpu-please", "backend"), ("qk_dim_factor", 0.0, "qk_dim_factor"),
    ("eos_token_id", 500, "eos_token_id"), ("gate_soft_cap", -1.0, "gate_soft_cap"),
])
def test_invalid_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **{field: value})


def test_config_is_frozen_and_round_trips():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.num_heads = 8
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**CFG.to_dict(), "num_layers": 3})


def test_bad_inputs_are_refused_by_name():
    model = XLSTMLarge(CFG)
    with pytest.raises(ValueError, match="integer"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, 2, CFG.vocab_size]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2, 3]))
    other = XLSTMLarge(dataclasses.replace(CFG, num_heads=2))
    _, foreign_state = other(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"state\[0\].c"):
        model(torch.tensor([[1, 2]]), foreign_state)
    with pytest.raises(ValueError, match="list of 2"):
        model(torch.tensor([[1, 2]]), foreign_state[:1])
    _, state = model(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="batch"):
        model(torch.tensor([[1, 2], [3, 4]]), state)


def test_soft_cap_value_and_gradient():
    from fastxlstm.layers.common import soft_cap

    x = (torch.randn(50, dtype=torch.float64) * 40).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: soft_cap(t, 30.0), (x,))
    with torch.no_grad():
        assert torch.allclose(soft_cap(x, 30.0), 30 * torch.tanh(x / 30))
    assert soft_cap(x, None) is x


def test_packed_documents_equal_each_document_alone():
    model = random_model()
    lengths = [5, 17, 1, 30]
    docs = [torch.randint(0, CFG.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    _, init = model(torch.randint(0, CFG.vocab_size, (len(docs), 3)))
    for state in (None, init):
        packed, packed_state = model(torch.cat(docs, 1), state, cu_seqlens=cu)
        for n, doc in enumerate(docs):
            row = None if state is None else [MLSTMState(*(t[n:n + 1] for t in s)) for s in state]
            alone, alone_state = model(doc, row)
            assert_close(f"doc {n}", alone, packed[:, cu[n]:cu[n + 1]], torch.float64)
            for a, b in zip(alone_state, packed_state):
                assert_close(f"doc {n} state", a.c, b.c[n:n + 1], torch.float64)
    with pytest.raises(ValueError, match="batch"):
        model(torch.cat(docs, 1), [MLSTMState(*(t[:2] for t in s)) for s in init], cu_seqlens=cu)
