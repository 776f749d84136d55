"""The notebooks in notebooks/ run top to bottom in a real Jupyter kernel.

Each runs with nbclient on the ``python3`` kernel (jupyter_client starts it
with this interpreter), in a scratch directory holding a ``data`` symlink, so
their outputs land there and not in the repository. Besides "no cell
raised", the tests check what a reader sees: the graph and the result as
HTML, the dashboard link, no stray warnings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html import escape
from pathlib import Path

import ipykernel  # noqa: F401  the kernel the notebooks run on (the dev extra installs all three)
import nbclient
import nbformat
import pytest

from .test_report import _task_bars, _timeline_svg

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 180


def _outputs(book, kind: str) -> list[str]:
    """Every output of ``kind`` ('text/html', 'text/plain' or 'stderr') in the executed notebook."""
    found = []
    for cell in book.cells:
        for output in cell.get("outputs", []):
            if kind == "stderr":
                if output.get("output_type") == "stream" and output.get("name") == "stderr":
                    found.append(output["text"])
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


def execute(path: Path, tmp_path: Path):
    (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    book = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWYML_", "PYTEST_")) or k == "FLOWYML_HOME"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(
        book, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)
    return book


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


def test_there_are_the_three_notebooks() -> None:
    names = [p.name for p in NOTEBOOKS]
    for expected in ("01_getting_started", "02_partitioned_etl", "03_distributed_dashboard"):
        assert any(name.startswith(expected) for name in names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path) -> None:
    book = execute(path, tmp_path)  # raises CellExecutionError naming the cell on any failure
    html = "\n".join(_outputs(book, "text/html"))
    stderr = "".join(_outputs(book, "stderr"))
    assert "Warning" not in stderr, f"{path.name} printed warnings:\n{stderr}"
    assert "flowyml-run" in html, "a PipelineResult displays as its HTML summary"
    assert "<strong>Pipeline " in html, "a Pipeline displays as HTML"
    if path.name.startswith("01"):
        shown = [h for h in _outputs(book, "text/html") if h.startswith("<div><div><strong>Pipeline numbers</strong>")]
        assert len(shown) == 1, "the pipeline displays as HTML"
        assert _graph_nodes(shown[0]) == ["numbers", "split", "totals"], "the pipeline graph is shown"
    if path.name.startswith("02"):
        # The saved report draws the run's timeline: one bar per task of the run saved beside it.
        page = (tmp_path / "reports" / "trips_etl.html").read_text()
        record = json.loads((tmp_path / "reports" / "trips_etl.json").read_text())
        bars = _task_bars(_timeline_svg(page))
        assert sorted(title.splitlines()[0] for title in bars) == sorted(
            escape(task["key"], quote=True) for task in record["tasks"])
        assert len(bars) == len(record["tasks"]) > 0
        # The last run read Parquet split by row group: its output replaced the CSV run's whole.
        import pyarrow.parquet as pq

        files = (REPO / "data" / "trips_parquet").glob("*.parquet")
        groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
        assert len(list((tmp_path / "out" / "notebook" / "enriched").glob("part-*.parquet"))) == groups
    if path.name.startswith("03"):
        assert re.search(r'href="http://127\.0\.0\.1:\d+/status"', html), "the dashboard link is shown"
        assert (tmp_path / "reports" / "cluster.html").is_file()


def _graph_nodes(html: str) -> list[str]:
    """The step names drawn in a displayed pipeline: Graphviz SVG where installed, else Mermaid."""
    if shutil.which("dot"):
        assert html.count("<svg") == 1, html
        return sorted(re.findall(r'<g id="node\d+" class="node">\s*<title>([^<]*)</title>', html))
    assert "<svg" not in html and "<pre>flowchart LR" in html, html
    return sorted(re.findall(r"\[&quot;(.*?)&quot;\]", html))


def _small_pipeline():
    from flowyml import Pipeline, read_csv, step

    @step(inputs=["trips"], outputs=["clean"], per_partition=True)
    def clean(trips):
        return trips

    return Pipeline("shown <here>").add_source("trips", read_csv("data/trips/*.csv")).add_step(clean)


@pytest.mark.skipif(__import__("shutil").which("dot") is None, reason="Graphviz's dot is not installed")
def test_pipeline_displays_as_inline_svg_in_jupyter() -> None:
    html = _small_pipeline()._repr_html_()
    assert "<?xml" not in html and "<!DOCTYPE" not in html  # not valid inside an HTML page
    assert html.count("<svg") == 1 and "</svg>" in html
    assert "Pipeline shown &lt;here&gt;</strong>: 1 step, 1 source" in html


def test_pipeline_displays_as_mermaid_text_without_graphviz(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")
    html = _small_pipeline()._repr_html_()
    assert "<svg" not in html and "<pre>flowchart LR" in html
