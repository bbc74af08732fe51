"""Tokenizers: bytes round-trip, a tokenizer.json is found in a model directory and fits the model,
the BOS id comes from the config, and a missing package or a misfit is a clear error."""

import json
import sys

import pytest

from fastxlstm.config import ModelConfig
from fastxlstm.generation import encode_prompts, generate
from fastxlstm.model import XLSTMLarge
from fastxlstm.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder, load_tokenizer

WORDS = ["<s>", "<pad>", "</s>", "[UNK]", "the", "cat", "sat", "on", "mat", "a"]


def write_tokenizer_json(path):
    """A word-level tokenizer.json written by hand (no training, no download)."""
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, w in enumerate(WORDS[:3])],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(WORDS)}, "unk_token": "[UNK]"},
    }
    path.write_text(json.dumps(spec))


def test_bytes_round_trip():
    tok = ByteTokenizer()
    text = "héllo ☃"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("A") == [65]
    with pytest.raises(ValueError, match="256"):
        tok.decode([300])


def test_incremental_decoder_bounds_an_invalid_run():
    dec = IncrementalDecoder(ByteTokenizer())
    out = "".join(dec.push(0xFF) for _ in range(40)) + dec.flush()
    assert out.count("\ufffd") == 40


def test_load_tokenizer_rules(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, 256), ByteTokenizer)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path, 50304)


def test_tokenizer_json_in_model_dir(tmp_path):
    pytest.importorskip("tokenizers")
    write_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path, 16)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(WORDS)
    assert tok.encode("the cat sat") == [4, 5, 6]
    assert tok.decode([0, 4, 5, 2]) == "the cat"                # special tokens are not printed
    with pytest.raises(ValueError, match=r"vocabulary \(10 ids\) does not fit the model \(vocab_size 8\)"):
        load_tokenizer(tmp_path, 8)


def test_bos_from_config_is_prepended_to_text_only(tmp_path):
    pytest.importorskip("tokenizers")
    write_tokenizer_json(tmp_path / "tokenizer.json")
    cfg = ModelConfig(vocab_size=16, embedding_dim=32, num_heads=2, num_blocks=1, bos_token_id=0,
                      eos_token_id=2, pad_token_id=1)
    model = XLSTMLarge(cfg)
    tok = load_tokenizer(tmp_path, cfg.vocab_size)
    ids, text_mode, single, _ = encode_prompts(model, "the cat", tokenizer=tok)
    assert ids == [[0, 4, 5]] and text_mode and single
    assert encode_prompts(model, [[4, 5]])[0] == [[4, 5]]                # token ids are taken as given
    assert encode_prompts(model, "the cat", tokenizer=tok, add_bos=False)[0] == [[4, 5]]
    out = generate(model, "the cat", tokenizer=tok, max_new_tokens=3, eos_token_id=None)
    assert isinstance(out, str)


def test_missing_tokenizers_package_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(RuntimeError, match="pip install tokenizers"):
        load_tokenizer(tmp_path, 50304)


def test_incremental_decoder_keeps_a_bounded_window():
    dec = IncrementalDecoder(ByteTokenizer())
    text = "".join(dec.push(b) for b in ("abc ☃ " * 500).encode())
    assert text == "abc ☃ " * 500
    assert len(dec.ids) <= 4
