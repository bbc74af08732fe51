"""Command line: ``fastxlstm <command>``. Each command parses flags, calls one library function and
prints; there is no logic here that Python callers cannot reach."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastxlstm", description="Fast xLSTM: train, generate, score, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (_register_demo, _register_info, _register_train, _register_generate, _register_score):
        register(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"fastxlstm {args.command}: error: {e}", file=sys.stderr)
        return 2


# --- demo ---------------------------------------------------------------------------------------

def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a small model, run it, save and reload it")
    p.add_argument("--out", default="out/demo", help="directory for the saved model")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from .demo import demo

    demo(args.out)
    return 0


# --- info ---------------------------------------------------------------------------------------

def _register_info(sub) -> None:
    p = sub.add_parser("info", help="describe a saved model directory (ours or a Hugging Face xLSTM)")
    p.add_argument("model", help="model directory")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    import dataclasses

    from .checkpoint import describe

    d = describe(args.model)
    print(f"{args.model}: {d['model']} ({d['layout']} layout)")
    print(f"  parameters   {d['parameters']:,} ({d['non_embedding_parameters']:,} without the embedding)")
    print(f"  weights      {len(d['files'])} file(s), {d['bytes'] / 2**20:,.1f} MiB, {', '.join(d['dtypes'])}")
    vocab = getattr(d["config"], "vocab_size", None)
    print(f"  tokenizer    {d['tokenizer'] or ('byte-level (built in)' if vocab == 256 else 'none: token ids only')}")
    print("  config")
    for f in dataclasses.fields(d["config"]):
        value = getattr(d["config"], f.name)
        print(f"    {f.name:<30} {getattr(value, 'value', value)}")
    return 0


# --- train (owned by the training module) ---------------------------------------------------------

def _register_train(sub) -> None:
    from .config import PRESETS, ModelConfig
    from .train_config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a model (with no flags: a tiny model on this Python's standard-library sources, on the CPU in minutes)",
        description="Train an xLSTM language model (xLSTM-Large, or the original stack with --arch). Flags map onto the fields of ModelConfig (override the "
                    "preset) and TrainConfig; under torchrun add --parallel ddp or fsdp. With --resume, the "
                    "checkpoint's own configs are the base and flags given override them.")
    p.add_argument("--preset", default=argparse.SUPPRESS, choices=sorted(PRESETS),
                   help="model preset (default: tiny, or the checkpoint's model with --resume)")
    p.add_argument("--arch", default=argparse.SUPPRESS, choices=["xlstm_large", "xlstm_stack"],
                   help="xlstm_large (default; presets) or xlstm_stack, the original mLSTM/sLSTM stack: its "
                        "StackConfig fields come from --config FILE, the shared ones (--embedding-dim, "
                        "--num-blocks, --vocab-size, --chunk-size, --backend ...) also from flags")
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help='a JSON or TOML file {"arch": ..., "preset": ..., "model": {...}, "train": {...}}; flags override it')
    _add_dataclass_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig, "train")
    _add_dataclass_flags(p.add_argument_group("model (ModelConfig; override the preset)"), ModelConfig, "model",
                         skip=("bos_token_id", "eos_token_id", "pad_token_id"))
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from .train import resolve_configs, train

    given = vars(args)
    model_over = {k[len("model."):]: v for k, v in given.items() if k.startswith("model.")}
    train_over = {k[len("train."):]: v for k, v in given.items() if k.startswith("train.")}
    model_cfg, train_cfg = resolve_configs(given.get("preset"), model_over, train_over, given.get("config"),
                                           given.get("arch"))
    result = train(model_cfg, train_cfg)
    if result.interrupted_by:
        return 128 + {"SIGINT": 2, "SIGTERM": 15}[result.interrupted_by]
    return 0


def _add_dataclass_flags(parser, cls, prefix: str, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field: --field-name, typed from the annotation, help from the field's
    docstring. Unset flags stay out of the namespace (SUPPRESS), so only what was typed overrides."""
    import dataclasses
    import enum
    import types
    import typing

    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kind, optional = args[0], True
        default = f.default if f.default is not dataclasses.MISSING else None
        default_text = default.value if isinstance(default, enum.Enum) else default
        help_text = f"{docs.get(f.name, '')} (default: {default_text})".replace("%", "%%")
        opts = dict(dest=f"{prefix}.{f.name}", default=argparse.SUPPRESS, help=help_text)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **opts)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            parser.add_argument(flag, choices=[m.value for m in kind], **opts)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=list(typing.get_args(kind)), **opts)
        elif "const" in f.metadata:
            parser.add_argument(flag, nargs="?", const=f.metadata["const"], metavar=f.name.upper(), **opts)
        else:
            convert = kind if not optional else _none_or(kind)
            parser.add_argument(flag, type=convert, metavar=f.name.upper(), **opts)


def _none_or(kind):
    def convert(text: str):
        return None if text.lower() == "none" else kind(text)
    convert.__name__ = kind.__name__
    return convert


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) of a dataclass, by field name."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --- generate (owned by the generation module) -----------------------------------------------------

