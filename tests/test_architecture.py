"""The dependency arrows of ARCHITECTURE.md, checked on the package's import statements."""

import ast
from pathlib import Path

import fastxlstm

ROOT = Path(fastxlstm.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def files(sub: str = "") -> list[Path]:
    return sorted((ROOT / sub).rglob("*.py"))


def test_ops_import_only_torch_and_themselves():
    for path in files("ops"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top == "fastxlstm":
                assert name.startswith("fastxlstm.ops"), f"{path}: ops must not import {name}"
            if top == "triton":
                assert "triton" in path.relative_to(ROOT).parts[:-1], f"{path}: triton imported outside a triton/ folder"
            assert not name.startswith("torch.distributed"), f"{path}: ops must not import {name}"


def test_layers_and_model_do_not_reach_up_or_into_references():
    for path in files("layers") + [ROOT / "model.py"]:
        for name in imports_of(path):
            assert not name.startswith(("fastxlstm.cli", "fastxlstm.train", "fastxlstm.checkpoint",
                                        "fastxlstm.generate", "torch.distributed")), f"{path}: imports {name}"
            assert ".reference" not in name, f"{path}: the reference is reached only through the registry"


def test_nothing_imports_the_cli():
    for path in files():
        if path.name in ("cli.py", "__main__.py"):
            continue
        assert not any(n.startswith("fastxlstm.cli") for n in imports_of(path)), f"{path} imports the CLI"


def test_torch_distributed_only_where_allowed():
    allowed = {"train.py", "checkpoint.py", "distributed.py"}
    for path in files():
        if path.name in allowed:
            continue
        assert not any(n.startswith("torch.distributed") for n in imports_of(path)), f"{path} imports torch.distributed"


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, fastxlstm; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "import fastxlstm must not import triton"
