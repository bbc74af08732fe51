"""Training end to end on the CPU: the CLI, resume exactness, corrupt checkpoints, signals, DDP and
FSDP2 under torchrun against one process, and clear errors for bad flags and data."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastxlstm.checkpoint import load
from fastxlstm.cli import main
from fastxlstm.train import lr_factor

# a model small enough that a step takes milliseconds, with chunks crossed (seq 24 > chunk 8)
SMALL = ["--embedding-dim", "32", "--num-blocks", "2", "--chunk-size", "8", "--seq-len", "24",
         "--batch-size", "4", "--eval-batches", "1", "--sample-tokens", "4", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    lines = [f"line {i}: the {w} sat by the {p}." for i, (w, p) in
             enumerate(zip(["cat", "dog", "owl", "fox"] * 100, ["river", "mill", "well", "door", "gate"] * 80))]
    path.write_text("\n".join(lines))
    return path


def _train(*argv) -> int:
    return main(["train", *SMALL, *map(str, argv)])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_few_steps(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--data", corpus, "--out", out, "--max-steps", 6, "--eval-every", 3, "--ckpt-every", 2,
                  "--keep-last", 2, "--lr", "1e-2") == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert all(isinstance(r["loss"], float) for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert rows[-1]["val_bpb"] == pytest.approx(rows[-1]["val_loss"] / 0.6931471805599453)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    model = load(out)                                       # the final weights, in the checkpoint format
    assert model.cfg.embedding_dim == 32 and model.cfg.num_blocks == 2
    assert (out / "loss.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "--- sample" in printed


def test_tensorboard_events_hold_the_logged_metrics_across_a_resume(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    common = ["--data", corpus, "--out", out, "--max-steps", 6, "--eval-every", 3, "--sample-tokens", 0,
              "--tensorboard"]
    assert _train(*common, "--stop-at-step", 4, "--ckpt-every", 2) == 0
    # from step 2's checkpoint: the events of steps 3 and 4 are dropped, then written again
    assert _train(*common, "--resume", out / "checkpoints" / "step_0000002") == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = _metrics(out)
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        got = sorted((e.step, e.value) for e in events.Scalars(key))
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [0, 3, 6]


def test_tensorboard_without_the_package_is_a_clear_error(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # as if not installed
    assert _train("--data", corpus, "--out", tmp_path / "run", "--max-steps", 1, "--tensorboard") == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()                   # refused before anything ran


@pytest.mark.parametrize("extra", [[], ["--stateful", "--grad-accum", "2"]], ids=["random", "stateful-accum"])
def test_resume_is_bit_identical(corpus, tmp_path, extra):
    common = ["--data", corpus, "--max-steps", 8, "--eval-every", 0, "--sample-tokens", 0, "--lr", "1e-2", *extra]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(*common, "--out", straight) == 0
    assert _train(*common, "--out", split, "--stop-at-step", 4) == 0
    assert not (split / "model.safetensors").exists()       # stopped early: checkpoint only
    assert (split / "checkpoints" / "step_0000004").is_dir()
    assert main(["train", "--out", str(split), "--resume", "--no-progress"]) == 0   # configs from the checkpoint
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["loss"] for r in _metrics(straight)] == [r["loss"] for r in _metrics(split)]


def _poison_steps(monkeypatch, steps):
    """Training losses (not evaluation's) become NaN at these 0-based steps, and so do their gradients."""
    from fastxlstm import train as train_module
    real = train_module._Run._loss

    def poisoned(self, model, x, y, state=None, **kw):
        loss, state = real(self, model, x, y, state, **kw)
        if torch.is_grad_enabled() and self.step in steps:
            loss = loss * float("nan")
        return loss, state
    monkeypatch.setattr(train_module._Run, "_loss", poisoned)


def test_a_step_with_non_finite_gradients_is_skipped_and_reported(corpus, tmp_path, capsys, monkeypatch):
    _poison_steps(monkeypatch, {2})
    out = tmp_path / "run"
    assert _train("--data", corpus, "--out", out, "--max-steps", 5, "--eval-every", 0, "--sample-tokens", 0) == 0
    rows = _metrics(out)
    assert math.isnan(rows[3]["loss"]) and math.isnan(rows[3]["grad_norm"])
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 0, 0, 1, 1, 1]
    assert "step 3: 1 step(s) since the last log had non-finite gradients" in capsys.readouterr().out
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_run_of_non_finite_steps_stops_training_with_a_clear_error(corpus, tmp_path, capsys, monkeypatch):
    from fastxlstm.train import MAX_SKIPPED_STREAK
    _poison_steps(monkeypatch, set(range(2, 1000)))
    out = tmp_path / "run"
    assert _train("--data", corpus, "--out", out, "--max-steps", 100, "--eval-every", 0, "--sample-tokens", 0) == 2
    err = capsys.readouterr().err
    assert f"training diverged: the last {MAX_SKIPPED_STREAK} steps (to step {MAX_SKIPPED_STREAK + 2})" in err
    assert "Lower the learning rate (--lr" in err and "the weights are those of step 2" in err
    assert _metrics(out)[-1]["step"] == MAX_SKIPPED_STREAK + 2         # the step that stopped it is logged
    assert _metrics(out)[-1]["skipped_steps"] == MAX_SKIPPED_STREAK


