"""Data sources and sampling: the standard-library default and the shipped corpus, text and token
files, and batches that do not depend on how ranks and micro-steps split them."""

from __future__ import annotations

import numpy as np
import pytest

from fastxlstm.data import CORPUS, Batches, eval_windows, load_data
from fastxlstm.train_config import TrainConfig


def test_shipped_corpus_is_split():
    assert CORPUS.is_file() and 50_000 < CORPUS.stat().st_size < 500_000
    d = load_data(TrainConfig(data="tales"))
    assert d.vocab_size == 256 and d.bytes_per_token == 1.0
    text = CORPUS.read_bytes() + b"\n\n"
    assert bytes(d.train.astype(np.uint8)) + bytes(d.val.astype(np.uint8)) == text
    assert len(d.val) == pytest.approx(0.05 * len(text), abs=1)


@pytest.mark.parametrize("world, accum", [(2, 1), (1, 2), (4, 2)])
def test_global_batch_is_independent_of_the_split(world, accum):
    tokens = np.arange(10_000, dtype=np.uint16)
    ref_cfg = TrainConfig(seq_len=16, batch_size=8)
    ref = Batches(tokens, ref_cfg).micro_batch(3, 0)
    cfg = TrainConfig(seq_len=16, batch_size=8, grad_accum=accum)
    rows = [Batches(tokens, cfg, rank=r, world=world).micro_batch(3, a)[0] for a in range(accum) for r in range(world)]
    got = np.concatenate([r.numpy() for r in rows])
    assert sorted(map(tuple, got)) == sorted(map(tuple, ref[0].numpy()))
    x, y = ref
    assert (y[:, :-1] == x[:, 1:]).all()                    # targets are the inputs shifted by one


def test_sampling_is_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    b = Batches(tokens, TrainConfig(seq_len=16, batch_size=4))
    assert (b.micro_batch(5, 0)[0] == Batches(tokens, TrainConfig(seq_len=16, batch_size=4)).micro_batch(5, 0)[0]).all()
    assert not (b.micro_batch(5, 0)[0] == b.micro_batch(6, 0)[0]).all()
    other = Batches(tokens, TrainConfig(seq_len=16, batch_size=4, seed=1))
    assert not (b.micro_batch(5, 0)[0] == other.micro_batch(5, 0)[0]).all()


def test_stateful_rows_are_contiguous_streams():
    tokens = np.arange(10_000, dtype=np.uint16)
    b = Batches(tokens, TrainConfig(seq_len=16, batch_size=4, stateful=True))
    x0, _ = b.micro_batch(0, 0)
    x1, _ = b.micro_batch(1, 0)
    assert (x1[:, 0] == x0[:, -1] + 1).all()                # each row continues where it stopped
    assert len(set(x0[:, 0].tolist())) == 4


def test_eval_windows_are_fixed_and_dealt_to_ranks():
    val = np.arange(5_000, dtype=np.uint16)
    cfg = TrainConfig(seq_len=32, batch_size=4, eval_batches=3)
    whole = eval_windows(val, cfg)
    assert len(whole) == 12 and whole[-1] + 33 <= len(val)
    parts = [eval_windows(val, cfg, rank=r, world=2) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(whole.tolist())


def test_token_files(tmp_path):
    ids = np.random.default_rng(0).integers(0, 1000, size=4000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    ids[:500].tofile(tmp_path / "val.bin")
    d = load_data(TrainConfig(data=str(tmp_path)))
    assert isinstance(d.train, np.memmap) and len(d.train) == 4000 and len(d.val) == 500
    assert d.vocab_size == int(ids.max()) + 1 and d.tokenizer is None and d.bytes_per_token is None
    np.save(tmp_path / "tokens.npy", ids.astype(np.uint32))
    d = load_data(TrainConfig(data=str(tmp_path / "tokens.npy"), val_fraction=0.1))
    assert len(d.train) == 3600 and (np.asarray(d.val) == ids[3600:]).all()
    (tmp_path / "wide.bin").write_bytes(ids.astype(np.uint32).tobytes())
    d = load_data(TrainConfig(data=str(tmp_path / "wide.bin"), token_dtype="uint32"))
    assert len(d.train) + len(d.val) == 4000


def test_token_ids_past_the_tokenizer_are_refused(tmp_path):
    from tests.test_tokenizer import write_tokenizer_json

    write_tokenizer_json(tmp_path / "tokenizer.json")
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="holds token id 999, outside the tokenizer's vocabulary of"):
        load_data(TrainConfig(data=str(tmp_path / "train.bin"), tokenizer=str(tmp_path / "tokenizer.json")))


def test_text_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta " * 200)
    (tmp_path / ".hidden").write_text("never read")
    d = load_data(TrainConfig(data=str(tmp_path)))
    text = bytes(np.concatenate([d.train, d.val]).astype(np.uint8)).decode()
    assert text == "alpha " * 200 + "\n\n" + "beta " * 200 + "\n\n"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "no such file or directory"),
    (lambda p: (p / "bin.dat").write_bytes(b"\xff\xfe\x00") and p / "bin.dat", "not UTF-8 text"),
    (lambda p: (p / "tiny.txt").write_text("ab") and p / "tiny.txt", "too few to split"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no UTF-8 text files found"),
    (lambda p: (p / "x.npy").write_bytes(b"not numpy") and p / "x.npy", "not a readable .npy file"),
    (lambda p: np.save(p / "m.npy", np.zeros((20, 20), np.uint16)) or p / "m.npy", "1-D integer array, got 2-D uint16"),
    (lambda p: np.save(p / "f.npy", np.zeros(400, np.float32)) or p / "f.npy", "1-D integer array, got 1-D float32"),
])
def test_bad_data_names_the_problem(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_data(TrainConfig(data=str(path)))


def test_stdlib_sources_are_the_default_with_a_fixed_split():
    d = load_data(TrainConfig(data="stdlib"))
    assert len(d.train) > 1_000_000 and d.vocab_size == 256 and d.bytes_per_token == 1.0
    assert b"def " in bytes(d.val[:100_000].astype(np.uint8))
    assert len(d.val) == pytest.approx(0.05 * (len(d.train) + len(d.val)), abs=1)
    again = load_data(TrainConfig())                           # no --data: the same corpus, the same split
    assert np.array_equal(again.train, d.train) and np.array_equal(again.val, d.val)
    assert "standard library" in again.describe()
