"""y = x W^T (+ b) for a few rows of x (M <= 16): the weight stream of a small-batch decode step.

At batch 1..16 a decode GEMM reads all of W for a handful of rows, so it should run at the
copy rate; cuBLAS's small-M kernels reach 2.4 TB/s on the 7B's 4096 x 4096 out_proj and
3.1-3.8 on the larger weights of the H200 (runs 52, 53). This kernel cuts W into BN-row tiles and
each tile's K into SPLITS equal ranges, one program per (tile, range), and leaves the loop free of
branches so that the compiler issues the coming iterations' weight loads ahead (num_stages of
them, cp.async into shared memory on sm_90); the batch is the dot's N side (padded to 16). A
tile cut into several ranges stores fp32 partial sums, and the last of its programs to finish (a
per-tile counter) adds them in range order and writes the tile: deterministic, one launch, and the
counter is left at zero for the next launch.

The work between a decode block's GEMMs rides in their epilogues (so a block is five launches,
generation/fused.py): silu(gate) x up (glu), the residual add, the RMSNorm split in two (the
producer writes x * norm weight and each tile's sums of x^2, the consumer scales its rows by
rsqrt(mean x^2 + eps)), the LM head's float32 soft cap and greedy decoding's argmax over the
logits (run 75: +0.4 % at batch 1 through generate()). Only the finishing program of a tile
does epilogue work; the loop is the same for every option (extra loads in it stall the weight
stream: 16-23 % slower when the norms were folded there, run 56).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...rowwise.triton import _pdl_enter, _tanh, use_pdl

# BN weight rows x BK of K per loop step, W warps, S pipeline stages; K is split so that the
# programs fill ``ctas`` slots per SM in as few rounds as possible; shapes: overrides per "NxK"
# (``splits`` fixes the split; the gate|up weight's key is its 2F x K), glu: overrides for glu.
# Run 53 (32 weight copies in one CUDA graph, against cuBLAS in the same process, batch 16):
# out_proj 10.8 vs 13.1 us, in 28.7 vs 29.5, gate|up 47.8 vs 47.9, down 24.8 vs 28.7, LM head
# (ctas 2) 100.8 vs 124.5. Retuned in the five-launch step (runs 64, 66, 70, 72 of session 10, one
# process each): 3 stages (4: -1.1 % at batch 1), glu tiles of 64 gate + 64 up rows (32: -1.0 to
# -1.8 %); TMA weight loads (-2.3 to -10 %), the first tiles loaded into registers before the PDL
# wait (-13 to -23 %; the first tile alone, the cp.async stream unchanged: -8 %, run 91), an L2
# prefetch before the wait and a late PDL trigger were slower at batch 1.
# Session 16 timed every program (%globaltimer, run 115): the last program of a split tile spends
# ~1.9 us after its loop (partials stored, the counter's round trip, the partials loaded, the
# epilogue), on the critical path of every launch. out_proj, proj_down and the input GEMM at 32-row
# tiles, unsplit (no counter, no partials), with 6 stages to keep as many bytes in flight: batch 1
# 261.6 -> 266.4 tokens/s, batch 16 3,134 -> 3,159 (runs 118-122, one process, interleaved); 1 warp
# for the input GEMM's 385 programs (3 an SM), 4 for the others' 128. Unsplit at 5 or 7 stages,
# 8 warps, gate|up or the LM head at 32 rows, the epilogue's inputs loaded before the counter, and
# stream-K (equal step ranges, two tiles a program) were slower (runs 116-123).
CONFIG = dict(BN=64, BK=128, W=4, S=3, ctas=1, pdl=True, glu=dict(BN=64),
              shapes={"4096x4096": dict(BN=32, BK=256, S=6, splits=1),
                      "4096x10944": dict(BN=32, BK=256, S=6, splits=1),
                      "12304x4096": dict(BN=32, W=1, S=6, splits=1),
                      "50304x4096": dict(ctas=2)})
_BM = 16
SKINNY_ROWS = _BM                                           # the most rows of x it takes


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, r_ptr, g_ptr, yg_ptr, sq_ptr, rms_ptr,
                   amv_ptr, ami_ptr, ids_ptr, ids_stride, TILES,
                   M, N, K, K_PER, RMS_TILES, eps, cap,
                   HAS_B: tl.constexpr, CAP: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                   NORM: tl.constexpr, RMS: tl.constexpr, RMS_T: tl.constexpr, SPLITS: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
                   ARGMAX: tl.constexpr, AM_T: tl.constexpr):
    """N output columns; GLU: w holds N gate rows over N up rows, and a program takes the BN gate
    rows of its tile and the same BN up rows (two dots a step). The epilogue options (RES, NORM,
    RMS) are described at skinny_linear."""
    pid = tl.program_id(0)
    t = pid // SPLITS
    sp = pid - t * SPLITS
    rn = t * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    mn = rn < N
    mm = rm < M
    k0 = sp * K_PER
    k1 = tl.minimum(k0 + K_PER, K)
    wrow = w_ptr + rn.to(tl.int64)[:, None] * K
    urow = w_ptr + (rn + N).to(tl.int64)[:, None] * K      # GLU: the up rows of the same columns
    _pdl_enter(PDL)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    acc2 = tl.zeros([BN, BM], dtype=tl.float32)
    for kk in range(k0, k1, BK):
        ok = kk + tl.arange(0, BK)
        mk = ok < k1
        wm = mn[:, None] & mk[None, :]
        w = tl.load(wrow + ok[None, :], mask=wm, other=0.0)
        x = tl.trans(tl.load(x_ptr + rm[:, None] * K + ok[None, :], mask=mm[:, None] & mk[None, :],
                             other=0.0).to(w.dtype))
        acc += tl.dot(w, x, input_precision=PREC)
        if GLU:
            acc2 += tl.dot(tl.load(urow + ok[None, :], mask=wm, other=0.0), x, input_precision=PREC)
    finish = True                                           # this program writes the tile
    if SPLITS > 1:
        P: tl.constexpr = (2 if GLU else 1) * BN * BM
        tile = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
        slab = ws_ptr + (t.to(tl.int64) * SPLITS + sp) * P
        tl.store(slab + tile, acc)
        if GLU:
            tl.store(slab + BN * BM + tile, acc2)
        tl.debug_barrier()                                  # every thread's partials precede the release
        finish = tl.atomic_add(lock_ptr + t, 1, sem="acq_rel") == SPLITS - 1
        if finish:                                          # the last of the tile's programs adds them up
            acc = tl.zeros([BN, BM], dtype=tl.float32)
            acc2 = tl.zeros([BN, BM], dtype=tl.float32)
            for j in tl.static_range(SPLITS):               # unrolled: the loads go out together
                part = ws_ptr + (t.to(tl.int64) * SPLITS + j) * P
                acc += tl.load(part + tile, cache_modifier=".cg")
                if GLU:
                    acc2 += tl.load(part + BN * BM + tile, cache_modifier=".cg")
            tl.store(lock_ptr + t, 0)                       # ready for the next launch
    if finish:
        v = _skinny_out(acc, acc2, b_ptr, y_ptr, r_ptr, g_ptr, yg_ptr, sq_ptr, rms_ptr, t, rn, rm, mn, mm,
                        N, K, RMS_TILES, eps, cap, w_ptr.dtype.element_ty, HAS_B, CAP, GLU, RES, NORM, RMS,
                        RMS_T, BM)
        if ARGMAX:
            _argmax_tiles(v, amv_ptr, ami_ptr, ids_ptr, ids_stride, lock_ptr, t, TILES, rn, rm, mn, mm, N, BM, AM_T)


@triton.jit
def _rnd(x, dtype: tl.constexpr):
    """x rounded to dtype and back to fp32: where an eager op of the model rounds."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _skinny_out(acc, acc2, b_ptr, y_ptr, r_ptr, g_ptr, yg_ptr, sq_ptr, rms_ptr, t, rn, rm, mn, mm,
                N, K, RMS_TILES, eps, cap, dt: tl.constexpr, HAS_B: tl.constexpr, CAP: tl.constexpr,
                GLU: tl.constexpr, RES: tl.constexpr, NORM: tl.constexpr, RMS: tl.constexpr, RMS_T: tl.constexpr,
                BM: tl.constexpr):
    """The finishing program's work on its tile (acc: BN columns x BM rows); dt: the weights' dtype."""
    if RMS:                                                 # x's rows were RMS-normalised: scale by rsqrt(mean x^2)
        j = tl.arange(0, RMS_T)                             # all tiles' sums in one load (a loop of
        ss = tl.sum(tl.load(rms_ptr + j[:, None] * BM + rm[None, :],   # loads would wait on each)
                            mask=(j < RMS_TILES)[:, None] & mm[None, :], other=0.0), 0)
        r = 1.0 / tl.sqrt(ss / K + eps)
        acc = acc * r[None, :]
        if GLU:
            acc2 = acc2 * r[None, :]
    if HAS_B:
        acc = acc + tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[:, None]
        if GLU:
            acc2 = acc2 + tl.load(b_ptr + N + rn, mask=mn, other=0.0).to(tl.float32)[:, None]
    if GLU:                                                 # silu(gate) * up, rounded as the model's ops
        g = _rnd(acc, dt)
        acc = _rnd(g / (1.0 + tl.exp(-g)), dt) * _rnd(acc2, dt)
    out = rm[None, :] * N + rn[:, None]
    ok = mn[:, None] & mm[None, :]
    y = acc.to(dt)
    if RES:                                                 # the residual add, rounded as the model's
        y = (tl.load(r_ptr + out, mask=ok, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dt)
    v = y.to(tl.float32)
    if CAP:                                                 # logits: float32, soft-capped there
        v = cap * _tanh(v / cap)
        tl.store(y_ptr + out, v, mask=ok)
    else:
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=ok)
    if NORM:                                                # y * norm weight, and this tile's sums of y^2
        yf = y.to(tl.float32)
        tl.store(yg_ptr + out, (yf * tl.load(g_ptr + rn, mask=mn, other=0.0).to(tl.float32)[:, None]).to(dt),
                 mask=ok)
        tl.store(sq_ptr + t * BM + rm, tl.sum(yf * yf, 0), mask=mm)
    return v


