"""The docs a newcomer reads (issue 39): a short README that links every topic page, the key reference
generated from the code, and every command shown in README.md and docs/ naming real subcommands,
options and recipe keys (the cheap quickstart ones run)."""

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from amp_deploy.cli import app
from amp_deploy.recipe import key_docs, keys_markdown

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]


def _prose(text: str) -> list[str]:
    out, code = [], False
    for ln in text.splitlines():
        if ln.startswith("```"):
            code = not code
        elif not code:
            out.append(ln)
    return out


def test_the_readme_is_short_and_links_every_topic_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 150
    long = [ln for ln in _prose(text) if len(ln) > 120 and not ln.startswith("|")]
    assert not long, long
    for page in DOCS:
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"


def test_the_key_reference_is_the_code_s():
    assert (REPO / "docs" / "keys.md").read_text() == keys_markdown(), \
        "docs/keys.md is stale: amp-deploy check --keys --format md > docs/keys.md"
    res = CliRunner().invoke(app, ["check", "--keys", "--format", "json"])
    import json

    assert [r["key"] for r in json.loads(res.output)] == [k for k, _, _ in key_docs()]


def test_check_keys_in_a_pipe_prints_whole_lines():
    """Issue 39: in a log (no terminal) the table was drawn 80 columns wide and wrapped every key."""
    res = CliRunner().invoke(app, ["check", "--keys"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert len(lines) == len(key_docs())
    assert any(ln.startswith("compile.optimization_level = ") for ln in lines)


def commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every `amp-deploy ...` line in a code block of README.md and docs/ (continuation
    lines joined, comments dropped)."""
    out = []
    for page in PAGES:
        code, pending = False, ""
        for ln in page.read_text().splitlines():
            if ln.startswith("```"):
                code = not code
                continue
            if not code:
                continue
            ln = pending + ln
            if ln.rstrip().endswith("\\"):
                pending = ln.rstrip()[:-1] + " "
                continue
            pending = ""
            if "amp-deploy" not in ln.split("#")[0]:
                continue
            words = shlex.split(ln, comments=True)
            if words and words[0].endswith("amp-deploy"):
                out.append((page.name, words[1:]))
    return out


def _known_keys() -> set[str]:
    keys = {k for k, _, _ in key_docs()}
    return keys


def test_every_shown_command_names_real_subcommands_options_and_keys():
    group = typer.main.get_command(app)
    keys = _known_keys()
    shown = commands()
    assert len(shown) >= 20
    for page, argv in shown:
        sub = argv[0]
        names = sub.split("|")  # "prune|export|validate OUT": each must exist
        for name in names:
            assert name in group.commands, f"{page}: `amp-deploy {sub}`: no such subcommand"
        cmd = group.commands[names[0]]
        options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for word in argv[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"{page}: `amp-deploy {sub} {word}`: no such option"
            elif "=" in word and re.match(r"^[a-z_]+(\.[a-z_0-9]+)+=", word):
                key = word.split("=", 1)[0]
                assert key in keys, f"{page}: `{word}`: no recipe key {key!r}"


QUICK = [argv for _, argv in commands() if argv[0] == "build" and "recipes/quickstart.yaml" in argv]


@pytest.mark.parametrize("argv", QUICK, ids=[" ".join(a[2:])[:60] for a in QUICK])
def test_the_quickstart_build_lines_pass_check(argv, monkeypatch):
    """Every quickstart build line shown is a recipe `check` accepts (its overrides included)."""
    monkeypatch.chdir(REPO)
    rest = [w for w in argv[1:] if not w.startswith("--") and w not in ("2",)]
    rest = [w for w in rest if "=" in w or w.endswith(".yaml")]
    res = CliRunner().invoke(app, ["check", *rest])
    assert res.exit_code == 0 or "bf16" in res.output, res.output
