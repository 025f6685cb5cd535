"""The commands in README.md and docs/*.md stay true to the code.

Every fenced shell block (```bash, ```sh, ```shell, ```console or a bare ```) is read line by line,
``\\`` continuations joined. A command that runs one of our entry points (train.py, train_distill.py,
val.py, detect_dual.py, export.py, prune.py, ``python -m utils...``, ``python -m benchmarks...``,
``python -m scripts...``, also behind ``torchrun``, and ``make TARGET``) is parsed by that entry
point's own argument parser without running it (a make target must exist in the Makefile). Every
repository path it names (models/, hyp/, data/, weights/, scripts/, benchmarks/, ...) must exist; a
path under runs/ or datasets/ (git-ignored outputs) must be written by an earlier command of the same
block: a training run's weights, export.py's ``best-fp16.onnx`` / ``best-int8.onnx``, prune.py's
``best-pruned30.pt``, a converter's data.yaml, a ``cp`` target, a data yaml's converted set. Other
lines (trtexec, pip, cd, scp, sudo, comments) are skipped. The last tests feed deliberately wrong
commands to the same checker, so a checker that accepts everything fails them.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import yaml

from utils.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
ENTRY_SCRIPTS = {"train.py": "train", "train_distill.py": "train_distill", "val.py": "val",
                 "detect_dual.py": "detect_dual", "export.py": "export", "prune.py": "prune"}
OUR_PACKAGES = ("utils", "benchmarks", "scripts")
TRACKED_DIRS = ("models", "hyp", "data", "weights", "scripts", "benchmarks", "docs", "tests", "utils")
OUTPUT_DIRS = ("runs", "datasets")  # git-ignored: only a command writes them
PATH_RE = re.compile(r"^(?:\./)?(?:%s)/[^\s<>]*$" % "|".join(TRACKED_DIRS + OUTPUT_DIRS))
MODEL_SUFFIXES = {".pt", ".onnx", ".engine"}  # inside a run folder these must be written by name
OUTPUT_FLAGS = {"--out", "--work", "--project", "--name", "--save-dir"}  # what a command writes, not reads
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = {">", ">>", "<"}
# what scripts/demo.sh writes: its run folders and each run's best.pt and best.onnx
DEMO_RUNS = ("teacher", "student-distill", "student-scratch")
MAKE_OUTPUTS = {target: (folder, {f"{folder}/{run}/weights/best.{ext}" for run in DEMO_RUNS for ext in ("pt", "onnx")})
                for target, folder in (("demo", "runs/demo"), ("demo-smoke", "runs/demo-smoke"))}


# --- reading the docs -------------------------------------------------------------------------------

@dataclass
class Block:
    file: str
    lines: list[tuple[int, str]]  # (first physical line number, logical line)


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Join ``\\`` continuations; each logical line keeps the number of its first physical line."""
    out, buf, start = [], "", None
    for offset, raw in enumerate(lines):
        start = first + offset if start is None else start
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        out.append((start, buf + raw))
        buf, start = "", None
    if buf:
        out.append((start, buf))
    return out


def shell_blocks(text: str, name: str) -> list[Block]:
    """The fenced blocks of a markdown text whose language is a shell (or none)."""
    blocks, body, lang, start = [], None, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if body is None:
            if stripped.startswith("```"):
                words = stripped[3:].split()
                lang, body, start = (words[0].lower() if words else ""), [], number + 1
        elif stripped.startswith("```"):
            if lang in SHELL_LANGS:
                blocks.append(Block(name, logical_lines(body, start)))
            body = None
        else:
            body.append(raw)
    return blocks


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at && || ; | &, redirections and comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current, tokens = [], [], iter(list(lexer))
    for token in tokens:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        elif token in REDIRECTS:
            next(tokens, None)
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


# --- what a command is ------------------------------------------------------------------------------

@dataclass
class Command:
    kind: str  # module | make | copy | repo-script | misplaced
    name: str = ""  # the module to parse with (module), the reason (misplaced)
    args: list[str] = field(default_factory=list)