@triton.jit
def _first_max(v, i, big):
    """Over axis 0: the largest v and the smallest i holding it (torch.argmax's choice)."""
    top = tl.max(v, 0)
    return top, tl.min(tl.where(v == top[None, :], i, big), 0)


@triton.jit
def _argmax_tiles(v, amv_ptr, ami_ptr, ids_ptr, ids_stride, lock_ptr, t, TILES, rn, rm, mn, mm, N,
                  BM: tl.constexpr, AM_T: tl.constexpr):
    """Greedy decoding's argmax over the logits v (BN columns x BM rows) of all tiles: each tile
    stores its rows' first maximum; the last tile to finish (a counter after the per-tile ones)
    picks each row's first maximum over the tiles and writes the token ids. NaN counts as the
    largest value, as in torch.argmax."""
    v = tl.where(v != v, float("inf"), v)
    v = tl.where(mn[:, None], v, -float("inf"))
    top, at = _first_max(v, tl.broadcast_to(rn[:, None], v.shape), N)
    tl.store(amv_ptr + t * BM + rm, top)
    tl.store(ami_ptr + t * BM + rm, at)
    tl.debug_barrier()                                      # the tile's pick precedes the release
    if tl.atomic_add(lock_ptr + TILES, 1, sem="acq_rel") == TILES - 1:
        CH: tl.constexpr = AM_T if AM_T < 256 else 256       # tiles a load (the chunks' loads are independent)
        top = tl.full([BM], -float("inf"), tl.float32)
        best = tl.full([BM], N, tl.int32)
        for c in tl.static_range(0, AM_T, CH):
            j = c + tl.arange(0, CH)
            ok = (j < TILES)[:, None] & (rm >= 0)[None, :]
            tv = tl.load(amv_ptr + j[:, None] * BM + rm[None, :], mask=ok, other=-float("inf"),
                         cache_modifier=".cg")
            ti = tl.load(ami_ptr + j[:, None] * BM + rm[None, :], mask=ok, other=N, cache_modifier=".cg")
            ctop, cat = _first_max(tv, ti, N)
            take = (ctop > top) | ((ctop == top) & (cat < best))   # chunks in index order: ties keep the first
            top = tl.where(take, ctop, top)
            best = tl.where(take, cat, best)
        tl.store(ids_ptr + rm * ids_stride, best.to(tl.int64), mask=mm)
        tl.store(lock_ptr + TILES, 0)                       # ready for the next launch


