"""Triton mLSTM kernels against the float64 reference: forward, final state, every gradient
(the initial state's too), the decode step, torch.compile tracing.

Without CUDA the same kernels run under TRITON_INTERPRET=1 at tiny shapes (set here, before the
kernels are decorated); the GPU suite runs real shapes, 8k and 130k tokens, against float64.
"""

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fastxlstm import ops  # noqa: E402
from fastxlstm.ops import Backend, MLSTMState  # noqa: E402
from fastxlstm.ops.mlstm import native, reference  # noqa: E402
from fastxlstm.ops.mlstm import triton as tri  # noqa: E402
from tests.helpers import assert_close, make_mlstm_inputs, rel_errors  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ["q", "k", "v", "i", "f", "c0", "n0", "m0"]
# fp32 inputs get exact fp32 dots (input_precision="ieee"), on the GPU as in the interpreter.
TOL_FWD = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}
TOL_BWD = {torch.float32: "float32_den", torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}


@pytest.fixture
def tiles():
    """Restore CONFIG after a test that changes tile sizes."""
    saved = copy.deepcopy(tri.CONFIG)
    yield tri.CONFIG
    tri.CONFIG.clear()
    tri.CONFIG.update(saved)


def check_against_reference(B, T, H, K, V, *, dtype, chunk_size, with_state=True, eps=1e-6, ref_fn=None,
                            cu_seqlens=None, gate_scale=3.0, baseline=False, state_grad=True):
    """Run triton and a float64 reference on the same (rounded) inputs; compare h, the final
    state and the gradients of q, k, v, i, f and the initial state under a random loss.
    ``baseline``: also run native chunkwise autograd in the input dtype and let each quantity's
    tolerance rise to 3x that plain computation's error (``helpers.assert_close``'s floor).
    ``state_grad=False``: the loss reads h only (the final state gets no gradient)."""
    (q, k, v, i, f), state = make_mlstm_inputs(B, T, H, K, V, dtype=dtype, device=DEVICE, with_state=with_state,
                                               gate_scale=gate_scale)
    n_docs = B if cu_seqlens is None else len(cu_seqlens) - 1
    if with_state and cu_seqlens is not None:
        _, state = make_mlstm_inputs(n_docs, 1, H, K, V, dtype=dtype, device=DEVICE, with_state=True)
    x = [q, k, v, i, f] + (list(state) if with_state else [])
    x = [t.detach().requires_grad_(True) for t in x]
    x64 = [t.detach().double().requires_grad_(True) for t in x]
    dh = torch.randn(B, T, H, V, device=DEVICE, dtype=torch.float64)
    ds = [torch.randn(s, device=DEVICE, dtype=torch.float64) for s in ((n_docs, H, K, V), (n_docs, H, K), (n_docs, H))]
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=DEVICE)

    def run(fn, xs):
        st = MLSTMState(*xs[5:]) if with_state else None
        h, s = fn(*xs[:5], st)
        loss = (h.double() * dh).sum()
        if state_grad:
            loss = loss + sum((a.double() * b).sum() for a, b in zip(s, ds))
        return h, s, torch.autograd.grad(loss, xs)

    ref_fn = ref_fn or reference.mlstm
    if cu is None:
        ref = run(lambda *a: ref_fn(*a, eps=eps), x64)
    else:
        ref = run(lambda *a: native.per_document(ref_fn, *a, cu, eps=eps), x64)
    out = run(lambda *a: tri.mlstm(*a, chunk_size=chunk_size, eps=eps, cu_seqlens=cu), x)
    floors = [None] * (4 + len(NAMES))
    if baseline:
        assert cu is None, "the baseline runs dense batches"
        plain = run(lambda *a: native.mlstm(*a, chunk_size=chunk_size, eps=eps), x)
        floors = [rel_errors(a, b) for a, b in zip([ref[0], *ref[1], *ref[2]], [plain[0], *plain[1], *plain[2]])]
    tag = f"T={T} L={chunk_size} {dtype}"
    assert out[0].dtype == dtype
    assert_close(f"h {tag}", ref[0], out[0], TOL_BWD[dtype], floors[0])  # h goes through the denominator too
    for j, (name, a, b) in enumerate(zip("cnm", ref[1], out[1])):
        assert b.dtype == torch.float32
        assert_close(f"state.{name} {tag}", a, b, TOL_FWD[dtype], floors[1 + j])
    for j, (name, a, b) in enumerate(zip(NAMES, ref[2], out[2])):
        assert_close(f"grad {name} {tag}", a, b, TOL_BWD[dtype], floors[4 + j])


