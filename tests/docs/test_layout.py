"""The package map of docs/internals.md, enforced by reading the source with ``ast`` (nothing is imported).

Rules, for every ``.py`` file under ``models/`` and ``utils/`` (imports inside functions count too):

1. Each file belongs to one part: ``models``, ``utils.loss`` or a package of ``utils``; ``utils/`` holds
   nothing but its packages, ``__init__.py`` and ``loss.py``, and each package has an ``__init__.py``
   with a docstring.
2. A part imports only itself and the parts listed for it in ``ALLOWED``: ``models`` imports nothing
   from ``utils`` but ``utils.core``; ``utils.core`` imports no other part; ``utils.ops`` only
   ``utils.core``; the other parts as the table says.
3. Neither ``models`` nor ``utils`` imports an entry script (train.py, val.py, ...), ``benchmarks``,
   ``scripts`` or ``tests``.
4. Nothing runs at import: a module's top level holds only its docstring, imports, definitions,
   assignments and an ``if __name__ == "__main__":`` block (``__main__.py`` files are exempt).

The last tests feed small fake sources to the same checker, so a checker that accepts everything fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# part -> the other parts it may import (each part may always import itself)
ALLOWED: dict[str, frozenset[str]] = {
    "models": frozenset({"utils.core"}),
    "utils.core": frozenset(),
    "utils.ops": frozenset({"utils.core"}),
    "utils.data": frozenset({"utils.core", "utils.ops", "utils.convert"}),
    "utils.convert": frozenset({"utils.core", "utils.data"}),
    "utils.distill": frozenset({"utils.core", "models"}),
    "utils.loss": frozenset({"utils.core", "utils.ops", "utils.distill", "models"}),
    "utils.checkpoint": frozenset({"utils.core", "models"}),
    "utils.eval": frozenset({"utils.core", "utils.ops", "models"}),
    "utils.export": frozenset({"utils.core", "utils.ops", "utils.data", "utils.checkpoint", "models"}),
    "utils.engine": frozenset({"utils.core", "utils.ops", "utils.data", "utils.distill", "utils.loss", "utils.eval",
                               "utils.checkpoint", "models"}),
}
UTILS_PACKAGES = sorted(part.split(".", 1)[1] for part in ALLOWED if part.startswith("utils.") and part != "utils.loss")
# top-level names of what sits above the library: the entry scripts and the folders that use it
OUTSIDE = frozenset({"train", "train_distill", "val", "detect_dual", "export", "prune", "benchmarks", "scripts",
                     "tests"})
TOP_LEVEL_KINDS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                   ast.AnnAssign)


def module_name(rel: Path) -> str:
    """``utils/data/config.py`` -> ``utils.data.config``; a package's ``__init__.py`` -> the package."""
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str | None:
    """The part a module belongs to: ``models``, ``utils.<package>`` or ``utils.loss``; ``utils`` itself
    (its ``__init__``) is None, as is anything outside ``models`` and ``utils``."""
    head, _, rest = module.partition(".")
    if head == "models":
        return "models"
    if head == "utils" and rest:
        return "utils." + rest.split(".", 1)[0]
    return None


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import anywhere in the tree, relative ones resolved against
    ``module``. ``from utils import data`` yields ``utils.data``: the name may be a package."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base in ("utils", "models"):
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def runs_at_import(tree: ast.Module) -> list[int]:
    """Lines of top-level statements other than the docstring, imports, definitions, assignments and an
    ``if __name__ == "__main__":`` block."""
    lines = []
    for index, node in enumerate(tree.body):
        if isinstance(node, TOP_LEVEL_KINDS):
            continue
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"':
            continue
        lines.append(node.lineno)
    return lines


