"""The README is a user's guide that stays true: every `vlp` command in its code blocks parses with the real parser,
every subcommand it names answers `--help`, it stays short, and no relative link in it or in docs/ is dangling.

In-process and cheap: the parser is built once, nothing is run, no subprocess."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from vlp.pipelines.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_BYTES = 15_000

# What a newcomer is shown: each of these subcommands must appear in at least one README command.
EXPECTED = {
    ("compile",), ("check",), ("plan",), ("render",), ("run",), ("bench",), ("setup",), ("publish",),
    ("teardown",), ("gc",), ("local", "up"), ("local", "status"), ("local", "token"), ("local", "down"),
    ("local", "reset"), ("schedule", "create"), ("schedule", "list"),
}  # fmt: skip

# Placeholders a reader replaces; argparse takes most as they are, these need a value of the right shape.
PLACEHOLDERS = {"PORT": "8080", "N": "1"}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SUBSTITUTION = re.compile(r"\$\((vlp [^()]*)\)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>"}


def _shell_lines(markdown: str) -> list[str]:
    """The lines of every fenced code block, `\\` continuations joined and a leading `$ ` prompt dropped."""
    lines: list[str] = []
    for block in FENCE.findall(markdown):
        pending = ""
        for raw in block.splitlines():
            line = pending + raw
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            lines.append(line)
    return lines


def _vlp_commands(line: str) -> list[list[str]]:
    """The argv of each `vlp` command on a shell line: each side of a pipe or `&&`, and each `$(vlp …)` inside it."""
    nested = SUBSTITUTION.findall(line)
    line = SUBSTITUTION.sub("VALUE", line)
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError as e:  # unbalanced quotes: a README command that does not even lex
        raise AssertionError(f"README line does not lex as shell ({e}): {line}") from e
    commands: list[list[str]] = []
    current: list[str] = []
    for token in [*tokens, ";"]:
        if token in SEPARATORS:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    argvs = []
    for command in commands:
        while command and ENV_ASSIGNMENT.match(command[0]):
            command = command[1:]
        if command and Path(command[0]).name == "vlp":
            argvs.append([PLACEHOLDERS.get(arg, arg) for arg in command[1:]])
    for inner in nested:
        argvs.extend(_vlp_commands(inner))
    return argvs


def readme_commands() -> list[tuple[str, list[str]]]:
    text = README.read_text(encoding="utf-8")
    return [(line, argv) for line in _shell_lines(text) for argv in _vlp_commands(line)]


def _parse(argv: list[str]) -> tuple[int | str | None, str]:
    """parse_args on a fresh parser; (None, '') when it parses, else (the SystemExit code, what argparse printed)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            return e.code, out.getvalue() + err.getvalue()
    return None, ""


def _subcommand(argv: list[str]) -> tuple[str, ...]:
    """The subcommand path an argv names, as the parser reads it: ('run',), ('local', 'up'), ..."""
    ns = build_parser().parse_args(argv)
    path = (ns.command,)
    for nested in ("local_command", "schedule_command"):
        if getattr(ns, nested, None):
            path += (getattr(ns, nested),)
    return path


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check() -> None:
    assert len(COMMANDS) >= 20, COMMANDS


@pytest.mark.parametrize(("line", "argv"), COMMANDS, ids=[" ".join(argv)[:80] for _, argv in COMMANDS])
def test_every_readme_command_parses(line: str, argv: list[str]) -> None:
    code, printed = _parse(argv)
    assert code is None, f"`{line}` does not parse (exit {code}):\n{printed}"


def test_every_subcommand_the_readme_names_answers_help() -> None:
    paths = {_subcommand(argv) for _, argv in COMMANDS if _parse(argv)[0] is None}
    missing = EXPECTED - paths
    assert not missing, f"the README shows no command for: {sorted(missing)}"
    for path in sorted(paths):
        code, printed = _parse([*path, "--help"])
        assert code == 0, f"`vlp {' '.join(path)} --help` exits {code}"
        assert f"usage: vlp {' '.join(path)}" in printed, printed


def test_a_misspelt_command_fails_the_check() -> None:
    # The check can fail: what the README would show if a subcommand or an option were misspelt.
    assert _vlp_commands("vlp lcoal up") == [["lcoal", "up"]]
    assert _parse(["lcoal", "up"])[0] == 2
    assert _parse(["run", "configs/local-demo.yaml", "--lcoal"])[0] == 2
    assert _vlp_commands('FOO=1 .venv/bin/vlp bench "$(vlp local token)" | head  # note') == [
        ["bench", "VALUE"],
        ["local", "token"],
    ]


def test_the_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size < MAX_README_BYTES, f"README.md is {size} bytes; move internals to docs/ (limit {MAX_README_BYTES})"


def test_configs_the_readme_names_exist() -> None:
    text = README.read_text(encoding="utf-8")
    named = set(re.findall(r"configs/([a-z0-9.-]+\.yaml)", text))
    assert named, "the README names no config"
    missing = sorted(name for name in named if not (ROOT / "configs" / name).is_file())
    assert not missing, f"README.md names configs that do not exist: {missing}"


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
OUTSIDE = re.compile(r"`(\.\./[^`\s]+)`")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _relative_targets(path: Path) -> list[str]:
    """Relative link targets in a markdown file (markdown links without a scheme, and `../…` paths in code spans),
    fenced code blocks left out."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    targets = [t for t in LINK.findall(text) if not SCHEME.match(t) and not t.startswith("#")]
    return targets + OUTSIDE.findall(text)


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a markdown file's headings: lowercase, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", FENCE.sub("", path.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_into_the_repository(doc: Path) -> None:
    bad = []
    for target in _relative_targets(doc):
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            bad.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{doc.relative_to(ROOT)} links to files or headings not in the repository: {bad}"