# ----------------------------------------------------------------------------- CPU (interpreter) and GPU

@pytest.mark.parametrize("T,chunk_size,with_state", [(1, 16, True), (15, 16, False), (16, 16, True),
                                                     (33, 16, True), (23, 32, False)])
def test_forward_backward_tiny(poison, T, chunk_size, with_state):
    check_against_reference(2, T, 2, 16, 32, dtype=torch.float32, chunk_size=chunk_size, with_state=with_state)


def test_sub_blocks_within_a_chunk(poison, tiles):
    # BT < chunk: the intra-chunk form is tiled into 16-row blocks (the path chunks 128/256 take).
    for name in ("fwd_out", "fwd_out_short", "bwd_scores"):
        tiles[name]["BT"] = 16
    check_against_reference(1, 71, 2, 16, 16, dtype=torch.float32, chunk_size=64)


@pytest.mark.parametrize("seed", [3, 4, 7])
def test_dm0_as_precise_as_float32_autograd(poison, seed):
    # dm0 is the gradient of scaling the initial state, which the outputs barely feel when the
    # state dominates them: its terms cancel. Held to 3x the error of native autograd (which
    # computes in float32 from the same fp16 inputs), with no dtype floor; on these seeds the
    # former <c0, dc0> + <n0, dn0> form was 4x, 21x and 13x off (the GPU's bf16 case: 5x).
    torch.manual_seed(seed)
    B, T, H, K, V = 2, 63, 2, 96, 64
    (q, k, v, i, f), state = make_mlstm_inputs(B, T, H, K, V, dtype=torch.float16, device=DEVICE, with_state=True)
    x = [t.detach().requires_grad_(True) for t in (q, k, v, i, f, *state)]
    x64 = [t.detach().double().requires_grad_(True) for t in x]
    dh = torch.randn(B, T, H, V, device=DEVICE, dtype=torch.float64)

    def dm0(fn, xs):
        h, _ = fn(*xs[:5], MLSTMState(*xs[5:]))
        return torch.autograd.grad((h.double() * dh).sum(), xs[7])[0]

    ref = dm0(lambda *a: native.mlstm(*a, chunk_size=256), x64)
    ours = rel_errors(ref, dm0(lambda *a: tri.mlstm(*a, chunk_size=64), x))[0]
    plain = rel_errors(ref, dm0(lambda *a: native.mlstm(*a, chunk_size=64), x))[0]
    assert ours <= 3 * plain, f"dm0 rel-RMSE {ours:.2e} vs native float32 autograd {plain:.2e}"


@pytest.mark.parametrize("stored", [True, False])
@pytest.mark.parametrize("bt", [16, 64])
def test_output_kernel_with_and_without_stored_score_blocks(poison, tiles, bt, stored):
    # fwd_out P=True (the default): _score_blocks_kernel forms the blocks, each token's m and row
    # sum once and the output kernel reads them; P=False: the output kernel forms them itself
    # (one and several row blocks per chunk, a short last chunk, packed)
    for name in ("fwd_out", "fwd_out_short"):
        tiles[name].update(P=stored, BT=bt)
    check_against_reference(1, 71, 2, 16, 16, dtype=torch.float32, chunk_size=64)
    check_against_reference(1, 100, 2, 24, 40, dtype=torch.float16, chunk_size=16, cu_seqlens=[0, 37, 100])


def test_scans_over_several_blocks(poison, tiles):
    # The stabiliser is scanned over blocks of chunks and the gate gradients walk blocks of tokens;
    # blocks of 2 chunks make every carry between them count (9 and 3 chunks per document, an
    # empty document between).
    tiles["stab"]["BLOCK"] = 2
    tiles["gate"]["BLOCK"] = 32
    check_against_reference(2, 33, 2, 16, 32, dtype=torch.float32, chunk_size=16)
    check_against_reference(1, 180, 2, 16, 16, dtype=torch.float32, chunk_size=16, cu_seqlens=[0, 140, 140, 180])


