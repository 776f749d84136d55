"""Every code block in README.md and docs/*.md runs, as a user would run it.

Per Markdown file (one test each, so a failure names the file):

- its ```python blocks, in order, form ONE script run as ``python script.py``
  in a fresh process: the ``process`` backend then spawns and pickles exactly
  as it does for a user's script (no ``if __name__ == "__main__":`` guard);
- then its ```bash blocks run one by one with ``bash -e``, with the
  virtualenv's ``bin/`` first on ``PATH`` so ``flowyml ...`` and ``python``
  are the ones under test.

Both run in a temporary directory holding symlinks ``data`` and ``examples``
to the repository's folders, so relative paths in the docs work and outputs
land in the temporary directory. A block preceded by
``<!-- no-test: reason -->`` is skipped; only a handful may be.

The public modules' docstring examples run as doctests here too.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import flowyml

REPO = Path(__file__).resolve().parent.parent
MARKDOWN = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
#: Info strings that run, and how: anything else (text, yaml, json...) is shown, not run.
RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
#: At most this many blocks may opt out of being run.
MAX_SKIPPED = 5
#: Seconds one file's script (or one bash block) may take.
TIMEOUT = 180

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_NO_TEST = re.compile(r"<!--\s*no-test:(?P<reason>.*?)-->", re.S)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip_reason: str | None  # None: runs; "" : marked no-test without a reason

    @property
    def where(self) -> str:
        return f"{_shown(self.path)}:{self.line}"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def extract_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file with their language and no-test marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, start = match["fence"], index
        language = (match["info"].strip().split() or [""])[0].lower()
        language = RUNNABLE.get(language, language)
        body = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(match["indent"]):])
            index += 1
        index += 1  # the closing fence
        blocks.append(Block(path, start + 1, language, "\n".join(body) + "\n", _marker(lines, start)))
    return blocks


def _marker(lines: list[str], fence_index: int) -> str | None:
    """The reason of a ``<!-- no-test: ... -->`` comment right above a fence (blank lines allowed)."""
    above = fence_index - 1
    while above >= 0 and not lines[above].strip():
        above -= 1
    if above < 0 or not lines[above].rstrip().endswith("-->"):
        return None
    start = above
    while start > 0 and "<!--" not in lines[start]:
        start -= 1
    match = _NO_TEST.search("\n".join(lines[start : above + 1]))
    return match["reason"].strip() if match else None


def _all_blocks() -> list[Block]:
    return [block for path in MARKDOWN for block in extract_blocks(path)]


def _bin_dir(tmp_path: Path) -> Path:
    """A directory holding a ``flowyml`` command: the installed console script, else a shim.

    In CI flowyml is installed (``pip install -e .``), so the venv's own
    ``bin/flowyml`` is used; in a checkout run with ``PYTHONPATH`` a small
    shim calls ``python -m flowyml`` instead.
    """
    venv_bin = Path(sys.executable).parent
    if (venv_bin / "flowyml").exists():
        return venv_bin
    shim_dir = tmp_path / "_bin"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "flowyml"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flowyml "$@"\n')
    shim.chmod(0o755)
    return shim_dir


def user_environment(tmp_path: Path) -> dict[str, str]:
    """The environment of a user's shell: venv first on PATH, flowyml importable, no forced backend."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWYML_", "PYTEST_")) or k == "FLOWYML_HOME"}
    path = [str(_bin_dir(tmp_path)), str(Path(sys.executable).parent), env.get("PATH", "")]
    env["PATH"] = os.pathsep.join(path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def user_directory(tmp_path: Path) -> Path:
    """A fresh working directory with ``data`` and ``examples`` linked in."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("data", "examples"):
        (work / name).symlink_to(REPO / name, target_is_directory=True)
    return work


def _script(blocks: list[Block]) -> tuple[str, dict[int, str]]:
    """The python blocks as one script, and script line -> Markdown location."""
    lines: list[str] = []
    origin: dict[int, str] = {}
    for block in blocks:
        lines.append(f"# ---- {block.where}")
        for offset, text in enumerate(block.code.splitlines(), start=1):
            lines.append(text)
            origin[len(lines)] = f"{_shown(block.path)}:{block.line + offset}"
    return "\n".join(lines) + "\n", origin


def _explain(output: str, script: Path, origin: dict[int, str]) -> str:
    """Annotate traceback lines of the generated script with the Markdown line they came from."""

    def annotate(match: re.Match[str]) -> str:
        return f"{match[0]} [= {origin.get(int(match[1]), '?')}]"

    return re.sub(rf'File "{re.escape(str(script))}", line (\d+)', annotate, output)


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


#: The bucket the docs' object-storage examples use, made afresh on the test S3 server.
EXAMPLE_BUCKET = "example-bucket"


def fresh_example_bucket() -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if fs.exists(EXAMPLE_BUCKET):
        fs.rm(EXAMPLE_BUCKET, recursive=True)
    fs.mkdir(EXAMPLE_BUCKET)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_code_blocks_run(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = [b for b in extract_blocks(path) if b.language in RUNNABLE and b.skip_reason is None]
    if not blocks:
        pytest.skip(f"{path.name} has no runnable code block")
    if any(f"s3://{EXAMPLE_BUCKET}" in b.code for b in blocks):
        request.getfixturevalue("s3_server")  # AWS_ENDPOINT_URL points at it (conftest)
        fresh_example_bucket()
    work, env = user_directory(tmp_path), user_environment(tmp_path)

    python_blocks = [b for b in blocks if b.language == "python"]
    if python_blocks:
        text, origin = _script(python_blocks)
        script = tmp_path / f"{path.stem}_blocks.py"
        script.write_text(text, encoding="utf-8")
        done = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, (
            f"the python blocks of {path.relative_to(REPO)} failed (exit {done.returncode}):\n"
            f"{_tail(_explain(done.stderr, script, origin))}\nstdout:\n{_tail(done.stdout, 2000)}"
        )

    for block in (b for b in blocks if b.language == "bash"):
        done = subprocess.run(["bash", "-e", "-c", block.code], cwd=work, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, (
            f"bash block at {block.where} failed (exit {done.returncode}):\n{block.code}\n"
            f"stderr:\n{_tail(done.stderr)}\nstdout:\n{_tail(done.stdout, 2000)}"
        )


def test_skipped_blocks_are_few_and_say_why() -> None:
    skipped = [b for b in _all_blocks() if b.skip_reason is not None]
    assert all(b.skip_reason for b in skipped), [b.where for b in skipped if not b.skip_reason]
    assert len(skipped) <= MAX_SKIPPED, [f"{b.where}: {b.skip_reason}" for b in skipped]


def test_every_fenced_block_names_its_language() -> None:
    # An unlabelled block would silently never run: say ```text for output.
    unlabelled = [b.where for b in _all_blocks() if not b.language]
    assert not unlabelled, f"label these code blocks (```python, ```bash, ```text...): {unlabelled}"


def test_block_extraction_handles_markers_and_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n\n```python\nx = 1\n```\n\n<!-- no-test: needs a cluster -->\n```bash\nflowyml run\n```\n"
        "\n<!-- no-test: -->\n\n````text\n```\nnested\n```\n````\n"
    )
    blocks = extract_blocks(page)
    assert [(b.language, b.line, b.skip_reason) for b in blocks] == [
        ("python", 3, None),
        ("bash", 8, "needs a cluster"),
        ("text", 14, ""),
    ]
    assert blocks[0].code == "x = 1\n"
    assert blocks[2].code == "```\nnested\n```\n"


def _public_modules() -> list[str]:
    """flowyml's modules, but ``__main__`` and the history's migrations: Alembic runs those, not an import."""
    names = [m.name for m in pkgutil.walk_packages(flowyml.__path__, "flowyml.")]
    return ["flowyml", *sorted(n for n in names
                               if not n.endswith("__main__") and not n.startswith("flowyml.history.migrations."))]


@pytest.mark.parametrize("module_name", _public_modules())
def test_docstring_examples(module_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Examples use relative paths (data/...) and may write out/...: run them in a scratch folder.
    monkeypatch.chdir(user_directory(tmp_path))
    module = importlib.import_module(module_name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module_name} failed (output above)"


def test_api_reference_covers_every_public_name() -> None:
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,4} `([^`]+)`", text, re.M))
    wanted = (set(flowyml.__all__) - {"__version__"}) | {"flowyml.utils.parallel.parallel_map"}
    missing = sorted(wanted - headings)
    assert not missing, f"docs/api.md has no section for {missing}"


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(path: Path) -> None:
    targets = [t for t in _LINK.findall(path.read_text(encoding="utf-8")) if not re.match(r"[a-z]+:|#", t)]
    broken = [t for t in targets if not (path.parent / t.split("#")[0]).exists()]
    assert not broken, f"{path.relative_to(REPO)} links to missing files: {broken}"


def test_mkdocs_nav_lists_every_page() -> None:
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", config, re.M))
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert pages <= listed, f"add to mkdocs.yml nav: {sorted(pages - listed)}"
    assert listed <= pages, f"mkdocs.yml lists missing pages: {sorted(listed - pages)}"


def test_a_failing_block_fails_and_the_error_names_its_markdown_line(tmp_path: Path) -> None:
    # The runner itself: a broken example must not pass silently.
    page = tmp_path / "broken.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 2, 'wrong x'\n```\n")
    text, origin = _script(extract_blocks(page))
    script = tmp_path / "broken_blocks.py"
    script.write_text(text)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "wrong x" in done.stderr
    assert "[= broken.md:10]" in _explain(done.stderr, script, origin)