def _entry_script(args: list[str]) -> Command | None:
    """The first of our entry scripts in ``args`` (torchrun's or a launcher's argument list)."""
    for i, token in enumerate(args):
        path = Path(token)
        if path.name in ENTRY_SCRIPTS and str(path.parent) in ("", "."):
            return Command("module", ENTRY_SCRIPTS[path.name], args[i + 1:])
    return None


def classify(argv: list[str]) -> Command | None:
    """Our command in ``argv`` (environment assignments in front allowed), or None for anything else."""
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        argv = argv[1:]
    if not argv:
        return None
    program = Path(argv[0]).name
    if program == "make":
        return Command("make", args=argv[1:])
    if program in ("cp", "mv"):
        return Command("copy", args=argv[1:])
    if program == "torchrun":
        return _entry_script(argv[1:])
    if PATH_RE.match(argv[0]) and argv[0].endswith(".sh"):
        return Command("repo-script", args=argv)
    if not re.fullmatch(r"python(3(\.\d+)?)?", program):
        return None
    rest = argv[1:]
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
        rest = rest[1:]  # python -u, -O, ...
    if not rest or rest[0] == "-c":
        return None
    if rest[0] == "-m":
        module = rest[1] if len(rest) > 1 else ""
        if module.split(".")[0] in OUR_PACKAGES:
            return Command("module", module, rest[2:])
        return _entry_script(rest[2:]) if module.startswith("torch.distributed") else None
    script = Path(rest[0])
    if script.name in ENTRY_SCRIPTS and str(script.parent) in ("", "."):
        return Command("module", ENTRY_SCRIPTS[script.name], rest[1:])
    if script.suffix == ".py" and script.parts and script.parts[0] in OUR_PACKAGES:
        module = ".".join(script.with_suffix("").parts)
        return Command("misplaced", f"run it as `python -m {module}` (the repository root on the path)")
    return None


# --- parsing with the entry point's own parser ------------------------------------------------------