def test_odd_head_dims_and_large_eps(poison):
    # Dqk 24 / Dv 40 are masked tiles (as 96 is on the GPU); eps = 0.5 makes the stabiliser's own
    # gradient path (h depends on m only through eps * exp(m)) large enough to check.
    check_against_reference(1, 37, 2, 24, 40, dtype=torch.float32, chunk_size=16, eps=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loss_on_h_only(poison, dtype):
    # no gradient reaches the final state: the backward skips dC_T's remainder and takes zeros
    check_against_reference(1, 40, 2, 16, 16, dtype=dtype, chunk_size=16, gate_scale=1.0,
                            baseline=dtype != torch.float32, state_grad=False)


def test_float16_inputs():
    check_against_reference(1, 40, 2, 16, 16, dtype=torch.float16, chunk_size=16, gate_scale=1.0, baseline=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_step_matches_reference_step(inplace):
    (q, k, v, i, f), state = make_mlstm_inputs(3, 1, 2, 24, 40, dtype=torch.float32, device=DEVICE, with_state=True)
    q, k, v, i, f = (t[:, 0] for t in (q, k, v, i, f))
    h_ref, s_ref = reference.mlstm_step(*(t.double() for t in (q, k, v, i, f)), MLSTMState(*(t.double() for t in state)))
    before = [t.clone() for t in state]
    h, s = tri.mlstm_step(q, k, v, i, f, state, inplace=inplace)
    assert_close("h", h_ref, h, TOL_FWD[torch.float32])
    for name, a, b in zip("cnm", s_ref, s):
        assert_close(f"state.{name}", a, b, TOL_FWD[torch.float32])
    for a, b, c in zip(before, state, s):
        assert (b is c) if inplace else torch.equal(a, b)


def test_chunkwise_then_steps_continue_the_sequence():
    (q, k, v, i, f), _ = make_mlstm_inputs(1, 20, 2, 16, 16, dtype=torch.float32, device=DEVICE)
    h_all, s_all = reference.mlstm(*(t.double() for t in (q, k, v, i, f)))
    h, s = tri.mlstm(*(t[:, :17] for t in (q, k, v, i, f)), chunk_size=16)
    hs = [h]
    for t in range(17, 20):
        ht, s = tri.mlstm_step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], s)
        hs.append(ht[:, None])
    assert_close("h", h_all, torch.cat(hs, 1), TOL_FWD[torch.float32])
    assert_close("c", s_all.c, s.c, TOL_FWD[torch.float32])


def test_no_grad_call_skips_the_custom_op_with_the_same_results():
    (q, k, v, i, f), state = make_mlstm_inputs(1, 20, 2, 16, 16, dtype=torch.float32, device=DEVICE,
                                               with_state=True, requires_grad=True)
    h, s = tri.mlstm(q, k, v, i, f, state, chunk_size=16)
    with torch.no_grad():
        h_ng, s_ng = tri.mlstm(q, k, v, i, f, state, chunk_size=16)
    assert h.grad_fn is not None and h_ng.grad_fn is None
    for a, b in zip([h, *s], [h_ng, *s_ng]):
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=0)


