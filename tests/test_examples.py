"""Every example script and every Python block of the README and the docs runs, on the CPU.

The docs' blocks run page by page: a page's Python blocks in order, in one namespace (a later
block uses what an earlier one built, as a reader would), in a fresh working directory. A block
that is a fragment is marked with an HTML comment on the line before its fence,
``<!-- not-run: why -->``; there are few. A ``text`` block marked ``<!-- output -->`` is what
the Python block before it prints, checked line by line. The examples run as scripts, each in
its own process (``torchrun_ddp.py`` under ``python -m torch.distributed.run`` with 2 ranks),
bounded by a timeout that kills the whole process group; together they take minutes, so they
are ``slow``.
The collector is shown to find what it should and to fail a page whose block fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted([README, *(ROOT / "docs").rglob("*.md")])
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
#: the README stays a five-minute read
README_LINES = 150
#: fragments (blocks that are not run) stay rare
MAX_FRAGMENTS = 4
#: seconds an example may take on a loaded 2-core machine (they take 10-30 s there)
EXAMPLE_TIMEOUT = 300
#: a line each example prints once it has checked what it shows
EXAMPLE_SAYS = {
    "fit_mlp.py": "largest difference between the two runs' step losses",
    "gpt2_tokens.py": "fit's step against the whole window's",
    "gpt2_token_budget.py": "every step trained exactly its target of loss tokens",
    "hf_trainer.py": "optimizer steps, loss",
    "lightning_mlp.py": "max_micro=100: accumulate_grad_batches 4",
    "long_run.py": "resumed run == uninterrupted run, bit for bit: True",
    "own_loop.py": "train accuracy",
    "torchrun_ddp.py": "× 2 ranks",
}
#: what an example or a page needs beyond the core install (the dev extra has all of them)
NEEDS = {
    "hf_trainer.py": "transformers",
    "gpt2_tokens.py": "transformers",
    "gpt2_token_budget.py": "transformers",
    "lightning_mlp.py": "lightning",
    "transformers.md": "transformers",
    "tokens-and-schedules.md": "transformers",
    "lightning.md": "lightning",
}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_NOT_RUN = re.compile(r"^<!--\s*not-run\b.*-->$")
_OUTPUT = "<!-- output -->"


@dataclass(frozen=True)
class Block:
    """A fenced Python block of a Markdown file."""

    path: Path
    line: int  #: the file's line (1-based) of the block's first line of code
    code: str
    marker: str | None  #: ``<!-- not-run: why -->`` before a fragment; None: the block runs
    expected: str | None = None  #: what it prints, from a ``<!-- output -->`` block after it

    @property
    def run(self) -> bool:
        return self.marker is None


def blocks(path: Path, text: str | None = None) -> list[Block]:
    """The Python blocks of the Markdown file ``path`` (or of ``text``), in order."""
    lines = (path.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if opened is None:
            i += 1
            continue
        indent, fence = opened["indent"], opened["fence"]
        end = i + 1
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 1}: a code block that is never closed")
        body = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end]) + "\n"
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        if opened["lang"] in ("python", "py"):
            found.append(Block(path, i + 2, body, before if _NOT_RUN.match(before) else None))
        elif before == _OUTPUT:
            if not found or found[-1].expected is not None or not found[-1].run:
                where = f"{path}:{i + 1}"
                raise ValueError(f"{where}: an output block follows no Python block that runs")
            found[-1] = replace(found[-1], expected=body)
        i = end + 1
    return found


def _closes(line: str, fence: str) -> bool:
    text = line.strip()
    return text.startswith(fence) and set(text) == {fence[0]}


def run_page(path: Path, text: str | None = None) -> int:
    """Run the page's blocks in order in one namespace; how many ran. A failing block raises,
    its traceback naming the page and the page's own line numbers; a block whose output is
    shown must print just that."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    ran = 0
    for block in blocks(path, text):
        if not block.run:
            continue
        padded = "\n" * (block.line - 1) + block.code  # the page's line numbers
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(padded, str(path), "exec"), namespace)
        sys.stdout.write(printed.getvalue())
        if block.expected is not None:
            assert _lines(printed.getvalue()) == _lines(block.expected), (
                f"{path}:{block.line}: the block does not print what the page shows"
            )
        ran += 1
    return ran


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the docs' Python blocks


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.run for b in blocks(p))], ids=_name)
def test_every_python_block_of_the_page_runs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    if page.name in NEEDS:
        pytest.importorskip(NEEDS[page.name])
    monkeypatch.chdir(tmp_path)  # files a block writes (checkpoints, logs) land here
    assert run_page(page) > 0