def _plan(N: int, K: int, device: torch.device, glu: bool = False) -> dict:
    """N: output columns (GLU: half the weight's rows; a GLU tile reads CONFIG["glu"]["BN"] gate rows
    and as many up rows)."""
    cfg = {k: v for k, v in CONFIG.items() if k not in ("shapes", "glu")}
    cfg.update(CONFIG["shapes"].get(f"{2 * N if glu else N}x{K}", {}))
    if glu:
        cfg.update(CONFIG["glu"])
    BK = cfg["BK"] = max(16, min(cfg["BK"], triton.next_power_of_2(K)))
    tiles = triton.cdiv(N, cfg["BN"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    steps = triton.cdiv(K, BK)
    slots = cfg["ctas"] * sms
    # rounds of programs x work per program: the fewest splits within 5 % of the least
    cost = {s: -(-tiles * s // slots) / s for s in range(1, min(steps, 32) + 1)}
    best = min(cost.values())
    splits = cfg.get("splits") or min(s for s, c in cost.items() if c <= 1.05 * best)
    cfg.update(tiles=tiles, splits=splits, k_per=triton.cdiv(steps, splits) * BK)
    cfg["splits"] = triton.cdiv(K, cfg["k_per"])            # no empty range
    return cfg


def skinny_lock_size(N: int, K: int, device: torch.device | str = "cuda", argmax: bool = False) -> int:
    """Counters a skinny_linear of this weight shape (N, K) needs, with or without glu (one per
    tile), and one more with argmax_out."""
    return max(_plan(N, K, torch.device(device))["tiles"] + argmax,
               _plan(N // 2, K, torch.device(device), True)["tiles"])


def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, glu: bool = False,
                  lock: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                  norm_weight: torch.Tensor | None = None, sumsq: torch.Tensor | None = None,
                  rms: torch.Tensor | None = None, eps: float = 1e-6, logits: bool = False,
                  logit_cap: float | None = None, argmax_out: torch.Tensor | None = None):
    """x (M, K) with M <= 16, w (N, K) row-major (nn.Linear), b (N,): x w^T + b in w's dtype,
    summed in float32. glu: w is the gate rows over the up rows (2F, K) and the result
    silu(gate) * up (M, F), rounded where the model's F.linear, silu and product round.
    lock: int32 zeros, at least ``skinny_lock_size(N, K)``; the kernel leaves them zero (one
    buffer serves launches that run one after another).

    An RMSNorm between two of these GEMMs goes into their epilogues, so it costs no launch:
    residual (M, N): the result is residual + (x w^T + b), rounded as the model's add.
    norm_weight (N,) with sumsq (a float32 buffer of at least 16 x the tiles): also returns
    y * norm_weight and the sums of y^2 over each tile's columns: ``(y, y * norm_weight, sums)``.
    rms (the sums from such a call, over x's K columns): x is taken as rows that still need
    RMSNorm's scale, x w^T becomes rsqrt(mean(row^2) + eps) * x w^T before the bias (and the glu).
    So ``skinny_linear(yg, w2, rms=sums)`` is ``skinny_linear(rms_norm(y), w2)`` up to where the
    rounding falls.
    logits: the LM head's end as the model computes it, in float32: the result rounded to w's
    dtype, then cap * tanh(y / cap) with logit_cap (none when 0 or None).
    argmax_out (M,) int64, with logits: also writes each row's argmax there (the first of equal
    maxima, NaN the largest, as torch.argmax), the greedy token, with no launch of its own. The lock
    then needs one more counter (``skinny_lock_size(..., argmax=True)``)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x (M, K) and w (N, K) must agree in K, got {tuple(x.shape)} and {tuple(w.shape)}")
    if not 1 <= x.shape[0] <= SKINNY_ROWS:
        raise ValueError(f"skinny_linear takes 1 to {SKINNY_ROWS} rows, got {x.shape[0]}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"skinny_linear takes float32, bfloat16 or float16 weights, got {w.dtype}")
    if glu and w.shape[0] % 2:
        raise ValueError(f"glu needs an even number of weight rows (gate over up), got {w.shape[0]}")
    M, K = x.shape
    N = w.shape[0] // 2 if glu else w.shape[0]
    x, w = x.contiguous(), w.contiguous()
    p = _plan(N, K, x.device, glu)
    if lock is None:
        lock = torch.zeros(p["tiles"], device=x.device, dtype=torch.int32)
    elif lock.numel() < p["tiles"] or lock.dtype != torch.int32:
        raise ValueError(f"lock must be int32 zeros of at least {p['tiles']} elements")
    if residual is not None and (glu or residual.shape != (M, N) or residual.dtype != w.dtype):
        raise ValueError(f"residual must be ({M}, {N}) in {w.dtype} (and no glu), got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if (norm_weight is None) != (sumsq is None):
        raise ValueError("norm_weight and sumsq go together")
    if norm_weight is not None:
        if glu or norm_weight.shape != (N,):
            raise ValueError(f"norm_weight must be ({N},) (and no glu), got {tuple(norm_weight.shape)}")
        if sumsq.dtype != torch.float32 or sumsq.numel() < p["tiles"] * _BM:
            raise ValueError(f"sumsq must be float32 of at least {p['tiles'] * _BM} elements")
        sumsq = sumsq.view(-1)[:p["tiles"] * _BM].view(p["tiles"], _BM)
    if rms is not None and (rms.dtype != torch.float32 or rms.dim() != 2 or rms.shape[1] != _BM
                            or rms.shape[0] not in {triton.cdiv(K, bn) for bn in (16, 32, 64, 128, 256)}):
        raise ValueError(f"rms must be the (tiles, {_BM}) float32 sums of a skinny_linear with norm_weight "
                         f"over {K} columns (tiles: {K} / its tile rows), got {tuple(rms.shape)} {rms.dtype}")
    if logits and (glu or residual is not None or norm_weight is not None):
        raise ValueError("logits takes no glu, residual or norm_weight")
    if argmax_out is not None:
        if not logits or argmax_out.dtype != torch.int64 or argmax_out.shape != (M,):
            raise ValueError(f"argmax_out must be ({M},) int64, with logits=True, got "
                             f"{tuple(argmax_out.shape)} {argmax_out.dtype}")
        if lock.numel() < p["tiles"] + 1:
            raise ValueError(f"argmax_out needs a lock of at least {p['tiles'] + 1} int32 zeros")
    y = torch.empty(M, N, device=x.device, dtype=torch.float32 if logits else w.dtype)
    yg = torch.empty(M, N, device=x.device, dtype=w.dtype) if norm_weight is not None else y
    ws = torch.empty(p["tiles"] * p["splits"] * p["BN"] * _BM * (2 if glu else 1) if p["splits"] > 1 else 1,
                     device=x.device, dtype=torch.float32)
    kw = dict(num_warps=p["W"], num_stages=p["S"])
    if use_pdl(x, p["pdl"]):
        kw["launch_pdl"] = True
    am = argmax_out is not None
    amv = torch.empty(p["tiles"] * _BM if am else 1, device=x.device, dtype=torch.float32)
    ami = torch.empty(p["tiles"] * _BM if am else 1, device=x.device, dtype=torch.int32)
    _skinny_kernel[(p["tiles"] * p["splits"],)](
        x, w, b if b is not None else w, y, ws, lock, residual if residual is not None else y,
        norm_weight if norm_weight is not None else w, yg, sumsq if sumsq is not None else ws,
        rms if rms is not None else ws, amv, ami, argmax_out if am else lock, argmax_out.stride(0) if am else 0,
        p["tiles"], M, N, K, p["k_per"], rms.shape[0] if rms is not None else 0, eps,
        float(logit_cap or 1.0), HAS_B=b is not None, CAP=logits and bool(logit_cap and logit_cap > 0), GLU=glu,
        RES=residual is not None, NORM=norm_weight is not None, RMS=rms is not None,
        RMS_T=triton.next_power_of_2(rms.shape[0]) if rms is not None else 1, SPLITS=p["splits"], BM=_BM,
        BN=p["BN"], BK=p["BK"], PREC="ieee" if w.dtype == torch.float32 else "tf32", PDL="launch_pdl" in kw,
        ARGMAX=am, AM_T=triton.next_power_of_2(p["tiles"]) if am else 1, **kw)
    return (y, yg, sumsq) if norm_weight is not None else y