def check_no_state_no_grad(B, T, H, K, V, *, dtype, chunk_size):
    """Without a state and without autograd the kernels start from zeros they never read: the
    same h and final state as an explicit zero state (bitwise) and as the float64 reference."""
    (q, k, v, i, f), _ = make_mlstm_inputs(B, T, H, K, V, dtype=dtype, device=DEVICE, with_state=False)
    with torch.no_grad():
        h, s = tri.mlstm(q, k, v, i, f, chunk_size=chunk_size)
        h0, s0 = tri.mlstm(q, k, v, i, f, MLSTMState.zeros(B, H, K, V, device=DEVICE), chunk_size=chunk_size)
        ref_h, ref_s = reference.mlstm(*(t.double() for t in (q, k, v, i, f)))
    for a, b in zip([h0, *s0], [h, *s]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert_close("h", ref_h, h, TOL_BWD[dtype])
    for name, a, b in zip("cnm", ref_s, s):
        assert_close(f"state.{name}", a, b, TOL_FWD[dtype])


def test_no_grad_call_without_a_state_starts_from_zeros(poison):
    check_no_state_no_grad(2, 37, 2, 16, 32, dtype=torch.float32, chunk_size=16)


@pytest.mark.parametrize("state_grad", [True, False])
def test_torch_compile_traces_without_graph_breaks(state_grad):
    # state_grad=False: a carried, detached state (the backward skips the initial state's work)
    (q, k, v, i, f), state = make_mlstm_inputs(1, 20, 2, 16, 16, dtype=torch.float32, device=DEVICE,
                                               with_state=True, requires_grad=True)
    if not state_grad:
        state = MLSTMState(*(t.detach() for t in state))

    def fn(q, k, v, i, f, c, n, m):
        h, s = tri.mlstm(q, k, v, i, f, MLSTMState(c, n, m), chunk_size=16)
        return h.sum() + s.c.sum() + s.n.sum() + s.m.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = (q, k, v, i, f, *state)
    wrt = args if state_grad else args[:5]
    g_ref = torch.autograd.grad(fn(*args), wrt)
    g = torch.autograd.grad(compiled(*args), wrt)
    for name, a, b in zip(NAMES, g_ref, g):
        torch.testing.assert_close(b, a, msg=f"compiled grad {name}")


@pytest.mark.parametrize("backend", [Backend.TRITON, Backend.AUTO])
def test_the_ops_entry_point_compiles_without_graph_breaks(backend):
    # a model's layer calls ops.mlstm(backend=...), whose backend checks (installed modules, Triton)
    # must not break the graph of a compiled block (they did: 1.3b training, run 27)
    (q, k, v, i, f), _ = make_mlstm_inputs(1, 20, 2, 16, 16, dtype=torch.float32, device=DEVICE)

    def fn(q, k, v, i, f):
        return ops.mlstm(q, k, v, i, f, backend=backend, chunk_size=16)[0]

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, i, f), fn(q, k, v, i, f))