def violations(rel: Path, source: str) -> list[str]:
    """What in ``source`` (the text of the file at ``rel``, relative to the repository root) breaks rules
    2 to 4, one line each."""
    module = module_name(rel)
    part = part_of(module)
    tree = ast.parse(source, filename=str(rel))
    problems = []
    for line, name in imported_modules(tree, module, rel.name == "__init__.py"):
        head = name.split(".", 1)[0]
        target = part_of(name)
        if head in OUTSIDE:
            problems.append(f"{rel}:{line}: imports {name}, which sits above the library")
        elif head in ("models", "utils") and part is not None and target not in (part, *ALLOWED[part]):
            allowed = ", ".join(sorted(ALLOWED[part])) or "no other part"
            problems.append(f"{rel}:{line}: {part} imports {name} ({target}); it may import {allowed}")
    if rel.name != "__main__.py":
        problems += [f"{rel}:{line}: a statement runs at import" for line in runs_at_import(tree)]
    return problems


def library_files() -> list[Path]:
    return sorted(p.relative_to(ROOT) for folder in ("models", "utils") for p in (ROOT / folder).rglob("*.py"))


# --- the repository -----------------------------------------------------------------------------

def test_every_file_belongs_to_a_known_part():
    stray = [str(rel) for rel in library_files()
             if rel != Path("utils/__init__.py") and part_of(module_name(rel)) not in ALLOWED]
    assert not stray, f"files outside the package map of docs/internals.md: {stray}"


def test_utils_holds_only_its_packages_and_loss():
    entries = {p.name for p in (ROOT / "utils").iterdir() if p.name != "__pycache__"}
    assert entries == {"__init__.py", "loss.py", *UTILS_PACKAGES}


@pytest.mark.parametrize("package", UTILS_PACKAGES)
def test_each_package_says_what_it_owns(package):
    init = ROOT / "utils" / package / "__init__.py"
    assert init.is_file(), f"utils/{package} is not a package"
    assert ast.get_docstring(ast.parse(init.read_text())), f"utils/{package}/__init__.py has no docstring"


def test_imports_follow_the_package_map():
    problems = [line for rel in library_files() for line in violations(rel, (ROOT / rel).read_text())]
    assert not problems, "\n".join(problems)


# --- the checker on fake sources ------------------------------------------------------------------

@pytest.mark.parametrize("rel, source", [
    ("models/heads.py", "from utils.ops.boxes import xywh2xyxy\n"),
    ("models/yolo.py", "def f():\n    from utils.engine.trainer import Trainer\n"),
    ("models/yolo.py", "from utils import loss\n"),
    ("utils/core/log.py", "import utils.data.config\n"),
    ("utils/core/paths.py", "from models.yolo import DetectionModel\n"),
    ("utils/ops/nms.py", "from utils import eval\n"),
    ("utils/ops/nms.py", "from ..eval import metrics\n"),
    ("utils/eval/metrics.py", "from utils.export.backends import load_backend\n"),
    ("utils/engine/trainer.py", "import val\n"),
    ("utils/engine/trainer.py", "from utils.export.onnx import export_onnx\n"),
    ("utils/data/dataset.py", "from benchmarks.harness.commands import ROOT\n"),
    ("utils/ops/boxes.py", "import torch\ntorch.set_num_threads(1)\n"),
])
def test_checker_catches_a_broken_rule(rel, source):
    assert violations(Path(rel), source), f"{rel}: {source!r} should break a rule"


@pytest.mark.parametrize("rel, source", [
    ("models/yolo.py", "from utils.core.errors import UserError\n"),
    ("utils/engine/trainer.py", "from utils.eval.evaluator import evaluate\n"),
    ("utils/export/onnx.py", "from utils.export import precision\nfrom . import quantize\n"),
    ("utils/data/synthetic.py", '"""Doc."""\nX = 1\nif __name__ == "__main__":\n    main()\n'),
    ("utils/checkpoint/__main__.py", "from utils.checkpoint.cli import main\nmain()\n"),
])
def test_checker_accepts_what_the_map_allows(rel, source):
    assert violations(Path(rel), source) == []