def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a saved model, streamed as it comes")
    _add_model_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt text from this file ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty > 0 on seen tokens (1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    eos = p.add_mutually_exclusive_group()
    eos.add_argument("--eos-id", type=int, action="append", help="stop at this token id (repeatable; "
                     "default: the config's eos)")
    eos.add_argument("--ignore-eos", action="store_true", help="never stop at an eos token")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the config's BOS token")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on cuda (for debugging)")
    p.add_argument("--compile", action="store_true", help="run the decode step through torch.compile")
    p.add_argument("--stats", action="store_true", help="print timings to stderr at the end")
    p.set_defaults(run=_run_generate)


def _load_for_inference(args):
    """The model (and its tokenizer) that --model, --device, --dtype and --backend name."""
    import torch

    from .checkpoint import load
    from .tokenizer import load_tokenizer

    if args.model is None:
        import dataclasses
        import os

        from .train_config import TrainConfig

        args.model = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "out")
        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"no model at {args.model}: train the default one with `fastxlstm train`, "
                                    "or pass --model DIR")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    overrides = {"backend": args.backend} if args.backend else {}
    model = load(args.model, device=device, dtype=getattr(torch, dtype_name), **overrides)
    return model, load_tokenizer(args.model, model.cfg.vocab_size)


def _add_model_flags(p) -> None:
    p.add_argument("--model", default=None, help="model directory, ours or a Hugging Face xLSTM (default: "
                   "where `fastxlstm train` saves its model with no flags)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--backend", default=None, help="mLSTM kernels: auto, triton, native, reference")


def _run_generate(args) -> int:
    from .generation import GenerationStats, stream

    model, tokenizer = _load_for_inference(args)
    if args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = "".join(_text_pieces(args.prompt_file, lambda n: None))
    eos = None if args.ignore_eos else (args.eos_id if args.eos_id else "config")
    stats = GenerationStats()
    events = stream(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed, eos_token_id=eos,
                    stop=args.stop or None, tokenizer=tokenizer, add_bos=False if args.no_bos else None,
                    cuda_graph=False if args.no_cuda_graph else None, compile=args.compile, stats=stats)
    reason = None
    for ev in events:
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        reason = ev.finish_reason or reason
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{stats.new_tokens} tokens, stopped by {reason}; prompt {stats.prompt_tokens} tokens, "
              f"prefill {stats.prefill_s * 1e3:.1f} ms, first token {stats.first_token_s * 1e3:.1f} ms, "
              f"decode {stats.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


# --- score (owned by the generation module) --------------------------------------------------------

def _register_score(sub) -> None:
    p = sub.add_parser("score", help="log-likelihood and perplexity of a text of any length, in constant memory")
    _add_model_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text")
    src.add_argument("--file", help="read the text from this file ('-' for stdin), a piece of lines at a time")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the config's BOS token")
    p.add_argument("--piece-tokens", type=int, default=None, help="tokens per forward call (default: the "
                   "prefill piece); the state is carried between calls")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_score)


def _text_pieces(path: str, on_piece, piece_chars: int = 1 << 16):
    """The file's text in pieces of whole lines (about ``piece_chars`` each), never all in memory;
    ``on_piece`` gets each piece's UTF-8 size as it is read."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    try:
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= piece_chars:
                piece, buf, size = "".join(buf), [], 0
                on_piece(len(piece.encode()))
                yield piece
        if buf:
            piece = "".join(buf)
            on_piece(len(piece.encode()))
            yield piece
    except UnicodeDecodeError as e:
        raise ValueError(f"{'stdin' if path == '-' else path} is not UTF-8 text ({e})") from None
    finally:
        if f is not sys.stdin:
            f.close()


def _run_score(args) -> int:
    import math
    import os

    from tqdm.auto import tqdm

    from .generation import score

    model, tokenizer = _load_for_inference(args)
    total = os.path.getsize(args.file) if args.file not in (None, "-") else None
    n_bytes = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="scoring", file=sys.stderr,
              disable=args.no_progress or args.text is not None) as bar:
        def read(n: int) -> None:
            nonlocal n_bytes
            n_bytes += n
            bar.update(n)

        if args.text is not None:
            text = args.text
            read(len(text.encode()))
        else:
            text = _text_pieces(args.file, read)
        result = score(model, text, tokenizer=tokenizer, add_bos=False if args.no_bos else None,
                       piece_tokens=args.piece_tokens)
    print(f"{result.tokens:,} tokens predicted, log-likelihood {result.log_likelihood:.4f} nats")
    print(f"per token: {result.nll:.4f} nats, {result.bits_per_token:.4f} bits, perplexity {result.perplexity:.4f}")
    if n_bytes:
        bits = -result.log_likelihood / math.log(2)
        print(f"per byte of the text ({n_bytes:,} UTF-8 bytes): {bits / n_bytes:.4f} bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