@pytest.mark.parametrize("joint_gate_up", [False, True])
def test_a_model_block_compiles_without_graph_breaks(joint_gate_up, monkeypatch):
    # what training's --compile does to each block, forward and backward, through the Triton ops;
    # joint_gate_up: the FFN as on CUDA when training (one gate|up GEMM and rowwise.swiglu)
    from fastxlstm.config import ModelConfig
    from fastxlstm.layers import common
    from fastxlstm.model import XLSTMLarge

    if not CUDA:
        monkeypatch.setattr(common, "_joint_gate_up", lambda x: joint_gate_up and torch.is_grad_enabled())
    elif not joint_gate_up:
        monkeypatch.setattr(common, "_joint_gate_up", lambda x: False)
    torch.manual_seed(0)
    model = XLSTMLarge(ModelConfig(vocab_size=64, embedding_dim=64, num_heads=2, num_blocks=1, chunk_size=16))
    block = model.to(DEVICE).backbone.blocks[0]
    x = torch.randn(1, 20, 64, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, _ = compiled(x, backend=Backend.TRITON)
    y_ref, _ = block(x, backend=Backend.TRITON)
    torch.testing.assert_close(y, y_ref)
    g, = torch.autograd.grad(y.square().sum(), x)
    g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_auto_and_named_backend_route_here():
    (q, k, v, i, f), _ = make_mlstm_inputs(1, 20, 2, 16, 16, dtype=torch.float32, device=DEVICE)
    h, _ = ops.mlstm(q, k, v, i, f, backend=Backend.TRITON, chunk_size=16)
    h_ref, _ = reference.mlstm(q.double(), k.double(), v.double(), i.double(), f.double())
    assert_close("h", h_ref, h, TOL_FWD[torch.float32])
    if CUDA:
        assert ops.resolve_backend(Backend.AUTO, "cuda") is Backend.TRITON


def test_auto_takes_native_for_chunk_sizes_the_kernels_do_not_run():
    # a tiny model with chunk 8 on a GPU machine: AUTO runs it natively instead of raising
    assert ops.resolve_backend(Backend.AUTO, "cuda", chunk_size=8) is Backend.NATIVE
    assert ops.resolve_backend(Backend.AUTO, "cuda", chunk_size=48) is Backend.NATIVE
    ready = Backend.TRITON if ops._TRITON_READY else Backend.NATIVE
    assert ops.resolve_backend(Backend.AUTO, "cuda", chunk_size=64) is ready
    assert ops.resolve_backend(Backend.AUTO, "cuda") is ready


def test_unsupported_inputs_raise():
    (q, k, v, i, f), _ = make_mlstm_inputs(1, 20, 2, 16, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        tri.mlstm(q, k, v, i, f)
    with pytest.raises(ValueError, match="chunk_size"):
        tri.mlstm(q.float(), k.float(), v.float(), i, f, chunk_size=48)


# ----------------------------------------------------------------------------- GPU only

def _native64(*a, **kw):
    # float64 chunkwise PyTorch: equal to the recurrent reference to 1e-10 (test_mlstm.py checks
    # that), and fast enough on the GPU for 130k tokens.
    return native.mlstm(*a, chunk_size=256, **kw)


GPU_CASES = [(torch.bfloat16, 64, 256, 512), (torch.bfloat16, 128, 256, 512), (torch.bfloat16, 256, 128, 256),
             (torch.bfloat16, 64, 96, 64), (torch.float16, 128, 128, 256), (torch.float32, 64, 64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,chunk_size,K,V", GPU_CASES)
def test_gpu_real_shapes(poison, dtype, chunk_size, K, V):
    for T in (1, chunk_size - 1, chunk_size + 1, 3 * chunk_size + 7):
        check_against_reference(2, T, 2, K, V, dtype=dtype, chunk_size=chunk_size, ref_fn=_native64, baseline=True)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [64, 128])
def test_gpu_no_state_no_grad(poison, chunk_size):
    check_no_state_no_grad(2, 3 * chunk_size + 5, 8, 256, 512, dtype=torch.bfloat16, chunk_size=chunk_size)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [8192, 131_073])
def test_gpu_long_sequences(poison, T):
    check_against_reference(1, T, 2, 64, 64, dtype=torch.bfloat16, chunk_size=128, ref_fn=_native64)


@pytest.mark.gpu
def test_gpu_step_7b_shape():
    (q, k, v, i, f), state = make_mlstm_inputs(4, 1, 8, 256, 512, dtype=torch.bfloat16, device="cuda", with_state=True)
    q, k, v, i, f = (t[:, 0] for t in (q, k, v, i, f))
    h_ref, s_ref = reference.mlstm_step(*(t.double() for t in (q, k, v, i, f)), MLSTMState(*(t.double() for t in state)))
    h, s = tri.mlstm_step(q, k, v, i, f, state)
    assert_close("h", h_ref, h, torch.bfloat16)
    for name, a, b in zip("cnm", s_ref, s):
        assert_close(f"state.{name}", a, b, torch.float32)


@pytest.mark.gpu
def test_gpu_step_in_place_under_cuda_graph():
    (q, k, v, i, f), state = make_mlstm_inputs(2, 4, 8, 256, 512, dtype=torch.bfloat16, device="cuda", with_state=True)
    ref_state = MLSTMState(*(t.double() for t in state))
    state = MLSTMState(*(t.clone() for t in state))
    x = [t[:, 0].clone() for t in (q, k, v, i, f)]
    tri.mlstm_step(*x, state, inplace=True)                  # compile outside the capture
    state = MLSTMState(*(t.copy_(r) for t, r in zip(state, ref_state)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, _ = tri.mlstm_step(*x, state, inplace=True)
    for t in range(4):
        for buf, src in zip(x, (q, k, v, i, f)):
            buf.copy_(src[:, t])
        graph.replay()
        h_ref, ref_state = reference.mlstm_step(*(s[:, t].double() for s in (q, k, v, i, f)), ref_state)
        assert_close(f"h step {t}", h_ref, h, torch.bfloat16)
    for name, a, b in zip("cnm", ref_state, state):
        assert_close(f"state.{name}", a, b, torch.float32)


def test_short_chunks_take_their_own_tiles(tiles):
    # below chunk 128 a kernel reads its group's _short tiles where CONFIG has them, else the group's
    q = torch.zeros(1, dtype=torch.bfloat16)
    tiles["bwd_dqk_short"]["W"] = 2
    assert tri._tiles("bwd_dqk", q, 64)["W"] == 2
    assert tri._tiles("bwd_dqk", q, 128) == tri.CONFIG["bwd_dqk"]
    assert tri._tiles("bwd_state", q, 64) == tri.CONFIG["bwd_state"]
    assert tri._tiles("fwd_out", q, 32)["S"] == tri.CONFIG["fwd_out_short"]["S"]
