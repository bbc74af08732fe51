"""Generation: greedy equals the full forward's argmax, a batch equals its rows alone, sampling is
reproducible and follows the distribution, states fork and survive a file, scoring in pieces equals
one pass, the CLI streams, and bad input is refused by name."""

import os
import subprocess
import sys

import pytest
import torch

from fastxlstm.config import ModelConfig
from fastxlstm.generation import (GenerationStats, SamplingParams, fork, generate, load_state, prefill,
                                  save_state, score, select_rows, stream)
from fastxlstm.generation.sampling import _mix32, _mix32_int, choose, row_keys
from fastxlstm.model import XLSTMLarge

# byte-level, chunk 8: prompts of 3..20 tokens cross chunk edges in the prefill
CFG = ModelConfig(vocab_size=256, embedding_dim=64, num_heads=4, num_blocks=2, chunk_size=8,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)


def randomized(model, dtype=torch.float64, scale=0.3, seed=0):
    """``model`` with weights far from the init (peaked, varied logits); float64, so no argmax is a
    rounding tie."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return model


def random_model(cfg=CFG, dtype=torch.float64, scale=0.3, seed=0):
    return randomized(XLSTMLarge(cfg), dtype, scale, seed)


@pytest.fixture(scope="module")
def model():
    return random_model()


def prompts_of(lengths, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# --- greedy and batches -------------------------------------------------------------------------

def assert_greedy_equals_argmax_of_full_forward(model, prompt, n=12):
    """Each of n greedy tokens is the argmax of a full forward over everything before it."""
    new = generate(model, [prompt], max_new_tokens=n)[0]
    assert len(new) == n
    seq = list(prompt)
    for t in new:
        logits, _ = model(torch.tensor([seq]))
        assert t == int(logits[0, -1].argmax())
        seq.append(t)
    assert len(set(new)) > 1, "a constant output would make this test vacuous"


def test_greedy_equals_argmax_of_full_forward(model):
    assert_greedy_equals_argmax_of_full_forward(model, prompts_of([13])[0])


def test_mixed_length_batch_equals_each_prompt_alone(model):
    prompts = prompts_of([3, 17, 9, 17, 1])
    batch = generate(model, prompts, max_new_tokens=9)
    alone = [generate(model, [p], max_new_tokens=9)[0] for p in prompts]
    assert batch == alone
    kw = dict(max_new_tokens=9, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    seeds = [11, 12, 13, 14, 15]
    batch = generate(model, prompts, seed=seeds, **kw)
    alone = [generate(model, [p], seed=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert batch == alone
    assert generate(model, prompts, seed=11, **kw) == batch          # int seed: row r uses seed + r


def test_prefill_state_equals_a_single_full_forward(model):
    prompts = prompts_of([5, 20, 5])
    state, logits = prefill(model, prompts)
    for r, p in enumerate(prompts):
        full, st = model(torch.tensor([p]))
        torch.testing.assert_close(logits[r], full[0, -1].to(logits.dtype), rtol=0, atol=1e-12)
        for a, b in zip(select_rows(state, [r]), st):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_long_prompt_prefilled_in_pieces(model, monkeypatch):
    """A prompt longer than the prefill piece is consumed piece by piece, the state carried."""
    import fastxlstm.generation.engine as engine

    prompt = prompts_of([50])[0]
    ref = generate(model, [prompt], max_new_tokens=5)
    monkeypatch.setattr(engine, "_LOGIT_BUDGET", 16 * 256)           # piece = 16 tokens: 4 pieces
    assert engine.prefill_piece(model) == 16
    assert generate(model, [prompt], max_new_tokens=5) == ref


# --- stopping -----------------------------------------------------------------------------------

def test_max_new_tokens_and_eos(model):
    prompt = prompts_of([6])[0]
    free = generate(model, [prompt], max_new_tokens=10)[0]
    for n in (1, 2, 7):
        assert generate(model, [prompt], max_new_tokens=n)[0] == free[:n]
    eos = free[4]
    first = free.index(eos)
    out = generate(model, [prompt, prompt], max_new_tokens=10, eos_token_id=[eos], seed=0)
    assert out == [free[:first + 1]] * 2                             # eos included, then the row stops
    events = list(stream(model, [prompt], max_new_tokens=10, eos_token_id=eos))
    assert [e.finish_reason for e in events] == [None] * first + ["eos"]
    assert generate(model, [prompt], max_new_tokens=10, eos_token_id=None)[0] == free


def test_rows_of_a_batch_stop_on_their_own(model):
    """One row reaches eos while the other goes on: the finished row yields nothing more, and the
    other generates exactly what it generates alone."""
    p0, p1 = prompts_of([6, 11])
    free0, free1 = (generate(model, [p], max_new_tokens=12, eos_token_id=None)[0] for p in (p0, p1))
    eos = next(t for t in free0[1:6] if t not in free1)                 # ends row 0 early, never row 1
    first = free0.index(eos)
    assert generate(model, [p0, p1], max_new_tokens=12, eos_token_id=eos) == [free0[:first + 1], free1]
    events = list(stream(model, [p0, p1], max_new_tokens=12, eos_token_id=eos))
    rows = [[e for e in events if e.row == r] for r in (0, 1)]
    assert [e.token_id for e in rows[0]] == free0[:first + 1] and rows[0][-1].finish_reason == "eos"
    assert [e.token_id for e in rows[1]] == free1 and rows[1][-1].finish_reason == "length"
    last0 = max(i for i, e in enumerate(events) if e.row == 0)
    assert [e.row for e in events[last0 + 1:]] == [1] * (12 - first)   # row 1 alone after row 0's eos


def test_config_eos_is_the_default(model):
    prompt = prompts_of([6])[0]
    free = generate(model, [prompt], max_new_tokens=10)[0]
    eos_model = random_model(ModelConfig(**{**CFG.to_dict(), "eos_token_id": free[3]}))
    first = free.index(free[3])
    assert generate(eos_model, [prompt], max_new_tokens=10)[0] == free[:first + 1]
    assert generate(eos_model, [prompt], max_new_tokens=10, eos_token_id=None)[0] == free


def test_stop_strings_cut_the_text_and_are_never_streamed():
    ascii_model = random_model(seed=3)
    prompt = "The cat"
    full = generate(ascii_model, prompt, max_new_tokens=40, eos_token_id=None)
    assert isinstance(full, str) and len(full) >= 12
    stop = full[6:9]
    cut = full.index(stop)
    out = generate(ascii_model, prompt, max_new_tokens=40, stop=[stop, "\x00never"])
    assert out == full[:cut]
    events = list(stream(ascii_model, [prompt], max_new_tokens=40, stop=stop))
    assert "".join(e.text for e in events) == full[:cut]
    assert events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)
    # the stop string completed by a later token: what was held back is released when it fails
    nostop = generate(ascii_model, prompt, max_new_tokens=40, stop=full[-2:] + "\x01")
    assert nostop == full


# --- sampling -----------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_seeds_matter(model):
    prompts = prompts_of([4, 7])
    kw = dict(max_new_tokens=12, temperature=1.0)
    a = generate(model, prompts, seed=5, **kw)
    assert a == generate(model, prompts, seed=5, **kw)
    assert a != generate(model, prompts, seed=6, **kw)
    torch.manual_seed(123)
    b = generate(model, prompts, **kw)
    torch.manual_seed(123)
    assert b == generate(model, prompts, **kw)


def test_filters_that_leave_one_token_are_greedy(model):
    prompts = prompts_of([4, 9])
    greedy = generate(model, prompts, max_new_tokens=8)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999999)):
        assert generate(model, prompts, max_new_tokens=8, temperature=1.5, seed=0, **kw) == greedy


def test_gumbel_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    n = 40000
    keys = row_keys(list(range(n)))
    picks = choose(logits.expand(n, -1), SamplingParams(temperature=1.0), keys=keys,
                   step=torch.tensor(3))
    freq = torch.bincount(picks, minlength=5).double() / n
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.01, rtol=0)
    # top-k 2 keeps the two best in their relative proportion; temperature 0.5 sharpens
    picks = choose(logits.expand(n, -1), SamplingParams(temperature=0.5, top_k=2), keys=keys,
                   step=torch.tensor(0))
    freq = torch.bincount(picks, minlength=5).double() / n
    p = torch.softmax(torch.tensor([4.0, 2.0], dtype=torch.float64), -1)
    torch.testing.assert_close(freq, torch.cat([p, torch.zeros(3, dtype=torch.float64)]), atol=0.01, rtol=0)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    keys = row_keys(list(range(4000)))
    picks = choose(probs.log().expand(4000, -1), SamplingParams(temperature=1.0, top_p=0.75), keys=keys,
                   step=torch.tensor(0))
    assert set(picks.tolist()) == {0, 1}                              # 0.5 < 0.75 <= 0.5 + 0.3


def test_repetition_penalty():
    logits = torch.tensor([[3.0, 2.9, -1.0, -1.2]])
    seen = torch.tensor([[True, False, True, False]])
    p = SamplingParams(repetition_penalty=2.0)
    assert int(choose(logits, p, seen=seen)[0]) == 1                  # 3/2 < 2.9
    assert int(choose(torch.tensor([[-5.0, -6.0, -1.0, -1.5]]), p, seen=seen)[0]) == 3    # -1*2 < -1.5


def test_hash_matches_its_integer_twin():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert _mix32(torch.tensor(xs)).tolist() == [_mix32_int(x) for x in xs]
    assert row_keys([2**40 + 7])[0] != row_keys([7])[0]


# --- states as values ---------------------------------------------------------------------------

def test_forked_state_continues_like_the_original(model):
    prompt = prompts_of([11])[0]
    kw = dict(max_new_tokens=10, temperature=1.0)
    original = generate(model, [prompt], seed=[7], **kw)[0]
    state, _ = prefill(model, [prompt[:-1]])
    forks = fork(state, 3)
    out = generate(model, [prompt[-1:]] * 3, state=forks, seed=[7, 7, 8], **kw)
    assert out[0] == original and out[1] == original and out[2] != original
    # the forks are independent values: the prefix state is unchanged and can be used again
    assert generate(model, [prompt[-1:]], state=state, seed=[7], **kw)[0] == original


def test_bad_state_files_and_state_operations_are_named(model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fastxlstm import save
    from fastxlstm.generation import concat

    state, _ = prefill(model, prompts_of([5, 7]))
    path = tmp_path / "s.safetensors"
    save_state(path, state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="s.safetensors: corrupt or truncated state file"):
        load_state(path)
    save(model, tmp_path / "model")                                     # a model checkpoint is no state file
    with pytest.raises(ValueError, match="is not a fastxlstm state file"):
        load_state(tmp_path / "model" / "model.safetensors")
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors.pop("blocks.1.n")
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="the state file has no tensor 'blocks.1.n'"):
        load_state(path)
    with pytest.raises(TypeError, match="extra tensor 'logits' must be a torch.Tensor"):
        save_state(path, state, logits=[1.0])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\), got \[2\]"):
        select_rows(state, [2])
    for n in (0, 1.5, True):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            fork(state, n)
    with pytest.raises(ValueError, match="concat needs at least one state"):
        concat([])
    with pytest.raises(ValueError, match="different numbers of blocks"):
        concat([state, state[:1]])
    assert concat([state, select_rows(state, [1])])[0].c.shape[0] == 3


def test_saved_and_restored_state_continues_exactly(model, tmp_path):
    prompt = prompts_of([15])[0]
    ref = generate(model, [prompt], max_new_tokens=8)[0]
    state, logits = prefill(model, [prompt[:-2]])
    save_state(tmp_path / "s.safetensors", state, metadata={"tokens": prompt[:-2]}, logits=logits)
    restored, extra, meta = load_state(tmp_path / "s.safetensors", model=model)
    assert meta == {"tokens": prompt[:-2]}
    torch.testing.assert_close(extra["logits"], logits, rtol=0, atol=0)
    for a, b in zip(state, restored):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert generate(model, [prompt[-2:]], state=restored, max_new_tokens=8)[0] == ref
    other = random_model(ModelConfig(**{**CFG.to_dict(), "num_heads": 2}))
    with pytest.raises(ValueError, match="shape"):
        load_state(tmp_path / "s.safetensors", model=other)
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "missing.safetensors")


# --- scoring ------------------------------------------------------------------------------------

def test_scoring_in_pieces_equals_one_pass(model):
    ids = prompts_of([77])[0]
    logits, _ = model(torch.tensor([ids]))
    lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum()
    whole = score(model, ids, piece_tokens=1000)
    assert whole.tokens == 76
    assert abs(whole.log_likelihood - lp.item()) < 1e-9
    pieces = score(model, ids, piece_tokens=8)
    assert abs(pieces.log_likelihood - whole.log_likelihood) < 1e-9
    # a stream of unequal input pieces is re-cut at fixed offsets: the same as the whole list
    chunks = iter([ids[:5], ids[5:6], ids[6:40], ids[40:]])
    assert score(model, chunks, piece_tokens=8).log_likelihood == pieces.log_likelihood
    assert whole.perplexity == pytest.approx(torch.exp(-lp / 76).item())


def test_scoring_text_pieces_equals_the_text(model):
    text = "It was a bright cold day in April, and the clocks were striking thirteen."
    parts = [text[:10], text[10:33], text[33:]]
    assert score(model, parts, piece_tokens=16).log_likelihood == pytest.approx(
        score(model, text, piece_tokens=16).log_likelihood, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        score(model, [5])


def test_scoring_with_a_bos_model_and_its_inputs(model):
    """A config with a BOS id (as the 7B's): text is scored after BOS, which is context, not a
    scored token; token ids are taken as given; tensors and pieces too; bad input is named."""
    from fastxlstm.tokenizer import ByteTokenizer

    bos_model = random_model(ModelConfig(**{**CFG.to_dict(), "bos_token_id": 0}))
    text = "the clocks were striking thirteen"
    ids = ByteTokenizer().encode(text)
    with_bos = score(bos_model, text, piece_tokens=8)
    as_ids = score(bos_model, [0] + ids, piece_tokens=8)
    assert with_bos.tokens == len(ids) == as_ids.tokens
    assert with_bos.log_likelihood == pytest.approx(as_ids.log_likelihood, abs=1e-12)
    assert score(bos_model, ids).tokens == len(ids) - 1                 # ids: no BOS unless asked
    assert score(bos_model, ids, add_bos=True).log_likelihood == pytest.approx(as_ids.log_likelihood, abs=1e-12)
    t = torch.tensor([ids])
    assert score(model, t).log_likelihood == pytest.approx(score(model, ids).log_likelihood, abs=1e-12)
    seen = []
    score(model, ids, piece_tokens=10, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == len(ids) and len(seen) == -(-len(ids) // 10)
    for bad, match in ((dict(piece_tokens=0), "piece_tokens must be an int >= 1"),
                       (dict(piece_tokens=2.5), "piece_tokens must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            score(model, ids, **bad)
    with pytest.raises(ValueError, match="piece 1 must be a string or a list of token ids, got int"):
        score(model, iter([ids, 7]))
    with pytest.raises(ValueError, match=r"piece 0 has token id 256 outside \[0, 256\)"):
        score(model, [1, 256, 3])


def test_text_pieces_score_as_the_joined_text_with_a_subword_tokenizer(tmp_path):
    """A byte-level BPE merges across the places where pieces meet (blank lines, a word cut in
    two): tokenized piece by piece, 300-character pieces of Python gave 2 % more tokens than the
    whole text. Held-back tails make the pieces score exactly as the joined text."""
    import sysconfig

    tokenizers = pytest.importorskip("tokenizers")
    from fastxlstm.tokenizer import HFTokenizer

    text = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), encoding="utf-8").read()[:6000]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path / "tokenizer.json"))
    m = random_model(ModelConfig(**{**CFG.to_dict(), "vocab_size": 400}))
    whole = score(m, text, tokenizer=hf, piece_tokens=64)
    assert whole.tokens == len(hf.encode(text)) - 1
    lines = text.splitlines(keepends=True)
    by_lines = ["".join(lines[i:i + 7]) for i in range(0, len(lines), 7)]          # whole lines, blank ones too
    naive = sum(len(hf.encode(p)) for p in by_lines)
    assert naive != len(hf.encode(text))                                           # the problem is real here
    mid_word = [text[i:i + 97] for i in range(0, len(text), 97)]                   # cut anywhere
    crlf = text.replace("\n", "\r\n")                                             # no safe line breaks
    crlf_whole = score(m, crlf, tokenizer=hf, piece_tokens=64)
    crlf_got = score(m, [crlf[i:i + 97] for i in range(0, len(crlf), 97)], tokenizer=hf, piece_tokens=64)
    assert crlf_got.tokens == crlf_whole.tokens
    assert crlf_got.log_likelihood == pytest.approx(crlf_whole.log_likelihood, abs=1e-9)
    for pieces in (by_lines, mid_word, iter(mid_word)):
        got = score(m, pieces, tokenizer=hf, piece_tokens=64)
        assert got.tokens == whole.tokens
        assert got.log_likelihood == pytest.approx(whole.log_likelihood, abs=1e-9)


def test_text_pieces_with_no_place_to_join_are_held_back_then_cut_with_a_warning(tmp_path, monkeypatch):
    """Text with no line break or space gives no candidate cut: the pieces are held back (exact) up
    to a bound, then cut with a warning that the tokens there may differ."""
    tokenizers = pytest.importorskip("tokenizers")
    from fastxlstm.generation import scoring
    from fastxlstm.tokenizer import HFTokenizer

    text = "".join(f"{i}-cat-sat-on-the-mat;" for i in range(60))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path / "tokenizer.json"))
    m = random_model(ModelConfig(**{**CFG.to_dict(), "vocab_size": 300}))
    pieces = [text[i:i + 37] for i in range(0, len(text), 37)]
    whole = score(m, text, tokenizer=hf)
    held = score(m, pieces, tokenizer=hf)
    assert held.tokens == whole.tokens and held.log_likelihood == pytest.approx(whole.log_likelihood, abs=1e-9)
    monkeypatch.setattr(scoring, "_MAX_CARRY", 300)
    with pytest.warns(UserWarning, match="no place to join them exactly was found within 300 characters"):
        score(m, pieces, tokenizer=hf)


def test_init_state_is_what_no_state_means(model):
    x = torch.tensor(prompts_of([9, 9]))
    assert torch.equal(model(x)[0], model(x, model.init_state(2))[0])
    assert len(model.init_state(3)) == CFG.num_blocks and model.init_state(3)[0].c.shape[0] == 3


# --- streaming, CLI -----------------------------------------------------------------------------

def test_stream_yields_each_token_as_generate_returns_it(model):
    prompts = prompts_of([3, 8])
    out = generate(model, prompts, max_new_tokens=5)
    rows = [[], []]
    events = list(stream(model, prompts, max_new_tokens=5))
    for e in events:
        rows[e.row].append(e.token_id)
    assert rows == out
    assert [e.row for e in events[:4]] == [0, 1, 0, 1]                # interleaved step by step
    stats = GenerationStats()
    list(stream(model, prompts, max_new_tokens=5, stats=stats))
    assert stats.prompt_tokens == 11 and stats.new_tokens == 5 and stats.decode_steps == 4


def test_utf8_split_across_tokens_is_streamed_whole():
    from fastxlstm.tokenizer import ByteTokenizer, IncrementalDecoder

    text = "naïve ☃ 🐍!"
    dec = IncrementalDecoder(ByteTokenizer())
    pieces = [dec.push(b) for b in text.encode()]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from fastxlstm.checkpoint import save

    d = tmp_path_factory.mktemp("tiny")
    save(random_model(dtype=torch.float32, seed=3), d)
    return d


def test_cli_streams_the_generation(saved_model, capsys):
    from fastxlstm.checkpoint import load
    from fastxlstm.cli import main

    rc = main(["generate", "--model", str(saved_model), "--prompt", "The cat", "--max-new-tokens", "12",
               "--temperature", "0.8", "--seed", "4", "--device", "cpu", "--stats"])
    out = capsys.readouterr()
    assert rc == 0
    expected = generate(load(saved_model), "The cat", max_new_tokens=12, temperature=0.8, seed=4)
    assert out.out == expected + "\n"
    assert "12 tokens" in out.err
    rc = main(["generate", "--model", str(saved_model), "--prompt", "x", "--top-p", "0"])
    assert rc == 2 and "top_p" in capsys.readouterr().err


def test_cli_prompt_file_reads_as_the_prompt(saved_model, tmp_path, capsys):
    from fastxlstm.cli import main

    (tmp_path / "prompt.txt").write_text("The cat\nsat on")
    flags = ["generate", "--model", str(saved_model), "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*flags, "--prompt-file", str(tmp_path / "prompt.txt")]) == 0
    from_file = capsys.readouterr().out
    assert main([*flags, "--prompt", "The cat\nsat on"]) == 0
    assert from_file == capsys.readouterr().out


def test_cli_default_model_is_the_trained_default(saved_model, tmp_path, monkeypatch, capsys):
    import shutil

    from fastxlstm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "x"]) == 2
    assert "fastxlstm train" in capsys.readouterr().err
    shutil.copytree(saved_model, tmp_path / "runs" / "tiny")      # where `fastxlstm train` saves by default
    assert main(["generate", "--prompt", "The cat", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == generate(load_saved(saved_model), "The cat", max_new_tokens=5) + "\n"


def test_cli_scores_a_file_read_in_pieces_as_the_api_scores_the_whole_text(saved_model, tmp_path, capsys,
                                                                          monkeypatch):
    import functools

    from fastxlstm import cli

    text = "".join(f"line {i}: the cat sat by the river.\n" for i in range(60))
    path = tmp_path / "text.txt"
    path.write_text(text)
    monkeypatch.setattr(cli, "_text_pieces", functools.partial(cli._text_pieces, piece_chars=300))  # ~7 pieces
    rc = cli.main(["score", "--model", str(saved_model), "--file", str(path), "--device", "cpu",
                   "--piece-tokens", "100", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    expected = score(load_saved(saved_model), text, piece_tokens=100)
    assert f"{expected.tokens:,} tokens predicted, log-likelihood {expected.log_likelihood:.4f} nats" in out
    assert f"perplexity {expected.perplexity:.4f}" in out
    assert f"({len(text.encode()):,} UTF-8 bytes)" in out
    assert cli.main(["score", "--model", str(saved_model), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert cli.main(["score", "--model", str(saved_model), "--file", str(tmp_path / "latin1.txt"),
                     "--no-progress"]) == 2
    assert "latin1.txt is not UTF-8 text" in capsys.readouterr().err


def load_saved(path):
    from fastxlstm.checkpoint import load

    return load(path)


def test_cli_entry_point_runs(saved_model):
    r = subprocess.run([sys.executable, "-m", "fastxlstm", "generate", "--model", str(saved_model),
                        "--prompt", "Hi", "--max-new-tokens", "4", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout) >= 2


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, kw, match", [
    ([[]], {}, "prompt 0 is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 256]], {}, r"token id 256 outside \[0, 256\)"),
    ([[1, -1]], {}, "token id -1"),
    ([[1.5]], {}, "non-integer"),
    ([1, 2, 3], {}, "list of token ids"),
    ([[1, 2], "ab"], {}, "mix"),
    ([], {}, "non-empty"),
    ([[1] * 10], dict(max_prompt_tokens=9), "more than max_prompt_tokens=9"),
    ([[1]], dict(top_p=0.0), "top_p"),
    ([[1]], dict(top_p=1.5), "top_p"),
    ([[1]], dict(temperature=-0.1), "temperature"),
    ([[1]], dict(top_k=-1), "top_k"),
    ([[1]], dict(min_p=1.0), "min_p"),
    ([[1]], dict(repetition_penalty=0.0), "repetition_penalty"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens"),
    ([[1]], dict(seed=[1, 2]), "2 seeds for 1 prompts"),
    ([[1]], dict(seed=-3), "seed"),
    ([[1]], dict(eos_token_id=999), "eos_token_id 999"),
    ([[1]], dict(stop=[""]), "stop strings"),
    ([[1]], dict(add_bos=True), "no bos_token_id"),
])
def test_bad_input_is_refused_by_name(model, prompts, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, **kw)


def test_bad_tokenizer_and_state_are_refused(model):
    class Wide:
        vocab_size = 300

        def encode(self, text):
            return [0]

        def decode(self, ids):
            return ""

    with pytest.raises(ValueError, match=r"vocabulary \(300 ids\) does not fit the model"):
        generate(model, "hello", tokenizer=Wide())
    big = random_model(ModelConfig(vocab_size=1000, embedding_dim=32, num_heads=2, num_blocks=1,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None))
    with pytest.raises(ValueError, match="tokenizer"):
        generate(big, "hello")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(big, [[1, 2]], stop="x")
    state, _ = prefill(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="batch 2"):
        generate(model, [[1], [2]], state=state)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        generate(model, [[1]], max_new_tokens=3, cuda_graph=True)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager():
    m = random_model(ModelConfig(**{**CFG.to_dict(), "num_blocks": 1}), dtype=torch.float32)
    prompts = prompts_of([5, 9])
    from torch._dynamo.utils import counters

    counters.clear()
    assert generate(m, prompts, max_new_tokens=6, compile=True) == generate(m, prompts, max_new_tokens=6)
    assert counters["frames"]["ok"] > 0                             # the step really went through dynamo


# --- the CUDA-graph decoder's bookkeeping, on the CPU ------------------------------------------------

@pytest.fixture
def fake_graphs(monkeypatch):
    """Run the graph decoder on the CPU: capture returns the body itself, replay calls it."""
    import fastxlstm.generation.engine as engine

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    captured = []

    def capture(fn, pool=None):
        captured.append(fn)
        return torch.inference_mode()(fn), pool        # a real replay runs no Python at all

    monkeypatch.setattr(engine, "_graphs_supported", lambda device: True)
    monkeypatch.setattr(engine, "_pinned", lambda shape: torch.empty(shape, dtype=torch.long))
    monkeypatch.setattr(engine, "_event", Event)
    monkeypatch.setattr(engine, "_run_on_side_stream", lambda fn: fn())
    monkeypatch.setattr(engine, "_capture", capture)
    return captured


@pytest.mark.parametrize("n, steps", [(2, 4), (9, 4), (11, 4), (6, 32), (14, 1)])
def test_graph_decoder_plan_equals_eager(model, fake_graphs, n, steps):
    prompts = prompts_of([4, 9, 4])
    kw = dict(max_new_tokens=n, temperature=0.9, top_k=30, repetition_penalty=1.2, seed=[3, 4, 5])
    eager = generate(model, prompts, cuda_graph=False, **kw)
    blocks = []
    graph_rows = [[], [], []]
    for e in stream(model, prompts, cuda_graph=True, steps_per_graph=steps, **kw):
        graph_rows[e.row].append(e.token_id)
        blocks.append(e.row)
    assert graph_rows == eager and all(len(r) == n for r in eager)
    left = n - 2                                 # after the prefill's token and the warm-up step
    expected = {steps, left % steps} - {0} if left >= steps else ({left} if left else set())
    assert len(fake_graphs) == len(expected)     # one graph per block size, a tail graph if needed


def test_graph_decoder_stops_early_at_eos(model, fake_graphs):
    prompt = prompts_of([6])[0]
    free = generate(model, [prompt], max_new_tokens=20, cuda_graph=False)[0]
    out = generate(model, [prompt], max_new_tokens=20, eos_token_id=free[9], cuda_graph=True, steps_per_graph=4)
    assert out[0] == free[:free.index(free[9]) + 1]


# --- GPU ----------------------------------------------------------------------------------------

# head dims 32 / 64 and chunk 64: shapes the Triton kernels take
GPU_CFG = ModelConfig(**{**CFG.to_dict(), "embedding_dim": 128, "num_heads": 2, "chunk_size": 64})


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1)])
def test_cuda_graph_decode_equals_eager(kw):
    m = random_model(GPU_CFG, dtype=torch.float32).cuda()
    prompts = prompts_of([5, 130, 12])
    graph = generate(m, prompts, max_new_tokens=23, seed=[1, 2, 3], cuda_graph=True, steps_per_graph=4, **kw)
    eager = generate(m, prompts, max_new_tokens=23, seed=[1, 2, 3], cuda_graph=False, **kw)
    assert graph == eager
    assert all(len(r) == 23 for r in graph)


@pytest.mark.gpu
def test_cuda_decode_memory_does_not_grow():
    m = random_model(GPU_CFG, dtype=torch.float32).cuda()
    stats = GenerationStats()
    generate(m, prompts_of([9, 9]), max_new_tokens=1025, eos_token_id=None, stats=stats)
    mem = stats.memory_allocated                  # sampled while decoding, not after the release
    assert set(mem) >= {64, 1024, 1025}
    assert mem[1024] == mem[1025] == mem[64], mem


# --- the original xLSTM stack (XLSTMStackLM): nested LayerState states ----------------------------------

STACK_CFG = dict(vocab_size=50, embedding_dim=32, num_blocks=3, slstm_at=(1,), chunk_size=4)


def random_stack(seed=0, scale=0.3, dtype=torch.float64, **changes):
    from fastxlstm import StackConfig, XLSTMStackLM

    return randomized(XLSTMStackLM(StackConfig(**{**STACK_CFG, **changes})), dtype, scale, seed)


@pytest.fixture(scope="module")
def stack():
    return random_stack()


def stack_prompts(lengths, seed=1):
    return prompts_of(lengths, seed, vocab=50)


def assert_states_equal(a, b, atol=0.0):
    from fastxlstm.generation.states import named_tensors

    na, nb = named_tensors(a), named_tensors(b)
    assert [n for n, _ in na] == [n for n, _ in nb]
    for (name, x), (_, y) in zip(na, nb):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


def test_stack_greedy_equals_argmax_of_full_forward(stack):
    assert_greedy_equals_argmax_of_full_forward(stack, stack_prompts([9])[0])


def test_stack_mixed_length_batch_equals_each_prompt_alone(stack):
    prompts = stack_prompts([3, 11, 6, 11, 1])
    batch = generate(stack, prompts, max_new_tokens=8)
    assert batch == [generate(stack, [p], max_new_tokens=8)[0] for p in prompts]
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=20, repetition_penalty=1.2)
    seeds = [21, 22, 23, 24, 25]
    batch = generate(stack, prompts, seed=seeds, **kw)
    assert batch == [generate(stack, [p], seed=[s], **kw)[0] for p, s in zip(prompts, seeds)]


def test_stack_prefill_state_equals_a_single_full_forward(stack, monkeypatch):
    import fastxlstm.generation.engine as engine

    prompts = stack_prompts([5, 14, 5])
    monkeypatch.setattr(engine, "_LOGIT_BUDGET", 8 * 50)            # pieces of 8: the state is carried
    assert engine.prefill_piece(stack) == 8
    state, logits = prefill(stack, prompts)
    assert state[0].conv is not None and type(state[1].cell).__name__ == "SLSTMState"
    for r, p in enumerate(prompts):
        full, st = stack(torch.tensor([p]))
        torch.testing.assert_close(logits[r], full[0, -1], rtol=0, atol=1e-10)
        assert_states_equal(select_rows(state, [r]), st, atol=1e-10)


def test_stack_fork_and_saved_state_continue_exactly(stack, tmp_path):
    from fastxlstm.generation import concat

    prompt = stack_prompts([10])[0]
    kw = dict(max_new_tokens=8, temperature=1.0)
    original = generate(stack, [prompt], seed=[7], **kw)[0]
    state, logits = prefill(stack, [prompt[:-1]])
    forks = fork(state, 3)
    out = generate(stack, [prompt[-1:]] * 3, state=forks, seed=[7, 7, 8], **kw)
    assert out[0] == original and out[1] == original and out[2] != original
    assert generate(stack, [prompt[-1:]], state=state, seed=[7], **kw)[0] == original
    assert_states_equal(concat([state, state, state]), forks)
    save_state(tmp_path / "s.safetensors", state, metadata={"tokens": prompt[:-1]}, logits=logits)
    restored, extra, meta = load_state(tmp_path / "s.safetensors", model=stack)
    assert meta == {"tokens": prompt[:-1]}
    assert torch.equal(extra["logits"], logits)
    assert_states_equal(restored, state)
    assert generate(stack, [prompt[-1:]], state=restored, seed=[7], **kw)[0] == original
    # a stack state does not fit another stack, nor an XLSTMLarge
    with pytest.raises(ValueError, match="expected"):
        load_state(tmp_path / "s.safetensors", model=random_stack(slstm_at=(2,)))
    with pytest.raises(ValueError, match="shape"):
        load_state(tmp_path / "s.safetensors", model=random_stack(embedding_dim=64))
    with pytest.raises(ValueError, match="expected"):
        generate(random_model(ModelConfig(**{**CFG.to_dict(), "num_blocks": 3})), [[1]], state=state)
    with pytest.raises(ValueError, match="batch 2"):
        generate(stack, [[1], [2]], state=state)


def test_state_files_without_a_structure_still_load(model, tmp_path):
    """Files written before the stack was supported (one MLSTMState per block, flat keys)."""
    from safetensors.torch import save_file

    state, _ = prefill(model, [[1, 2, 3]])
    flat = {f"blocks.{b}.{n}": t for b, s in enumerate(state) for n, t in zip(s._fields, s)}
    save_file(flat, str(tmp_path / "old.safetensors"),
              metadata={"format": "fastxlstm-state/1", "num_blocks": str(len(state)), "metadata": "{}"})
    restored, extra, meta = load_state(tmp_path / "old.safetensors", model=model)
    assert_states_equal(restored, state)
    assert extra == {} and meta == {}


def test_stack_scoring_in_pieces_equals_one_pass(stack):
    ids = stack_prompts([41])[0]
    logits, _ = stack(torch.tensor([ids]))
    lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum()
    whole = score(stack, ids, piece_tokens=1000)
    assert whole.tokens == 40 and abs(whole.log_likelihood - lp.item()) < 1e-9
    for p in (1, 3, 8):
        assert abs(score(stack, ids, piece_tokens=p).log_likelihood - whole.log_likelihood) < 1e-9
    assert score(stack, ids).tokens == 40                          # the default piece (no bos in the config)
    with pytest.raises(ValueError, match="no bos_token_id"):
        score(stack, ids, add_bos=True)


def test_stack_decodes_eagerly_only(stack, fake_graphs):
    prompt = stack_prompts([4])[0]
    ref = generate(stack, [prompt], max_new_tokens=6, cuda_graph=False)
    assert generate(stack, [prompt], max_new_tokens=6) == ref        # "graphs supported": eager anyway
    assert fake_graphs == []
    with pytest.raises(ValueError, match="cuda_graph=True needs an XLSTMLarge"):
        generate(stack, [prompt], max_new_tokens=6, cuda_graph=True)


def test_other_models_are_refused_with_a_clear_error():
    from fastxlstm import StackConfig
    from fastxlstm.stack import XLSTMStack

    with pytest.raises(ValueError, match="XLSTMLarge and XLSTMStackLM"):
        generate(XLSTMStack(StackConfig(embedding_dim=32, num_blocks=1, vocab_size=50)), [[1, 2]])


@pytest.fixture(scope="module")
def saved_stack(tmp_path_factory):
    from fastxlstm.checkpoint import save

    d = tmp_path_factory.mktemp("tiny_stack")
    save(random_stack(seed=3, dtype=torch.float32, vocab_size=256), d)
    return d


def test_cli_generates_from_a_saved_stack(saved_stack, capsys):
    from fastxlstm.checkpoint import load
    from fastxlstm.cli import main

    rc = main(["generate", "--model", str(saved_stack), "--prompt", "The cat", "--max-new-tokens", "10",
               "--temperature", "0.8", "--seed", "4", "--device", "cpu", "--stats"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    model = load(saved_stack)
    assert type(model).__name__ == "XLSTMStackLM"
    expected = generate(model, "The cat", max_new_tokens=10, temperature=0.8, seed=4)
    assert out.out == expected + "\n"
    assert "10 tokens" in out.err
    r = subprocess.run([sys.executable, "-m", "fastxlstm", "generate", "--model", str(saved_stack),
                        "--prompt", "Hi", "--max-new-tokens", "4", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
