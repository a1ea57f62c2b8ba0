"""The documentation: README.md is the front door, docs/*.md hold the rest.

Checked here, from the Markdown itself:
- README.md stays short, links every docs page, and every page starts with a title and a link back to it;
- every relative link (and its #anchor) in README.md and docs/*.md resolves;
- every `megapile SUBCOMMAND [SUB-SUBCOMMAND]` the pages show (in code blocks and inline code) exists: its
  `--help` exits 0 (in-process, through megapile.cli.main, as the `megapile` console script runs it);
- every script, config and source path they show (`megapile/train.py`, `bench/*.py`, `launch/*.sh`,
  `slurm/*.sh`, `configs/*.yaml`, `ds_configs/*.json`, `megapile/**.py`, `tests/**.py`) exists.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 250


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _split(text: str) -> tuple[str, list[str]]:
    """(prose, fenced code blocks): the prose keeps its line structure, with fenced blocks blanked out."""
    prose, blocks, block, fence = [], [], [], None
    for line in text.split("\n"):
        m = re.match(r"\s*(```+|~~~+)", line)
        if fence is None and m:
            fence, block = m.group(1), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            blocks.append("\n".join(block))
            fence = None
            prose.append("")
        elif fence is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, "a code block is never closed"
    return "\n".join(prose), blocks


def _inline_code(prose: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, re.S)]


def _without_comments(block: str) -> str:
    """Shell/YAML/Python comments are prose, not commands."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in block.split("\n"))


def _code(path: str) -> list[str]:
    """Every piece of code a page shows: its fenced blocks (comments dropped) and its inline code spans."""
    prose, blocks = _split(open(path, encoding="utf-8").read())
    return [_without_comments(b) for b in blocks] + _inline_code(prose)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    prose, _ = _split(open(path, encoding="utf-8").read())
    seen: dict[str, int] = defaultdict(int)
    anchors = set()
    for line in prose.split("\n"):
        m = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")