class _Parsed(BaseException):
    """Raised by the patched ``ArgumentParser.parse_args`` to stop ``main`` right after parsing."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def _through_main(main, argv: list[str]) -> argparse.Namespace:
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            main(argv)
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError("main() returned without parsing its arguments")


def parser_of(module_name: str):
    """The module's ``parse_args`` (or its ``cli`` submodule's, for a package run with -m), else its
    ``main`` stopped right after it parses."""
    module = importlib.import_module(module_name)
    if callable(getattr(module, "parse_args", None)):
        return module.parse_args
    with contextlib.suppress(ModuleNotFoundError):
        cli = importlib.import_module(module_name + ".cli")
        if callable(getattr(cli, "parse_args", None)):
            return cli.parse_args
    if callable(getattr(module, "main", None)):
        return lambda argv: _through_main(module.main, argv)
    raise AssertionError(f"{module_name} has neither parse_args nor main")


def parse(module_name: str, args: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """(namespace, None), or (None, the parser's complaint); ``--help`` gives (None, None)."""
    try:
        parse_args = parser_of(module_name)
    except ModuleNotFoundError as exc:
        return None, f"no module {exc.name}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse_args(list(args)), None
    except UserError as exc:
        return None, str(exc)
    except SystemExit as exc:
        if exc.code in (0, None):
            return None, None
        return None, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"


# --- what a command writes --------------------------------------------------------------------------

def rel(path: str | Path) -> str:
    """A path as the docs write it: relative to the repository root, normalised."""
    path = Path(path)
    if path.is_absolute():
        with contextlib.suppress(ValueError):
            path = path.relative_to(ROOT)
    return os.path.normpath(str(path))


def converted_root(data_yaml: Path) -> str | None:
    """Where a data yaml with a ``convert:`` block puts its YOLO set (made on first use)."""
    with contextlib.suppress(OSError, yaml.YAMLError):
        config = yaml.safe_load(data_yaml.read_text())
        if isinstance(config, dict) and config.get("convert") and config.get("path"):
            return rel((data_yaml.parent / config["path"]).resolve())
    return None


@dataclass
class Written:
    files: set[str] = field(default_factory=set)
    runs: set[str] = field(default_factory=set)  # folders: any file but weights/exports (those by name)
    trees: set[str] = field(default_factory=set)  # folders: any file (make demo's runs)

    def add(self, other: Written) -> None:
        self.files |= other.files
        self.runs |= other.runs
        self.trees |= other.trees

    def has(self, path: str) -> bool:
        if path in self.files or path in self.runs or path in self.trees:
            return True
        parents = {str(p) for p in Path(path).parents}
        if parents & self.trees:
            return True
        return bool(parents & self.runs) and Path(path).suffix not in MODEL_SUFFIXES


def export_files(opt: argparse.Namespace) -> set[str]:
    """export.py's files: ``best.onnx``, ``best-fp16.onnx``, ``best-int8.onnx``, ``best-int8-fp16.onnx``,
    and with ``--include engine`` the ``.engine`` beside it and its ``.layers.json``."""
    weights = Path(opt.weights)
    int8, half = getattr(opt, "int8", False), getattr(opt, "half", False)
    kind = "int8-fp16" if int8 and half else "int8" if int8 else "fp16" if half else "fp32"
    onnx = weights.with_name(weights.stem + ("" if kind == "fp32" else f"-{kind}") + ".onnx")
    files = {rel(onnx)}
    if any("engine" in str(item) for item in getattr(opt, "include", []) or []):
        files |= {rel(onnx.with_suffix(".engine")), rel(onnx.with_name(onnx.stem + ".layers.json"))}
    return files


def writes(module_name: str, opt: argparse.Namespace) -> Written:
    out = Written()
    if module_name in ("train", "train_distill"):
        run = Path(opt.project) / opt.name
        out.files |= {rel(run / "weights" / "best.pt"), rel(run / "weights" / "last.pt")}
        out.runs.add(rel(run))
    elif module_name in ("val", "detect_dual"):
        out.runs.add(rel(Path(opt.project) / opt.name))
    elif module_name == "export":
        out.files |= export_files(opt)
    elif module_name == "prune":
        from utils.export.prune import default_output

        out.files.add(rel(opt.out) if opt.out else rel(default_output(opt.weights, opt.ratio)))
    elif module_name.startswith("utils.convert"):
        fmt = getattr(opt, "format", "")
        dst = {"voc": lambda: opt.dst, "coco": lambda: opt.paths[-1]}.get(fmt)
        if dst is not None:
            out.runs.add(rel(dst()))
            out.files.add(rel(Path(dst()) / "data.yaml"))
        elif fmt == "prepare" and converted_root(ROOT / opt.data):
            out.trees.add(converted_root(ROOT / opt.data))
    elif module_name.startswith("utils.checkpoint") and getattr(opt, "dst", None):
        out.files.add(rel(opt.dst))
    elif module_name.startswith("utils.data.synthetic") and getattr(opt, "out", None):
        out.trees.add(rel(opt.out))
    else:
        for flag in ("out", "work", "save_dir"):
            if getattr(opt, flag, None):
                out.trees.add(rel(getattr(opt, flag)))
    return out


# --- the checker ------------------------------------------------------------------------------------

def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


def named_paths(args: list[str]) -> list[str]:
    """The repository paths among a command's arguments (``--flag=value`` values included), except the
    values of the flags that name what it writes."""
    paths, skip_next = [], False
    for token in args:
        if skip_next:
            skip_next = False
            continue
        if token in OUTPUT_FLAGS:
            skip_next = True
            continue
        flag, eq, value = token.partition("=")
        if eq and flag.startswith("--"):
            if flag in OUTPUT_FLAGS:
                continue
            token = value
        if PATH_RE.match(token):
            paths.append(token[2:] if token.startswith("./") else token)
    return paths


def missing(path: str, written: Written, converted: set[str]) -> str | None:
    """Why ``path`` is not there, or None."""
    norm = os.path.normpath(path)
    if written.has(norm):
        return None
    if any(ch in norm for ch in "*?["):
        if glob.glob(str(ROOT / norm)):
            return None
        return f"{path} matches no file"
    if Path(norm).parts[0] in OUTPUT_DIRS:
        if Path(norm).parts[0] == "datasets" and any(norm == c or norm.startswith(c + os.sep) for c in converted):
            return None
        return f"{path} is not written by an earlier command of this block"
    return None if (ROOT / norm).exists() else f"{path} does not exist"


def check_block(block: Block, converted: set[str], targets: set[str]) -> tuple[list[str], int]:
    """(problems, number of our commands checked) of one block."""
    problems, checked, written = [], 0, Written()
    for number, line in block.lines:
        where = f"{block.file}:{number}"
        try:
            commands = simple_commands(line)
        except ValueError as exc:
            problems.append(f"{where}: {line.strip()[:90]}: not valid shell ({exc})")
            continue
        for argv in commands:
            command = classify(argv)
            if command is None:
                continue
            checked += 1
            text = " ".join(argv)[:110]
            if command.kind == "misplaced":
                problems.append(f"{where}: {text}: {command.name}")
            elif command.kind == "make":
                for target in [a for a in command.args if not a.startswith("-") and "=" not in a]:
                    if target not in targets:
                        problems.append(f"{where}: {text}: the Makefile has no target '{target}'")
                    elif target in MAKE_OUTPUTS:
                        folder, files = MAKE_OUTPUTS[target]
                        written.runs.add(folder)
                        written.files |= files
            elif command.kind == "copy":
                operands = [a for a in command.args if not a.startswith("-")]
                if operands:
                    written.files.add(os.path.normpath(operands[-1]))
            elif command.kind == "repo-script":
                reason = missing(command.args[0], written, converted)
                if reason:
                    problems.append(f"{where}: {text}: {reason}")
            else:
                opt, error = parse(command.name, command.args)
                if error is not None:
                    problems.append(f"{where}: {text}: {command.name}'s parser refuses it: {error}")
                    continue
                own = writes(command.name, opt) if opt is not None else Written()
                for path in named_paths(command.args):
                    if os.path.normpath(path) in own.files | own.runs | own.trees:
                        continue  # what this command writes
                    reason = missing(path, written, converted)
                    if reason:
                        problems.append(f"{where}: {text}: {reason}")
                written.add(own)
    return problems, checked


def check_text(text: str, name: str) -> tuple[list[str], int]:
    converted = {c for c in map(converted_root, sorted((ROOT / "data").glob("*.yaml"))) if c}
    targets = make_targets()
    problems, checked = [], 0
    for block in shell_blocks(text, name):
        block_problems, block_checked = check_block(block, converted, targets)
        problems += block_problems
        checked += block_checked
    return problems, checked


# --- the tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=[rel(d) for d in DOCS])
def test_doc_commands_parse_and_name_real_files(doc: Path):
    problems, _ = check_text(doc.read_text(encoding="utf-8"), rel(doc))
    assert not problems, "doc commands that the code does not accept:\n" + "\n".join(problems)


def test_the_docs_are_checked_at_all():
    """README shows every entry point, and the checker finds its commands (an extractor that found
    nothing would pass the test above vacuously)."""
    def commands_in(doc: Path) -> list[str]:
        return [line for block in shell_blocks(doc.read_text(encoding="utf-8"), doc.name) for _, line in block.lines]

    readme = commands_in(ROOT / "README.md")
    for script in ["make demo", "make test", *ENTRY_SCRIPTS, "python -m utils.convert"]:
        assert any(script in line for line in readme), f"README shows no command with {script}"
    assert any("python -m benchmarks." in line for doc in DOCS for line in commands_in(doc))
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert all(run in demo for run in DEMO_RUNS), "make demo's run folders changed: update DEMO_RUNS"
    checked = sum(check_text(doc.read_text(encoding="utf-8"), rel(doc))[1] for doc in DOCS)
    assert checked >= 25, checked


GOOD = """
```bash
python -m utils.convert coco exports/pcb datasets/pcb
python train.py --cfg models/detect/gelan-s.yaml --data datasets/pcb/data.yaml --hyp hyp/hyp.scratch-high.yaml \\
  --epochs 3 --name t
python export.py --weights runs/train/t/weights/best.pt --half --img 640   # writes best-fp16.onnx
python export.py --weights runs/train/t/weights/best.pt --int8 --data datasets/pcb/data.yaml --include engine
python prune.py --weights runs/train/t/weights/best.pt --ratio 0.3
python val.py --weights runs/train/t/weights/best-fp16.onnx --data data/bccd.yaml --project runs/v --name x
python val.py --weights runs/train/t/weights/best-int8.engine --data datasets/bccd/data.yaml
python train.py --weights runs/train/t/weights/best-pruned30.pt --data data/bccd.yaml --name t2 \\
  && cp runs/train/t2/weights/best.pt weights/mine.pt
python -m benchmarks.latency --out benchmarks/results/latency.json && make demo
python -m benchmarks.model_sizes --nc 3   # parsed through main(): it has no parse_args
python detect_dual.py --weights runs/demo/student-distill/weights/best.onnx --source datasets/bccd/images/test
trtexec --onnx=best-fp16.onnx --no-such-flag   # not ours: skipped
torchrun --nproc_per_node 2 train.py --data data/bccd.yaml --cfg models/detect/yolov9-tiny.yaml
```
"""

BAD = {
    "python train.py --data data/bccd.yaml --no-such-flag": "parser refuses",
    "python train.py --hyp hyp/hyp.no-such.yaml --data data/bccd.yaml": ("does not exist", "no such file"),
    "python train.py --cfg models/detect/no-such.yaml --data data/bccd.yaml": "does not exist",
    "make demo && python val.py --weights runs/demo/student-distill/weights/best-fp16.onnx --data data/bccd.yaml":
        "not written",
    "python val.py --weights runs/train/never/weights/best.pt --data data/bccd.yaml": "not written",
    "python train.py --data data/bccd.yaml --name t && python val.py --weights runs/train/t/weights/best-int8.onnx "
    "--data data/bccd.yaml": "not written",
    "python prune.py --weights weights/gelan-t-bccd256.pt && python train.py --weights weights/pruned.pt "
    "--data data/bccd.yaml": "does not exist",
    "python export.py --weights best.pt --img 640 --include": "parser refuses",
    "python -m utils.convert voc only-one-folder": "parser refuses",
    "python -m benchmarks.latency --no-such-flag": "parser refuses",
    "python -m benchmarks.model_sizes --nc three": "parser refuses",
    "python -m benchmarks.no_such_benchmark": "no module",
    "make no-such-target": "no target",
    "python benchmarks/latency.py": "python -m benchmarks.latency",
    "torchrun --nproc_per_node 2 train.py --data data/bccd.yaml --epochs ten": "parser refuses",
    "python detect_dual.py --weights w.pt --source data/no-such-folder": "does not exist",
}


def test_a_correct_block_passes():
    problems, checked = check_text(GOOD, "good.md")
    assert not problems, problems
    assert checked == 14


@pytest.mark.parametrize("command", list(BAD))
def test_a_wrong_command_is_caught(command: str):
    problems, checked = check_text(f"```bash\n{command}\n```\n", "bad.md")
    assert checked >= 1
    expected = BAD[command] if isinstance(BAD[command], tuple) else (BAD[command],)
    assert len(problems) == 1 and any(text in problems[0] for text in expected), problems


def test_blocks_continuations_and_skipped_lines():
    text = ("```python\npython train.py --no-such-flag\n```\n```sh\npython val.py \\\n  --weights a.pt \\\n"
            "  --data data/bccd.yaml --task test   # a comment\npip install x; cd /tmp\n```\n")
    blocks = shell_blocks(text, "x.md")
    assert len(blocks) == 1 and [number for number, _ in blocks[0].lines] == [5, 8]
    assert blocks[0].lines[0][1].split() == "python val.py --weights a.pt --data data/bccd.yaml --task test # a comment".split()
    assert check_text(text, "x.md") == ([], 1)
