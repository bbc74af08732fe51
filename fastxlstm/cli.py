"""Command line: ``fastxlstm <command>``. Each command parses flags, calls one library function and
prints; there is no logic here that Python callers cannot reach."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastxlstm", description="Fast xLSTM: train, generate, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (_register_demo, _register_info, _register_train, _register_generate):
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
    from .checkpoint import load

    model = load(args.model, device="meta")
    print(model.cfg)
    print(f"parameters: {model.num_params():,}")
    return 0


# --- train (owned by the training module) ---------------------------------------------------------

def _register_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (not available yet)")
    p.set_defaults(run=lambda args: (_ for _ in ()).throw(RuntimeError("training is not implemented yet")))


# --- generate (owned by the generation module) -----------------------------------------------------

def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text (not available yet)")
    p.set_defaults(run=lambda args: (_ for _ in ()).throw(RuntimeError("generation is not implemented yet")))


if __name__ == "__main__":
    sys.exit(main())
