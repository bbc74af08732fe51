"""The fused decode step (generation/fused.py) equals the model's one-token forward, and generation
through it equals generation through ``model(token, state)``; both of its paths: the compiled
pieces and the hybrid (skinny_linear GEMMs with the row and step kernels between; on the CPU
under TRITON_INTERPRET=1)."""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before the decode kernels are first imported

from fastxlstm.config import ModelConfig
from fastxlstm.generation import generate, prefill
from fastxlstm.generation.fused import FusedStep
from fastxlstm.model import XLSTMLarge

from .helpers import assert_close
from .test_generate import CFG, fake_graphs, prompts_of, random_model  # noqa: F401  (fake_graphs: a fixture)

VARIANTS = {
    "default": {},
    "bias, no out norm, tied": dict(use_bias=True, add_out_norm=False, tie_word_embeddings=True),
    "norm in model dtype, no soft caps": dict(norm_reduction_force_float32=False, gate_soft_cap=0,
                                              output_logit_soft_cap=0),
    "no out norm": dict(add_out_norm=False),
}


def variant(name, **over):
    return ModelConfig(**{**CFG.to_dict(), **VARIANTS[name], **over})


def step_both(model, B=3, seed=2, hybrid=None):
    """(model's logits and state, fused step's logits and state) for one token after a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (B, 11), generator=g)
    with torch.inference_mode():
        _, state = model(ids[:, :10])
        ref = model(ids[:, 10:], state)
        step = FusedStep(model, compile=False, hybrid=hybrid)
        assert step.uses_hybrid(B) == bool(hybrid)
        out = step(ids[:, 10:], state)
    return ref, out


def assert_step_equal(ref, out, dtype):
    (ref_logits, ref_state), (logits, state) = ref, out
    assert logits.dtype == ref_logits.dtype
    assert_close("logits", ref_logits, logits, dtype)
    for b, (r, s) in enumerate(zip(ref_state, state)):
        for name in "cnm":
            assert getattr(s, name).dtype == getattr(r, name).dtype
            assert_close(f"block {b} state.{name}", getattr(r, name), getattr(s, name), dtype)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_step_equals_the_model_step(name, dtype):
    model = random_model(variant(name), dtype=dtype)
    assert_step_equal(*step_both(model), dtype)


def test_fused_step_in_bfloat16_equals_the_model_to_its_rounding():
    torch.manual_seed(0)
    model = XLSTMLarge(CFG).to(torch.bfloat16)          # init-scale weights: bf16 logits of a real model
    assert_step_equal(*step_both(model), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors under the interpreter, "
                    "which a CUDA machine does not set; the GPU test below covers the hybrid there")
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype,B", [(torch.float32, 1), (torch.float32, 3), (torch.float16, 3)])
def test_hybrid_step_equals_the_model_step(name, dtype, B):
    # skinny_linear GEMMs with the row kernels and the decode step kernel between them. bfloat16 runs
    # on the GPU only: the interpreter's bfloat16 tl.dot is wrong (tests/ops/test_decode_kernels.py)
    pytest.importorskip("triton")
    model = random_model(variant(name), dtype=dtype, scale=0.1 if dtype != torch.float32 else 0.3)
    # weight-only norms reduced in float32 ride in the GEMMs' epilogues; the others are row kernels
    assert FusedStep(model, compile=False)._norms_fold == (name in ("default", "no out norm"))
    assert_step_equal(*step_both(model, B=B, hybrid=True), dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors under the interpreter")
@pytest.mark.parametrize("name", ["default", "bias, no out norm, tied"])
def test_hybrid_step_above_the_skinny_rows_equals_the_model_step(name):
    # past ops.decode.SKINNY_ROWS the hybrid's GEMMs are F.linear
    pytest.importorskip("triton")
    from fastxlstm.ops import decode

    model = random_model(variant(name), dtype=torch.float32, scale=0.3)
    assert_step_equal(*step_both(model, B=decode.SKINNY_ROWS + 1, hybrid=True), torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors under the interpreter")
@pytest.mark.parametrize("name", ["default", "bias, no out norm, tied"])
def test_greedy_step_writes_the_argmax_of_the_step(name):
    # the five-launch path (default) takes the argmax in the LM head's epilogue; the other falls back
    pytest.importorskip("triton")
    model = random_model(variant(name), dtype=torch.float32, scale=0.3)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 9), generator=g)
    with torch.inference_mode():
        _, state = model(ids[:, :8])
        ref_logits, ref_state = model(ids[:, 8:], state)
        step = FusedStep(model, compile=False, hybrid=True)
        assert step._skinny_path(3) == (name == "default")
        out = torch.full((3, 2), -1, dtype=torch.long)
        new_state = step.greedy_step(ids[:, 8:], state, out[:, 1])
    assert torch.equal(out[:, 1], ref_logits[:, -1].argmax(-1)) and (out[:, 0] == -1).all()
    for r, s_ in zip(ref_state, new_state):
        assert_close("state.c", r.c, s_.c, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors under the interpreter")
def test_hybrid_step_updates_the_state_in_place_when_asked():
    pytest.importorskip("triton")
    model = random_model(dtype=torch.float32, scale=0.3)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        _, state = model(ids[:, :5])
        ref = model(ids[:, 5:], state)
        given = [type(s)(*(t.clone() for t in s)) for s in state]
        logits, new = FusedStep(model, compile=False, hybrid=True, inplace_state=True)(ids[:, 5:], given)
    assert all(s.c is g.c and s.n is g.n for s, g in zip(new, given))
    assert_step_equal(ref, (logits, new), torch.float32)


def test_path_by_batch_size_on_cuda():
    model = random_model(dtype=torch.float32)
    step = FusedStep(model, compile=False)
    assert not step.uses_hybrid(1)                                       # CPU: exact eager PyTorch
    step._hybrid_fits = True                                             # as on CUDA
    assert step.uses_hybrid(1) and step.uses_hybrid(FusedStep.max_hybrid_batch)
    assert not step.uses_hybrid(FusedStep.max_hybrid_batch + 1)         # then the compiled pieces
    forced = FusedStep(model, compile=False, hybrid=False)
    forced._hybrid_fits = True
    assert not forced.uses_hybrid(1)


def test_generation_through_the_hybrid_step_equals_the_model_step(fake_graphs, monkeypatch):  # noqa: F811
    # the engine's decoders hand their state to the step kernel to update in place
    pytest.importorskip("triton")
    import fastxlstm.generation.engine as engine

    monkeypatch.setattr(engine, "FusedStep", functools.partial(FusedStep, hybrid=True))
    model = random_model(dtype=torch.float32)
    prompts = prompts_of([5, 7, 3])
    kw = dict(max_new_tokens=9, temperature=0.9, top_k=40, seed=[1, 2, 3])
    graph = generate(model, prompts, fused=True, cuda_graph=True, steps_per_graph=4, **kw)
    assert graph == generate(model, prompts, fused=False, cuda_graph=False, **kw)


def test_fused_weights_are_one_copy_of_the_input_and_ffn_projections():
    model = random_model()
    step = FusedStep(model, compile=False)
    blk = model.backbone.blocks[0]
    lay, ffn = blk.mlstm_layer, blk.ffn
    rows_in = sum(l.out_features for l in (lay.q, lay.k, lay.v, lay.ogate_preact, lay.igate_preact, lay.fgate_preact))
    per_block = (rows_in * (CFG.embedding_dim + 1) + 2 * ffn.proj_up.out_features * CFG.embedding_dim) * 8
    assert step.extra_bytes == CFG.num_blocks * per_block
    w = step.blocks[0].w_in
    assert torch.equal(w[:lay.q.out_features], lay.q.weight)
    assert step.blocks[0].norm_w is blk.norm_mlstm.weight                # everything else is shared


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1)])
def test_generation_through_the_fused_step_equals_the_model_step(kw):
    model = random_model()
    prompts = prompts_of([4, 9, 4])
    fused = generate(model, prompts, max_new_tokens=12, seed=[1, 2, 3], fused=True, **kw)
    plain = generate(model, prompts, max_new_tokens=12, seed=[1, 2, 3], fused=False, **kw)
    assert fused == plain and all(len(r) == 12 for r in fused)


def test_fused_step_in_the_graph_decoder(fake_graphs):  # noqa: F811
    model = random_model()
    prompts = prompts_of([5, 7])
    graph = generate(model, prompts, max_new_tokens=11, fused=True, cuda_graph=True, steps_per_graph=4)
    assert graph == generate(model, prompts, max_new_tokens=11, fused=False, cuda_graph=False)
    assert len(fake_graphs) == 2                                          # 9 steps: graphs of 4 and 1


def test_fused_is_the_default_on_cuda_only(monkeypatch):
    import fastxlstm.generation.engine as engine

    built = []
    real = engine.FusedStep
    monkeypatch.setattr(engine, "FusedStep", lambda *a, **k: built.append(1) or real(*a, **k))
    model = random_model()
    generate(model, [[1, 2]], max_new_tokens=3)
    assert not built                                                     # CPU: the exact model step
    generate(model, [[1, 2]], max_new_tokens=3, fused=True)
    generate(model, [[1, 2]], max_new_tokens=1, fused=True)              # no step needed: none built
    assert built == [1]


def test_fused_needs_an_xlstm_large():
    from fastxlstm import StackConfig, XLSTMStackLM

    stack = XLSTMStackLM(StackConfig(vocab_size=50, embedding_dim=32, num_blocks=2, chunk_size=4))
    with pytest.raises(ValueError, match="fused=True needs an XLSTMLarge"):
        generate(stack, [[1, 2]], max_new_tokens=3, fused=True)
    with pytest.raises(ValueError, match="needs an XLSTMLarge"):
        FusedStep(stack)
    with pytest.raises(ValueError, match="fused must be"):
        generate(random_model(), [[1]], max_new_tokens=2, fused="yes")


def test_fused_step_refuses_more_than_one_token():
    model = random_model()
    state, _ = prefill(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="one token per row"):
        FusedStep(model, compile=False)(torch.tensor([[1, 2]]), state)


@pytest.mark.slow
def test_compiled_fused_step_equals_eager_on_cpu():
    from torch._dynamo.utils import counters

    model = random_model(dtype=torch.float32)
    prompts = prompts_of([5, 9])
    counters.clear()
    compiled = generate(model, prompts, max_new_tokens=6, fused=True, compile=True)
    assert compiled == generate(model, prompts, max_new_tokens=6, fused=False)
    assert counters["frames"]["ok"] > 0


# --- GPU: the compiled pieces and the Triton step kernel, at the 7B head shape ------------------------

# 7B head shape (E 4096, 8 heads: Dqk 256, Dv 512), two blocks, a small vocabulary to stay quick
GPU_7B_HEADS = ModelConfig(vocab_size=4096, embedding_dim=4096, num_heads=8, num_blocks=2)


@pytest.mark.gpu
@pytest.mark.parametrize("B,hybrid", [(1, None), (16, None), (20, None), (1, False), (16, False)])
def test_gpu_fused_step_equals_the_model_step_bf16(B, hybrid):
    """Batches up to max_hybrid_batch take the hybrid (skinny_linear up to 16 rows, cuBLAS above,
    with the row and step kernels between) by default, the compiled pieces with hybrid=False."""
    torch.manual_seed(0)
    model = XLSTMLarge(GPU_7B_HEADS).to(device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, GPU_7B_HEADS.vocab_size, (B, 70), generator=g).cuda()
    with torch.inference_mode():
        _, state = model(ids[:, :69])
        ref_logits, ref_state = model(ids[:, 69:], state)
        step = FusedStep(model, hybrid=hybrid)                            # compiled on CUDA
        assert step.uses_hybrid(B) == (hybrid is None and B <= FusedStep.max_hybrid_batch)
        for _ in range(2):                                                # the second call: compiled code
            logits, new_state = step(ids[:, 69:], state)
    assert_step_equal((ref_logits, ref_state), (logits, new_state), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[5, 130, 12], [130]])
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.9, top_k=40, seed=[1, 2, 3])])
def test_gpu_fused_graph_decode_equals_model_step(kw, lengths):
    from .test_generate import GPU_CFG

    m = random_model(GPU_CFG, dtype=torch.float32).cuda()
    prompts = prompts_of(lengths)
    if "seed" in kw:
        kw = dict(kw, seed=kw["seed"][:len(lengths)])
    fused = generate(m, prompts, max_new_tokens=23, cuda_graph=True, steps_per_graph=4, **kw)
    plain = generate(m, prompts, max_new_tokens=23, cuda_graph=False, fused=False, **kw)
    assert fused == plain
