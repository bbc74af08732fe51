"""Hugging Face bridge: transformers' generate() and pipeline run a fastxlstm model, and
save_pretrained writes a directory that transformers' own xLSTMForCausalLM loads to the same logits."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "xLSTMForCausalLM"):
    pytest.skip("this transformers has no xLSTM", allow_module_level=True)

from fastxlstm.config import ModelConfig  # noqa: E402
from fastxlstm.generation import generate  # noqa: E402
from fastxlstm.hf import to_hf  # noqa: E402
from fastxlstm.model import XLSTMLarge  # noqa: E402

# qk head dim 64 (the official native kernel used by transformers mis-sizes tiny head dims), chunk 16
CFG = ModelConfig(vocab_size=97, embedding_dim=128, num_heads=2, num_blocks=2, chunk_size=16,
                  bos_token_id=0, eos_token_id=None, pad_token_id=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = XLSTMLarge(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def test_wrapper_shares_weights_under_the_published_names(model):
    h = to_hf(model)
    keys = set(h.state_dict())
    assert "backbone.embeddings.weight" in keys and "lm_head.weight" in keys and "embedding.weight" not in keys
    assert len(keys) == len(model.state_dict())
    assert h.backbone.embeddings.weight is model.embedding.weight


def test_transformers_generate_equals_ours(model):
    h = to_hf(model)
    ids = torch.randint(2, 97, (1, 40))
    out = h.generate(ids, max_new_tokens=12, do_sample=False)
    assert out[0, 40:].tolist() == generate(model, ids.tolist(), max_new_tokens=12, eos_token_id=None)[0]
    sampled = h.generate(ids, max_new_tokens=5, do_sample=True, top_k=20, temperature=0.7)
    assert sampled.shape == (1, 45)
    with pytest.raises(ValueError, match="padding"):
        h(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))


def test_beam_search_keeps_the_best_beams(model):
    """transformers' beam search reorders our recurrent state between steps (its own xLSTM refuses
    beams: its cache cannot be reordered). Reference: beam search by hand over full forwards."""
    h = to_hf(model)
    ids = torch.randint(2, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    beams, new = 3, 6
    out = h.generate(ids, max_new_tokens=new, num_beams=beams, do_sample=False, length_penalty=1.0)
    hyps = [(ids[0].tolist(), 0.0)]
    with torch.no_grad():
        for _ in range(new):
            cands = []
            for seq, score in hyps:
                lp = torch.log_softmax(model(torch.tensor([seq]))[0][0, -1].float(), -1)
                v, t = lp.topk(beams)
                cands += [(seq + [int(j)], score + float(x)) for x, j in zip(v, t)]
            hyps = sorted(cands, key=lambda c: -c[1])[:beams]
    assert out[0].tolist() == hyps[0][0]


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False),
                                dict(do_sample=True, num_return_sequences=3, top_k=10),
                                dict(do_sample=True, num_beams=2, top_k=10)])
def test_the_recurrent_cache_decodes_as_full_forwards_do(model, kw):
    """Every decoding mode of transformers' generate() gives with our state carried (and reordered
    between beams) what it gives recomputing full forwards (use_cache=False)."""
    h = to_hf(model)
    ids = torch.randint(2, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        runs.append(h.generate(ids, max_new_tokens=8, use_cache=use_cache, **kw))
    assert torch.equal(*runs)


def test_labels_give_the_shifted_loss_and_its_gradient(model):
    """Fine-tuning through transformers: labels (with -100 ignored) give the next-token loss, and
    its gradient reaches the wrapped model's weights."""
    h = to_hf(model)
    ids = torch.randint(2, 97, (2, 30))
    labels = ids.clone()
    labels[0, :7] = -100
    out = h(ids, labels=labels)
    logits, _ = model(ids)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0)
    model.zero_grad()
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].mlstm_layer.q.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_what_the_bridge_cannot_take_is_named(model):
    import dataclasses

    from fastxlstm import StackConfig, XLSTMStackLM

    with pytest.raises(TypeError, match="to_hf needs an XLSTMLarge, got XLSTMStackLM"):
        to_hf(XLSTMStackLM(StackConfig(vocab_size=97, embedding_dim=32, num_blocks=2, slstm_at=(1,))))
    with pytest.raises(ValueError, match="add_out_norm=False cannot be expressed"):
        to_hf(XLSTMLarge(dataclasses.replace(CFG, add_out_norm=False)))
    h = to_hf(model)
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        h(inputs_embeds=torch.zeros(1, 3, 128))
    with pytest.raises(ValueError, match="input_ids is required"):
        h()
    assert h.get_input_embeddings() is model.embedding and h.get_output_embeddings() is model.lm_head


def test_text_generation_pipeline(model, tmp_path):
    from tests.test_tokenizer import write_tokenizer_json

    write_tokenizer_json(tmp_path / "tokenizer.json")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                               bos_token="<s>", pad_token="<pad>", eos_token="</s>")
    pipe = transformers.pipeline("text-generation", model=to_hf(model), tokenizer=tok)
    out = pipe("the cat sat", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith("the cat sat")


def test_save_pretrained_loads_in_transformers_to_the_same_logits(model, tmp_path):
    to_hf(model).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["xLSTMForCausalLM"]
    ref = transformers.xLSTMForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 97, (2, 75))                               # past several chunks of 16
    with torch.no_grad():
        theirs = ref(x).logits
        ours, _ = model(x)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)     # float32, two summation orders
    from fastxlstm.checkpoint import load

    back = load(tmp_path)                                           # and our loader reads it back
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], ours, rtol=0, atol=0)
    from fastxlstm.hf import FastXLSTMForCausalLM

    wrapped = FastXLSTMForCausalLM.from_pretrained(tmp_path)        # and so does the wrapper itself
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x).logits, ours, rtol=0, atol=0)