def _links(path: str) -> list[str]:
    """Targets of the Markdown links in a page's prose (inline code and code blocks are not links)."""
    prose, _ = _split(open(path, encoding="utf-8").read())
    prose = re.sub(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", "", prose, flags=re.S)
    return LINK.findall(prose)


def _resolve(page: str, target: str) -> tuple[str, str]:
    path, _, anchor = target.partition("#")
    return (os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page), anchor


def _relative_links() -> list[tuple[str, str]]:
    return [(page, target) for page in PAGES for target in _links(page)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: ... are not checked


# --- the front door and the map ---------------------------------------------------------------------------

def test_readme_is_short():
    n = len(open(README, encoding="utf-8").read().splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; keep it under {README_MAX_LINES} and move sections to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {_resolve(README, target)[0] for target in _links(README)}
    missing = [_rel(page) for page in PAGES[1:] if page not in linked]
    assert len(PAGES) > 1, "no docs/*.md found"
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_readme_shows_the_two_fresh_machine_commands_ci_runs():
    prose, blocks = _split(open(README, encoding="utf-8").read())
    assert "pip install torch==2.13.0 && pip install -e . && bash launch/quickstart.sh" in blocks
    assert "bash .ci/run" in blocks
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    quoted = [code for code in _inline_code(prose) if code.startswith("pip install") and "pytest" in code]
    assert quoted, "README.md no longer quotes the test command that .ci/run runs"
    for code in quoted:
        assert code in ci, f"README.md quotes `{code}`, but .ci/run runs something else"


@pytest.mark.parametrize("page", PAGES[1:], ids=_rel)
def test_docs_page_starts_with_a_title_and_a_link_back(page):
    lines = open(page, encoding="utf-8").read().splitlines()
    assert lines and re.match(r"# \S", lines[0]), f"{_rel(page)}: the first line should be its '# Title'"
    head = "\n".join(lines[1:5])
    assert any(_resolve(page, t)[0] == README for t in LINK.findall(head)), \
        f"{_rel(page)}: no link back to README.md right under the title"


def test_relative_links_resolve():
    links = _relative_links()
    assert links, "no relative links found at all: the link parser is broken"
    broken = []
    for page, target in links:
        path, anchor = _resolve(page, target)
        if not os.path.exists(path):
            broken.append(f"{_rel(page)}: ({target}): {_rel(path)} does not exist")
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            broken.append(f"{_rel(page)}: ({target}): no heading with anchor #{anchor} in {_rel(path)} "
                          f"(has: {', '.join(sorted(_anchors(path)))})")
    assert not broken, "broken links:\n" + "\n".join(broken)


# --- commands -----------------------------------------------------------------------------------------------

# `megapile` where a command starts: at the start of a line or of an inline code span, after a shell operator,
# or as `python -m megapile.cli`; not inside prose that happens to be code (`megapile: error: ... megapile builds it`)
COMMAND = re.compile(r"(?:^|[;&|(]|-m)[ \t]*megapile(?:\.cli)?[ \t]+(?:\\\n\s*)?([a-z][a-z0-9-]*)"
                     r"(?:[ \t]+(?:\\\n\s*)?(\S+))?", re.M)


def _shown_commands() -> dict[str, dict[str | None, set[str]]]:
    """{subcommand: {the word after it (or None): pages showing it}} over README.md and docs/*.md."""
    shown: dict[str, dict[str | None, set[str]]] = defaultdict(lambda: defaultdict(set))
    for page in PAGES:
        for code in _code(page):
            for m in COMMAND.finditer(code):
                shown[m.group(1)][m.group(2)].add(_rel(page))
    return shown


SHOWN = _shown_commands()


def _sub_subcommands(module_name: str) -> tuple[set[str] | None, bool]:
    """(the words a subcommand takes first, whether they are subparsers with their own usage line), for
    `megapile ckpt info` (subparsers) or `megapile config show` (a first positional with choices); (None, False)
    when it takes no such word."""
    parser = argparse.ArgumentParser()
    importlib.import_module(module_name).add_cli(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices), True
    first = next((a for a in parser._actions if not a.option_strings), None)
    if first is not None and first.choices:
        return set(first.choices), False
    return None, False


def _help(argv: list[str], capsys) -> tuple[int, str]:
    from megapile.cli import main

    try:
        status = main(argv)
    except SystemExit as e:  # argparse's --help
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return status, out.out + out.err


def test_the_docs_show_commands():
    for expected in ("data", "tokenizer", "preprocess", "train", "ckpt", "eval"):
        assert expected in SHOWN, f"no `megapile {expected}` found in the docs: the command parser is broken"


@pytest.mark.parametrize("sub", sorted(SHOWN))
def test_shown_command_exists(sub, capsys):
    from megapile.cli import COMMANDS

    pages = sorted(set().union(*SHOWN[sub].values()))
    assert sub in COMMANDS, f"`megapile {sub}` is shown in {pages} but is not a megapile command (megapile/cli.py)"
    choices, own_usage = _sub_subcommands(COMMANDS[sub][0])
    if choices is None:
        invocations = [[sub]]
    else:
        words = {w for w in SHOWN[sub] if w is not None and not w.startswith(("-", "[", "<"))}
        invocations = [[sub, w] for w in sorted(words)] or [[sub]]
        wrong = {w: sorted(SHOWN[sub][w]) for w in words if w not in choices}
        assert not wrong, f"`megapile {sub}` takes {sorted(choices)}; the docs show {wrong}"
    for argv in invocations:
        status, out = _help(argv + ["--help"], capsys)
        assert status == 0, f"`megapile {' '.join(argv)} --help` exited {status}:\n{out}"
        usage = "usage: megapile " + " ".join(argv if own_usage else argv[:1])
        assert usage in out, f"`megapile {' '.join(argv)} --help` printed no '{usage}':\n{out}"


# --- paths --------------------------------------------------------------------------------------------------

PATH = re.compile(r"(?<![\w./$-])((?:megapile|bench|launch|slurm|configs|ds_configs|tests)/[\w./*<>-]*?"
                  r"\.(?:py|sh|yaml|yml|json))(?![\w/-])")


def _shown_paths() -> dict[str, set[str]]:
    shown: dict[str, set[str]] = defaultdict(set)
    for page in PAGES:
        for m in PATH.finditer(open(page, encoding="utf-8").read()):
            if "<" not in m.group(1):  # configs/<model>.yaml is a placeholder
                shown[m.group(1)].add(_rel(page))
    return shown


def test_shown_paths_exist():
    shown = _shown_paths()
    for expected in ("megapile/train.py", "slurm/train.sh", "ds_configs/zero1.json", "launch/quickstart.sh"):
        assert expected in shown, f"{expected} not found in the docs: the path parser is broken"
    missing = {path: sorted(pages) for path, pages in shown.items() if not glob.glob(os.path.join(ROOT, path))}
    assert not missing, "paths shown in the docs that do not exist in the repository:\n" + "\n".join(
        f"  {path} (in {', '.join(pages)})" for path, pages in sorted(missing.items()))
