"""The README and docs/ hold what a newcomer copies: they must stay short, linked and runnable.

A page whose example no longer compiles, or a link to a page that moved, is found here rather than
by a user. The mock-server page's example is run as its reader runs it: the server started with the
page's own command line, the connection from the page's ``export``, the DAG file from the page in the
dags folder, executed as ``__main__`` (so its ``dag.test()`` and its printing run), and what it
prints compared with the output the page shows.
"""

from __future__ import annotations

import importlib
import json
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
#: pages another branch of this session writes; a link to one is checked once the file exists
PAGES_FROM_OTHER_BRANCHES = {DOCS / "rate-control.md"}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#+) +(.+)$", re.M)


def _blocks(text: str, lang: str | None = None) -> list[tuple[int, str, str]]:
    """Fenced blocks as (line number of the fence, language, body)."""
    found = []
    for match in FENCE.finditer(text):
        if lang is None or match.group(1) == lang:
            found.append((text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2)))
    return found


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code, where a link can be."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(title) for _, title in HEADING.findall(FENCE.sub("", path.read_text()))}


def test_readme_is_short_and_its_first_dag_is_on_the_first_screen() -> None:
    text = README.read_text()
    lines = text.count("\n")
    assert lines <= 260, f"README.md has {lines} lines: move detail to docs/"
    python = _blocks(text, "python")
    assert python, "README.md has no python block (the first DAG)"
    first_line, _, body = python[0]
    assert first_line <= 60, f"the first DAG starts at line {first_line} of README.md"
    assert "with DAG(" in body and "Operator(" in body, "the first python block is not a DAG"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            if resolved not in PAGES_FROM_OTHER_BRANCHES:
                broken.append(f"{target}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.name}")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_docs_page_starts_with_an_example(page: Path) -> None:
    text = page.read_text()
    prose = FENCE.sub(_blank, text)  # a "# comment" in a bash block is no heading
    headings = [prose.count("\n", 0, m.start()) + 1 for m in HEADING.finditer(prose)]
    assert headings and text.startswith("# "), f"{page.name} does not start with its title"
    blocks = _blocks(text)
    assert blocks, f"{page.name} has no code block"
    first_block = blocks[0][0]
    second_heading = headings[1] if len(headings) > 1 else len(text.splitlines()) + 1
    assert first_block < second_heading, (
        f"{page.name}: its first code block (line {first_block}) comes after its second heading "
        f"(line {second_heading})"
    )


def _blank(match: re.Match[str]) -> str:
    """A fenced block replaced by as many empty lines, so line numbers stay."""
    return "\n" * match.group(0).count("\n")


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_python_block_compiles(page: Path) -> None:
    for line, _, body in _blocks(page.read_text(), "python"):
        compile(body, f"{page.name}:{line}", "exec")


DOTTED = re.compile(r"\bairflow_provider_llmq(?:\.\w+)+")
IMPORT = re.compile(r"^from (airflow_provider_llmq[\w.]*) import \(?([\w, ]+)", re.M)


def _resolves(dotted: str) -> bool:
    """``a.b.c`` names a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_llmq_name_a_page_uses_exists(page: Path) -> None:
    """Modules move (core/ by job): a page must not send its reader to an import that fails."""
    text = page.read_text()
    names = set(DOTTED.findall(text))
    for module, imported in IMPORT.findall(text):
        names.update(f"{module}.{name.strip()}" for name in imported.split(",") if name.strip())
    missing = sorted(name for name in names if not _resolves(name))
    assert not missing, f"{page.name} names what does not exist: {missing}"


# --- the mock-server page, run as its reader runs it ----------------------------------------------

MOCK_PAGE = DOCS / "mock-server.md"


def _page_command(text: str, prefix: str) -> str:
    for _, _, body in _blocks(text, "bash"):
        for line in body.splitlines():
            if line.startswith(prefix):
                return line
    raise AssertionError(f"{MOCK_PAGE.name} has no command starting with {prefix!r}")


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The mock server started with the page's command line, on a free port and a fresh CA folder."""
    command = _page_command(MOCK_PAGE.read_text(), "python -m airflow_provider_llmq.testing.mock_server")
    argv = shlex.split(command)
    assert argv[argv.index("--port") + 1] == "8443" and "--cert-dir" in argv
    argv[0] = sys.executable
    argv[argv.index("--port") + 1] = "0"
    argv[argv.index("--cert-dir") + 1] = str(tmp_path / "ca")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert set(started) == {"base_url", "ca_path", "port"}
        yield started
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow  # dag.test() with Spark: well over 10 s on a loaded 2-core machine
def test_the_mock_server_page_runs_as_written(
    page_server: dict[str, Any],
    airflow_db: Path,
    spark: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.conftest import DAGS_FOLDER

    text = MOCK_PAGE.read_text()
    export = _page_command(text, "export AIRFLOW_CONN_LLMQ_DEFAULT=")
    connection = json.loads(shlex.split(export.removeprefix("export "))[0].split("=", 1)[1])
    assert connection["host"] == "https://127.0.0.1:8443"  # what the page's server prints
    connection["host"] = page_server["base_url"]
    connection["extra"]["ca_cert"] = page_server["ca_path"]
    monkeypatch.setenv("AIRFLOW_CONN_LLMQ_DEFAULT", json.dumps(connection))

    [(_, _, dag_source)] = _blocks(text, "python")
    assert '"/tmp/llmq-mock-demo/answers"' in dag_source
    dag_file = DAGS_FOLDER / "my_llmq_dag.py"
    dag_file.write_text(dag_source.replace("/tmp/llmq-mock-demo", str(tmp_path / "demo")))
    try:
        runpy.run_path(str(dag_file), run_name="__main__")
    finally:
        dag_file.unlink()

    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("run:", "{'"))]
    shown = [line for _, _, body in _blocks(text, "") for line in body.splitlines()]
    expected = [line for line in shown if line.startswith(("run:", "{'review_id"))]
    assert len(expected) == 4, "the page shows the run's state and its three rows"
    assert printed == expected