def test_resuming_with_another_model_is_refused_by_name(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--data", corpus, "--out", out, "--max-steps", 2, "--eval-every", 0, "--sample-tokens", 0) == 0
    capsys.readouterr()
    resume = ["train", "--out", str(out), "--resume", "--max-steps", "4", "--no-progress"]
    assert main([*resume, "--num-blocks", "3"]) == 2
    assert "holds another model: num_blocks 2 there, 3 here" in capsys.readouterr().err
    assert main([*resume, "--arch", "xlstm_stack"]) == 2
    assert "holds an xlstm_large model, not xlstm_stack" in capsys.readouterr().err
    assert main([*resume, "--stateful"]) == 2                          # saved without carried states
    assert "has no carried state for rank 0 (saved with stateful off" in capsys.readouterr().err
    assert main([*resume, "--eval-every", "0", "--sample-tokens", "0"]) == 0   # the same model resumes


def test_corrupt_checkpoint_is_refused_by_name(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--data", corpus, "--out", out, "--max-steps", 2, "--eval-every", 0, "--sample-tokens", 0) == 0
    ckpt = out / "checkpoints" / "step_0000002"
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-9] + bytes([good[-9] ^ 1]) + good[-8:])   # one bit flipped, same size
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "4"]) == 2
    assert f"checkpoint {ckpt} is corrupt: model.safetensors does not match its SHA-256 sum" in capsys.readouterr().err
    weights.write_bytes(good[:-100])                        # truncated
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "model.safetensors" in err and "truncated" in err
    weights.write_bytes(good)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for bad in ("{not json", json.dumps({"files": [1]}), json.dumps({"files": {"model.safetensors": {}}}),
                json.dumps({"step": 2})):
        (ckpt / "manifest.json").write_text(bad)
        assert main(["train", "--out", str(out), "--resume", str(ckpt)]) == 2
        assert f"checkpoint {ckpt} is corrupt: manifest.json is unreadable" in capsys.readouterr().err
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    other = next(n for n in manifest["files"] if n != "model.safetensors")
    kept = (ckpt / other).read_bytes()
    (ckpt / other).unlink()                                 # a file the manifest lists is gone
    assert main(["train", "--out", str(out), "--resume", str(ckpt)]) == 2
    assert f"checkpoint {ckpt} is incomplete: {other} is missing" in capsys.readouterr().err
    (ckpt / other).write_bytes(kept)
    assert main(["train", "--out", str(out), "--resume", str(ckpt), "--max-steps", "3", "--no-progress",
                 "--eval-every", "0", "--sample-tokens", "0"]) == 0      # whole again: it resumes
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (ckpt / "manifest.json").unlink()                       # a directory without its manifest
    assert main(["train", "--out", str(out), "--resume", str(ckpt)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_sigint_saves_a_checkpoint_and_exits(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastxlstm", "train", *SMALL, "--data", str(corpus), "--out", str(out),
           "--max-steps", "100000", "--eval-every", "0", "--sample-tokens", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or len(_metrics(out)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "SIGINT" in output and "--resume" in output
    (ckpt,) = (out / "checkpoints").iterdir()
    step = json.loads((ckpt / "manifest.json").read_text())["step"]
    assert step >= 2 and _metrics(out)[-1]["step"] == step


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_matches_one_process(corpus, tmp_path, parallel):
    """2 gloo ranks with micro-batch 2 see the same global batch of 4 as one process: same loss curve."""
    args = [*SMALL, "--data", str(corpus), "--max-steps", "5", "--eval-every", "5", "--lr", "1e-2"]
    one = tmp_path / "one"
    assert main(["train", *args, "--out", str(one)]) == 0
    two = tmp_path / parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastxlstm", "train", *args, "--out", str(two), "--parallel", parallel]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    # float32 sums in another order (gradient all-reduce / reduce-scatter): agreement to rounding
    for key in ("loss", "grad_norm", "val_loss"):
        x = [r[key] for r in a if key in r]
        y = [r[key] for r in b if key in r]
        assert x == pytest.approx(y, rel=1e-4), key
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
    if parallel == "fsdp":                                  # sharded resume: stop at 2, resume, same weights
        split = tmp_path / "split"
        for extra in (["--stop-at-step", "2", *args, "--parallel", "fsdp"], ["--resume", "--no-progress"]):
            res = subprocess.run([*cmd[:9], "--out", str(split), *extra], capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        wc = load_file(split / "model.safetensors")
        assert all(torch.equal(wb[name], wc[name]) for name in wb)


def test_lr_schedule():
    f = [lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "batch_size must be an int >= 1, got 0"),
    (["--batch-size", "6", "--grad-accum", "4"], "batch_size (6) must be a multiple of grad_accum (4)"),
    (["--lr", "-1"], "lr must be a number in (0, inf]"),
    (["--data", "/no/such/corpus"], "data /no/such/corpus: no such file or directory"),
    (["--tokenizer", "/no/such/tokenizer.json"], "tokenizer /no/such/tokenizer.json: no such file"),
    (["--parallel", "ddp"], "needs torchrun"),
    (["--resume"], "resume: no checkpoint in"),
    (["--data", "{corpus}", "--seq-len", "100000"], "fewer than seq_len + 1"),
    (["--num-heads", "3"], "does not divide into num_heads"),
    (["--vocab-size", "100"], "vocab_size is 100"),
])
def test_bad_input_gives_a_clear_error(corpus, tmp_path, capsys, argv, message):
    argv = [a.format(corpus=corpus) for a in argv]
    assert main(["train", "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--parallel", "mpi"], "argument --parallel: invalid choice: 'mpi'"),
])
def test_bad_flags_are_rejected_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_token_file(tmp_path, capsys):
    bad = tmp_path / "tokens.bin"
    bad.write_bytes(b"\x01\x02\x03")                        # 3 bytes: not whole uint16 tokens
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert f"data {bad}: 3 bytes is not a whole number of uint16 tokens" in capsys.readouterr().err


def test_config_file_and_flags(corpus, tmp_path):
    from fastxlstm.train import resolve_configs
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"preset": "tiny", "model": {"num_blocks": 1},
                                    "train": {"lr": 1e-3, "data": str(corpus)}}))
    model_cfg, train_cfg = resolve_configs(None, {}, {"lr": 2e-3}, str(cfg_file))
    assert model_cfg.num_blocks == 1 and model_cfg.embedding_dim == 128
    assert train_cfg.lr == 2e-3 and train_cfg.data == str(corpus)
    cfg_file.write_text(json.dumps({"train": {"learning_rate": 1}}))
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        resolve_configs(None, {}, {}, str(cfg_file))
    if sys.version_info >= (3, 11):                                  # tomllib: TOML reads as the JSON does
        toml_file = tmp_path / "run.toml"
        toml_file.write_text(f'preset = "tiny"\n[model]\nnum_blocks = 1\n[train]\nlr = 1e-3\ndata = "{corpus}"\n')
        assert resolve_configs(None, {}, {"lr": 2e-3}, str(toml_file)) == (model_cfg, train_cfg)
        (tmp_path / "bad.toml").write_text('preset = "tiny\n')
        with pytest.raises(ValueError, match="bad.toml cannot be parsed"):
            resolve_configs(None, {}, {}, str(tmp_path / "bad.toml"))
    for text, name, match in (("[1, 2]", "list.json", "must hold a table/object.*got a list"),
                              ('[{"preset": "tiny"}]', "dicts.json", "got a list"),
                              ('{"presets": "tiny"}', "typo.json", r"top-level keys .* got \['presets'\]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            resolve_configs(None, {}, {}, str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_configs(None, {}, {}, str(tmp_path / "missing.json"))


def test_activation_checkpointing_changes_nothing_but_memory(corpus, tmp_path):
    common = ["--data", corpus, "--max-steps", 3, "--eval-every", 0, "--sample-tokens", 0]
    assert _train(*common, "--out", tmp_path / "plain") == 0
    assert _train(*common, "--out", tmp_path / "ac", "--activation-checkpointing") == 0
    assert [r["loss"] for r in _metrics(tmp_path / "plain")] == \
        pytest.approx([r["loss"] for r in _metrics(tmp_path / "ac")], rel=1e-6)


def test_tokenizer_json(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train([str(corpus)], tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "run"
    assert _train("--data", corpus, "--tokenizer", tmp_path / "tokenizer.json", "--vocab-size", 320,
                  "--out", out, "--max-steps", 2, "--eval-every", 0) == 0
    row = _metrics(out)[-1]
    assert row["val_bpb"] < row["val_loss"] / 0.6931471805599453   # more than one byte per token
    assert (out / "tokenizer.json").is_file()                          # next to the weights, for generate


def test_without_matplotlib_the_plot_is_skipped_with_a_note(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)      # import fails as if not installed
    out = tmp_path / "run"
    assert _train("--data", corpus, "--out", out, "--max-steps", 1, "--sample-tokens", 0) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (out / "loss.png").exists() and (out / "model.safetensors").is_file()


def test_original_stack_trains_and_resumes(corpus, tmp_path):
    """xLSTM[1:1] of the original stack (an sLSTM block after an mLSTM block) through the same loop."""
    cfg_file = tmp_path / "stack.json"
    cfg_file.write_text(json.dumps({"arch": "xlstm_stack", "model": {"num_blocks": 2, "slstm_at": [1]}}))
    common = ["--config", cfg_file, "--embedding-dim", 32, "--data", corpus, "--max-steps", 4, "--eval-every", 0,
              "--sample-tokens", 0]
    assert _train(*common, "--out", tmp_path / "straight") == 0
    assert _train(*common, "--out", tmp_path / "split", "--stop-at-step", 2) == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--no-progress"]) == 0
    model = load(tmp_path / "straight")
    assert type(model).__name__ == "XLSTMStackLM" and model.cfg.slstm_at == (1,) and model.cfg.embedding_dim == 32
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    rows = _metrics(tmp_path / "straight")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


def test_stack_rejects_large_only_fields(capsys):
    assert main(["train", "--arch", "xlstm_stack", "--num-heads", "2"]) == 2
    assert "unknown StackConfig field(s): num_heads" in capsys.readouterr().err
    assert main(["train", "--arch", "xlstm_stack", "--preset", "125m"]) == 2
    assert "presets are xlstm_large models" in capsys.readouterr().err


def test_document_offsets():
    from fastxlstm.train import document_offsets

    E = 9
    tokens = torch.tensor([1, E, 2, 3, E, 4, 5, E, 6, 7])     # two rows of 5
    assert document_offsets(tokens, 5, E).tolist() == [0, 2, 5, 8, 10]
    assert document_offsets(torch.tensor([E, 1, 2, 3]), 2, E).tolist() == [0, 1, 2, 4]


def test_packed_documents_train_and_match_each_document_alone(corpus, tmp_path):
    out = tmp_path / "packed"
    assert _train("--data", corpus, "--out", out, "--max-steps", 4, "--eval-every", 0, "--document-end-id", 10,
                  "--ckpt-every", 0) == 0
    rows = _metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rows) and "val_loss" in rows[-1]
    # the loss the trainer computes on a packed batch equals running every document piece alone
    from fastxlstm.train import document_offsets

    model = load(out).double()
    x = torch.tensor([list(b"ab\ncd\nef"), list(b"g\nhijklm")])
    cu = document_offsets(x.reshape(-1), x.shape[1], 10)
    packed, _ = model(x.reshape(1, -1), cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone, _ = model(x.reshape(1, -1)[:, a:b])
        torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-10, atol=1e-10)


def test_packed_documents_reject_stateful(capsys):
    assert _train("--document-end-id", 10, "--stateful") == 2
    assert "exclude each other" in capsys.readouterr().err


def test_compile_model_takes_the_block_stack_as_one_graph():
    from fastxlstm import XLSTMLarge
    from fastxlstm.config import PRESETS
    from fastxlstm.train import compile_model
    cfg = dataclasses.replace(PRESETS["tiny"], embedding_dim=32, chunk_size=8)
    whole, per_block = XLSTMLarge(cfg), XLSTMLarge(cfg)
    compile_model(whole, whole_stack=True)
    compile_model(per_block, whole_stack=False)
    assert whole.backbone._compiled_call_impl is not None
    assert all(b._compiled_call_impl is None for b in whole.backbone.blocks)
    assert per_block.backbone._compiled_call_impl is None
    assert all(b._compiled_call_impl is not None for b in per_block.backbone.blocks)
    x = torch.randn(2, 20, 32)
    backend = whole.backend_for(x.device)          # outside compiled code, as the model's entry points do
    explained = torch._dynamo.explain(whole.backbone._call_impl)(x, backend=backend)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("extra", [[], ["--activation-checkpointing"], ["--document-end-id", "10"]],
                         ids=["plain", "checkpointed", "packed"])
def test_compile_changes_nothing_but_rounding(corpus, tmp_path, extra):
    common = ["--data", corpus, "--max-steps", 3, "--eval-every", 0, "--sample-tokens", 0, *extra]
    assert _train(*common, "--out", tmp_path / "plain") == 0
    assert _train(*common, "--out", tmp_path / "compiled", "--compile") == 0
    # float32 on the CPU: Inductor reorders the reductions, so the losses agree to rounding only
    assert [r["loss"] for r in _metrics(tmp_path / "plain")] == \
        pytest.approx([r["loss"] for r in _metrics(tmp_path / "compiled")], rel=1e-5)


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch < 2.6 has no eager stance")
def test_sample_from_a_compiled_model_compiles_nothing():
    from fastxlstm import XLSTMLarge
    from fastxlstm.config import PRESETS
    from fastxlstm.tokenizer import ByteTokenizer
    from fastxlstm.train import compile_model, sample
    cfg = dataclasses.replace(PRESETS["tiny"], embedding_dim=32, chunk_size=8)
    plain = XLSTMLarge(cfg)
    compiled = XLSTMLarge(cfg)
    compiled.load_state_dict(plain.state_dict())
    compile_model(compiled, whole_stack=True)
    counters = torch._dynamo.utils.counters
    before = dict(counters["stats"])
    assert sample(compiled, ByteTokenizer(), "def ", 8) == sample(plain, ByteTokenizer(), "def ", 8)
    assert dict(counters["stats"]) == before
