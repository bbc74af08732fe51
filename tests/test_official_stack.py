"""Equivalence with the official xlstm package (2.0.6): its NeurIPS xLSTMLMModel, converted with
convert_official, gives the same logits (vanilla sLSTM backend, native mLSTM, float32, CPU)."""

import copy

import pytest
import torch

xlstm = pytest.importorskip("xlstm")

from fastxlstm.official import convert_official, stack_config_from_official  # noqa: E402
from tests.helpers import rel_errors  # noqa: E402

REL_TOL = 1e-4                                              # the interop goal of issue 4


def official_config(**over):
    cfg = dict(vocab_size=97, num_blocks=6, embedding_dim=64, context_length=48, slstm_at=[0, 3, 5],
               mlstm_block=dict(mlstm=dict(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4)),
               slstm_block=dict(slstm=dict(backend="vanilla", num_heads=4, conv1d_kernel_size=4,
                                           bias_init="powerlaw_blockdependent"),
                                feedforward=dict(proj_factor=1.3, act_fn="gelu")))
    cfg.update(over)
    return cfg


def build_official(cfg: dict):
    """The official model from the nested dict, as dacite would build it (without needing dacite)."""
    from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                       xLSTMLMModel, xLSTMLMModelConfig)
    d = copy.deepcopy(cfg)
    mb, sb = d.pop("mlstm_block", None), d.pop("slstm_block", None)
    if mb is not None:
        mb = mLSTMBlockConfig(mlstm=mLSTMLayerConfig(**mb["mlstm"]))
    if sb is not None:
        ff = sb.get("feedforward", {})
        sb = sLSTMBlockConfig(slstm=sLSTMLayerConfig(**sb["slstm"]),
                              feedforward=FeedForwardConfig(**ff) if ff is not None else None)
    model = xLSTMLMModel(xLSTMLMModelConfig(mlstm_block=mb, slstm_block=sb, **d))
    model.reset_parameters()
    with torch.no_grad():                 # off the init (R = 0, norms at 0) so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def check_logits(cfg, state_dict=None, T=48):
    torch.manual_seed(0)
    official = build_official(cfg)
    ours = convert_official(cfg, state_dict if state_dict is not None else official.state_dict()).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, T))
    with torch.no_grad():
        ref = official(ids)
        out, _ = ours(ids)
    rmse, max_abs = rel_errors(ref, out)
    assert rmse < REL_TOL and max_abs < REL_TOL, f"rel-RMSE {rmse:.2e}, rel max-abs {max_abs:.2e}"
    return official, ours


@pytest.mark.parametrize("over", [
    {},                                                               # sLSTM first, middle and last
    dict(slstm_at=[1], tie_weights=True),
    dict(slstm_at="all", mlstm_block=None, num_blocks=3),
    dict(slstm_at=[], slstm_block=None, num_blocks=2, add_post_blocks_norm=False),
    dict(embedding_dim=96, num_blocks=3, slstm_at=[1]),               # widths where dim / E * E rounds up
])
def test_logits_match_official(over):
    check_logits(official_config(**over))


def test_cuda_layout_state_dict():
    """A state dict saved by a model built with backend "cuda" (other R and bias layouts), made
    here with the official cell's own layout conversion, since building it needs a GPU."""
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda, sLSTMCellConfig
    cfg = official_config()
    torch.manual_seed(0)
    official = build_official(cfg)
    sd = official.state_dict()
    for idx in cfg["slstm_at"]:
        cell = official.xlstm_block_stack.blocks[idx].xlstm.slstm_cell
        cuda = sLSTMCell_cuda(sLSTMCellConfig(hidden_size=64, num_heads=4, backend="cuda"), skip_backend_init=True)
        key = f"xlstm_block_stack.blocks.{idx}.xlstm.slstm_cell."
        ext = cell._recurrent_kernel_int2ext(cell._recurrent_kernel_.detach())   # (H, D_in, 4, D_out)
        sd[key + "_recurrent_kernel_"] = cuda._recurrent_kernel_ext2int(ext)
        sd[key + "_bias_"] = cuda._bias_ext2int(cell._bias_int2ext(cell._bias_.detach()))
    cuda_cfg = copy.deepcopy(cfg)
    cuda_cfg["slstm_block"]["slstm"]["backend"] = "cuda"
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        ref = official(ids)
        out, _ = convert_official(cuda_cfg, sd).eval()(ids)
    rmse, max_abs = rel_errors(ref, out)
    assert rmse < REL_TOL and max_abs < REL_TOL, f"rel-RMSE {rmse:.2e}, rel max-abs {max_abs:.2e}"


def test_longer_than_official_context_runs():
    """The official mLSTM layer fails beyond context_length; the converted model does not."""
    cfg = official_config(context_length=16)
    torch.manual_seed(0)
    ours = convert_official(cfg, build_official(cfg).state_dict())
    logits, _ = ours(torch.randint(0, 97, (1, 70)))
    assert logits.shape == (1, 70, 97) and torch.isfinite(logits).all()


def test_bad_config_and_state_dict_raise():
    with pytest.raises(ValueError, match="unknown keys"):
        stack_config_from_official(official_config(not_a_field=1))

    def slstm(**over):
        cfg = official_config()
        cfg["slstm_block"]["slstm"].update(over)
        return cfg

    def ffn(**over):
        cfg = official_config()
        cfg["slstm_block"]["feedforward"].update(over)
        return cfg

    for cfg, match in ((official_config(slstm_block=None), r"slstm_at=\[0, 3, 5\] needs a slstm_block"),
                       (slstm(function="lstm"), "function must be 'slstm' with 4 gates"),
                       (slstm(forward_clipval=1.0), "clipping options .* are not supported"),
                       (ffn(act_fn="swish-ish"), "act_fn must be one of"),
                       (ffn(proj_factor=1.1, round_proj_up_to_multiple_of=8), "not a multiple of 64"),
                       (official_config(mlstm_block=[1]), "mlstm_block must be a dict, got list")):
        with pytest.raises(ValueError, match=match):
            stack_config_from_official(cfg)
    with pytest.raises(ValueError, match="backend"):
        cfg = official_config()
        cfg["slstm_block"]["slstm"]["backend"] = "triton"
        stack_config_from_official(cfg)
    cfg = official_config()
    sd = build_official(cfg).state_dict()
    sd.pop("token_embedding.weight")
    with pytest.raises(ValueError, match="token_embedding"):
        convert_official(cfg, sd)
