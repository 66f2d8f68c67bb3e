"""The docs hold together: every relative link and anchor in README.md and docs/ resolves, and
every command in the README's command table exists (``mola CMD --help`` exits 0)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text: str) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[str]:
    text = "\n".join(prose(path.read_text(encoding="utf-8")))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [m.group(1) for m in LINK.finditer(text)]


def test_slug_follows_github():
    assert (
        slug("Sweeps: does the allocation claim hold?") == "sweeps-does-the-allocation-claim-hold"
    )
    assert slug("`mola demo` and its recipe") == "mola-demo-and-its-recipe"
    assert (
        slug("Expert structures, per-module allocation, pre-trained LoRAs as experts")
        == "expert-structures-per-module-allocation-pre-trained-loras-as-experts"
    )


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [bad](#nowhere) [gone](missing.md)\n```\n[x](y.md)\n```\n")
    assert links(page) == ["#top", "#nowhere", "missing.md"]
    assert anchors(page) == {"top"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert page.is_file(), f"{page} is missing"
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(ROOT)} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


def command_table_commands() -> list[str]:
    lines = prose((ROOT / "README.md").read_text(encoding="utf-8"))
    start = lines.index("## Commands")
    commands = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        match = re.match(r"^\|\s*`mola ([a-z-]+)", line)
        if match:
            commands.append(match.group(1))
    return commands


def test_the_command_table_lists_every_command_once():
    from mola.cli import COMMANDS

    listed = command_table_commands()
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(COMMANDS)


@pytest.mark.parametrize("command", command_table_commands())
def test_every_command_in_the_readme_table_exists(command, capsys):
    from mola.cli import main

    try:
        status = main([command, "--help"])
    except SystemExit as stop:  # argparse's --help exits
        status = stop.code
    assert status in (0, None)
    assert f"usage: mola {command}" in capsys.readouterr().out