def test_the_readme_is_short_and_runs_at_least_one_example() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_LINES, f"README.md has {len(lines)} lines; keep it to a page"
    assert any(b.run for b in blocks(README))


def test_fragments_are_few_and_say_why() -> None:
    fragments = [b for p in PAGES for b in blocks(p) if not b.run]
    assert len(fragments) <= MAX_FRAGMENTS, [f"{_name(b.path)}:{b.line}" for b in fragments]
    for b in fragments:
        assert re.search(r"not-run:\s*\S", b.marker or ""), f"{_name(b.path)}:{b.line}: say why"


def test_readme_links_point_at_files_that_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing


def test_every_docs_page_is_in_the_site_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [
        p.relative_to(ROOT / "docs").as_posix()
        for p in (ROOT / "docs").rglob("*.md")
        if "_ext" not in p.parts
    ]
    assert [p for p in pages if f" {p}" not in nav] == []


def test_every_example_is_listed_and_tested() -> None:
    listed = (ROOT / "docs" / "getting-started.md").read_text()
    names = {p.name for p in EXAMPLES}
    assert names, "examples/ holds the example scripts"
    assert [n for n in sorted(names) if f"examples/{n}" not in listed] == []
    assert sorted(EXAMPLE_SAYS) == sorted(names)


# ------------------------------------------------------------------ the collector itself

_SAMPLE = """\
# A page

```python
x = 1
```

- a list item with a block:

    ```python
    y = x + 1
    ```

<!-- not-run: a fragment -->
```python
undefined_name
```

```bash
python -c 'raise SystemExit(1)'
```

````markdown
```python
not a block of this page
```
````

```py
assert y == 2
print(x, y)
```

<!-- output -->
```text
1 2
```
"""


def test_the_collector_finds_runs_and_skips_what_it_should(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    found = blocks(page, _SAMPLE)
    assert [(b.line, b.code, b.run) for b in found] == [
        (4, "x = 1\n", True),
        (10, "y = x + 1\n", True),
        (15, "undefined_name\n", False),
        (29, "assert y == 2\nprint(x, y)\n", True),
    ]
    assert [b.expected for b in found] == [None, None, None, "1 2\n"]
    assert run_page(page, _SAMPLE) == 3  # one namespace: the last block sees x and y


def test_a_failing_block_fails_its_page_and_names_its_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    broken = _SAMPLE.replace("assert y == 2", "assert y == 3, 'the docs are wrong'")
    with pytest.raises(AssertionError, match="the docs are wrong") as caught:
        run_page(page, broken)
    frame = caught.traceback[-1]
    assert (Path(str(frame.path)).name, frame.lineno + 1) == ("page.md", 29)


def test_a_block_that_prints_otherwise_than_shown_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    with pytest.raises(AssertionError, match=r"page.md:29: the block does not print what"):
        run_page(page, _SAMPLE.replace("1 2", "1 3"))


def test_an_output_block_belongs_to_a_python_block_that_runs(tmp_path: Path) -> None:
    text = "<!-- not-run: a fragment -->\n```python\nx\n```\n<!-- output -->\n```text\n1\n```\n"
    with pytest.raises(ValueError, match=r"page.md:6: an output block follows no Python"):
        blocks(tmp_path / "page.md", text)


def test_an_unclosed_block_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"page.md:3: a code block that is never closed"):
        blocks(tmp_path / "page.md", "# A page\n\n```python\nx = 1\n")


# ------------------------------------------------------------------ the examples


def run_bounded(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``command`` in its own process group, killed with everything it started after
    ``timeout`` seconds (torchrun's workers included)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"{command} ran past {timeout} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output)


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    if script.name in NEEDS:
        pytest.importorskip(NEEDS[script.name])
    command = [sys.executable, str(script)]
    if script.name == "torchrun_ddp.py":
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2", str(script),
        ]  # fmt: skip
    done = run_bounded(command, tmp_path, EXAMPLE_TIMEOUT)
    assert done.returncode == 0, done.stdout[-4000:]
    assert EXAMPLE_SAYS[script.name] in done.stdout, done.stdout[-4000:]
