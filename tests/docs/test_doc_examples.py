"""Every code example in README.md and docs/*.md runs here, so the documentation cannot drift from the code.

One test per page. The page's fenced blocks run in document order, in one temporary directory per page
(the current directory while they run), which holds a copy of the repository's ``recipes/`` folder so that
``recipes/classic.yaml`` resolves as it does from the repository root. By the block's language:

- ``python``: executed; all python blocks of a page share one namespace, so a later block uses the names
  an earlier one defined (and the files it wrote).
- ``bash``, ``sh``, ``shell``: run command by command. A trailing backslash continues a line, ``#`` starts
  a comment, and ``&&`` separates commands (pipes, redirections and ``;`` are not supported).

  * ``nnopt ARGS`` runs in this process as ``nnopt.cli.main(shlex.split(ARGS))`` and must exit 0, or with
    the status a trailing comment ``# exit N`` names.
  * ``NAME=VALUE ... nnopt ARGS`` (settings that must be in place before torch loads, such as
    ``ONEDNN_MAX_CPU_ISA``) runs ``python -m nnopt ARGS`` in a subprocess with those variables set.
  * A block whose commands are all setup or benchmark commands is not run, by rule: ``make`` (``make demo``
    and ``make test`` create the virtual environment this suite runs in), ``pip``, ``git``, ``python -m
    venv`` / ``python -m pip``, and ``python benchmarks/NAME.py`` (minutes to hours each; the measurement
    protocol keeps benchmarks out of the test suite). Each such block is reported as a skipped test.
  * Any other command fails the test: a page shows only commands this file runs or skips by rule.
- A block of any language whose first line is ``# file: NAME`` is written to NAME in the page's directory
  (a recipe or a module the next commands use), not run.
- Other blocks (``yaml``, ``text``, ``json``, ``console``, no language) are formats, synopses and output
  samples: not run.

A block is skipped only when the line right before its fence is ``<!-- doc-test: skip (REASON) -->``; the
reason is required and appears in the skip report (``pytest -ra``).

The examples are written to be cheap (few epochs, the bundled digits data, short timings), and each page
runs with one torch thread (restored afterwards): their speed is not what is tested, and models this small
train faster on one thread than on two busy ones.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

pytestmark = [
    pytest.mark.slow,
    # Keras 3 (docs/formats.md) on NumPy 2, as in tests/unit/test_keras_file.py
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
SKIP = re.compile(r"^\s*<!--\s*doc-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
SKIP_ANY = re.compile(r"<!--\s*doc-test:")
EXIT = re.compile(r"#\s*exit\s+(?P<code>\d+)\s*$")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FILE = re.compile(r"^#\s*file:\s*(?P<name>[\w.\-/]+)\s*$")
PYTHON, SHELL = {"python", "py", "python3"}, {"bash", "sh", "shell"}
UNSUPPORTED = {"|", "||", ";", ">", ">>", "<", "<<", "&", "2>", "2>&1"}


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # reason from a skip marker

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line} ({self.lang or 'no language'} block)"


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    expected: int
    source: str


def parse_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(ROOT).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        info = match["info"].split()
        lang = info[0].lower() if info else ""
        previous = lines[i - 1] if i > 0 else ""
        skip = SKIP.match(previous)
        if SKIP_ANY.search(previous) and not skip:
            raise AssertionError(f"{page}:{i}: a doc-test marker must read <!-- doc-test: skip (REASON) -->")
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"]:
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        else:
            raise AssertionError(f"{page}:{i + 1}: code block never closed")
        blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", skip["reason"].strip() if skip else None))
        i = j + 1
    return blocks


def shell_commands(block: Block) -> list[Command]:
    logical: list[str] = []
    pending = ""
    for raw in block.text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        logical.append(pending + raw)
        pending = ""
    if pending:
        logical.append(pending)
    commands: list[Command] = []
    for line in logical:
        if not line.strip() or line.strip().startswith("#"):
            continue
        exit_match = EXIT.search(line)
        tokens = shlex.split(line, comments=True)
        bad = UNSUPPORTED.intersection(tokens)
        if bad:
            raise AssertionError(f"{block.where}: unsupported shell syntax {sorted(bad)} in: {line.strip()}")
        parts: list[list[str]] = [[]]
        for token in tokens:
            if token == "&&":
                parts.append([])
            else:
                parts[-1].append(token)
        for n, part in enumerate(parts):
            env = {}
            while part and ENV.match(part[0]):
                name, _, value = part.pop(0).partition("=")
                env[name] = value
            if not part:
                raise AssertionError(f"{block.where}: empty command in: {line.strip()}")
            expected = int(exit_match["code"]) if exit_match and n == len(parts) - 1 else 0
            commands.append(Command(part, env, expected, line.strip()))
    return commands


def is_setup(argv: list[str]) -> bool:
    """make/pip/git/apt-get, python -m venv/pip, python benchmarks/NAME.py: not run inside the test suite."""
    name = Path(argv[0]).name
    if name in {"make", "pip", "pip3", "git", "apt-get"}:
        return True
    if re.fullmatch(r"python(3(\.\d+)?)?", name) and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2 and argv[2] in {"venv", "pip"}:
            return True
        return argv[1].startswith("benchmarks/")
    return False


def file_name(block: Block) -> str | None:
    first = block.text.splitlines()[0] if block.text.strip() else ""
    match = FILE.match(first)
    return match["name"] if match else None


def classify(block: Block) -> tuple[str, str]:
    """("run", "") or ("skip", reason) or ("none", "") for blocks that are not examples."""
    if file_name(block):
        kind = "run"
    elif block.lang in PYTHON:
        kind = "run"
    elif block.lang in SHELL:
        commands = shell_commands(block)
        setup = [is_setup(c.argv) for c in commands]
        if commands and all(setup):
            kind = "setup"
        else:
            for command, is_set in zip(commands, setup):
                if is_set:
                    raise AssertionError(f"{block.where}: setup command mixed with examples: {command.source}")
                if command.argv[0] != "nnopt":
                    raise AssertionError(
                        f"{block.where}: only `nnopt ...` commands run in doc examples, not: {command.source}")
            kind = "run"
    else:
        return "none", ""
    if block.skip:
        return "skip", block.skip
    if kind == "setup":
        return "skip", "setup or benchmark commands (make, pip, git, venv, benchmarks/): not run by rule"
    return "run", ""


ALL_BLOCKS = {page.relative_to(ROOT).as_posix(): parse_blocks(page) for page in PAGES}
SKIPPED = [(b, classify(b)[1]) for blocks in ALL_BLOCKS.values() for b in blocks if classify(b)[0] == "skip"]


def run_nnopt(command: Command, cwd: Path) -> tuple[int, str]:
    if command.env:  # must be set before torch loads: a fresh interpreter
        env = {**os.environ, **command.env}
        done = subprocess.run([sys.executable, "-m", "nnopt", *command.argv[1:]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout + done.stderr
    from nnopt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(command.argv[1:])
        except SystemExit as exc:  # argparse errors and --help
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return int(code or 0), out.getvalue()


def run_block(block: Block, namespace: dict, cwd: Path) -> None:
    name = file_name(block)
    if name:
        target = cwd / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text, encoding="utf-8")
    elif block.lang in PYTHON:
        # pad so that tracebacks give the page's own line numbers
        code = compile("\n" * block.line + block.text, str(ROOT / block.page), "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
        except Exception:
            pytest.fail(f"{block.where} failed:\n{traceback.format_exc()}", pytrace=False)
    elif block.lang in SHELL:
        for command in shell_commands(block):
            code, output = run_nnopt(command, cwd)
            print(f"$ {' '.join(command.argv)}\n{output}")  # shown with -s, or under a failure
            if code != command.expected:
                pytest.fail(f"{block.where}: `{command.source}` exited {code}, expected {command.expected}:\n"
                            f"{output[-4000:]}", pytrace=False)


@pytest.mark.parametrize("page", [p for p, bs in ALL_BLOCKS.items() if any(classify(b)[0] == "run" for b in bs)])
def test_page_examples_run(page, tmp_path, monkeypatch):
    import torch

    from nnopt import techniques

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("__doc_example__")  # a real module: dataclasses defined on a page look it up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict = module.__dict__
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in ALL_BLOCKS[page]:
            if classify(block)[0] == "run":
                run_block(block, namespace, tmp_path)
    finally:
        torch.set_num_threads(threads)
        # a page may register a technique (architecture.md shows how): it lasts for that page only
        for technique in techniques.techniques():
            if technique.config_type.__module__ == module.__name__:
                techniques.unregister_technique(technique.config_type)


@pytest.mark.parametrize("block,reason", SKIPPED, ids=[f"{b.page}:{b.line}" for b, _ in SKIPPED])
def test_skipped_block(block, reason):
    pytest.skip(f"{block.where}: {reason}")


def test_readme_starts_with_the_two_commands():
    first = ALL_BLOCKS["README.md"][0]
    commands = [" ".join(c.argv) for c in shell_commands(first)]
    assert commands == ["make demo", "make test"], commands
    before = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[: first.line - 1]
    assert sum(1 for line in before if line.strip()) <= 4, "the two commands come first, after a short intro"


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    anchors = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        if not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


@pytest.mark.parametrize("page", list(ALL_BLOCKS))
def test_links_resolve(page):
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    broken = []
    for match in LINK.finditer(text):
        target = match["target"]
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{page}: broken links {broken}"
