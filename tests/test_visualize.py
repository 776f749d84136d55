"""Pictures of the step graph: Mermaid text, DOT source, SVG from the real Graphviz."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET

import pytest

from flowyml.exceptions import FlowymlError
from flowyml.visualize import render_svg, to_dot, to_mermaid

NODES = [
    {"name": "trips", "kind": "source", "per_partition": True, "partitions": 8, "status": None},
    {"name": "zones", "kind": "source", "per_partition": False, "partitions": None, "status": None},
    {"name": "clean", "kind": "step", "per_partition": True, "partitions": 8, "status": "succeeded"},
    {"name": "fare-by zone", "kind": "step", "per_partition": False, "partitions": None, "status": "failed"},
    {"name": "end", "kind": "step", "per_partition": False, "partitions": None, "status": "skipped"},
    {"name": "write_parquet", "kind": "sink", "per_partition": True, "partitions": None, "status": None},
]
EDGES = [
    ("trips", "clean", "trips"),
    ("clean", "fare-by zone", "clean"),
    ("zones", "fare-by zone", 'zones "v2"'),
    ("fare-by zone", "end", "fare_by_zone"),
    ("clean", "write_parquet", "clean"),
]


def _mermaid_nodes(text: str) -> dict[str, str]:
    """id -> the node declaration's shape-and-label text."""
    found = {}
    for line in text.splitlines()[1:]:
        match = re.fullmatch(r"    (\w+)(\[.*\]|\(.*\))", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_mermaid_structure():
    text = to_mermaid(NODES, EDGES)
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    nodes = _mermaid_nodes(text)
    assert len(nodes) == len(NODES)
    ids = list(nodes)
    assert all(re.fullmatch(r"n_\w+", node_id, re.ASCII) for node_id in ids)  # sanitised, no keyword 'end'
    assert len(set(ids)) == len(ids)
    by_label = {re.search(r'"(.*)"', shape).group(1): (node_id, shape) for node_id, shape in nodes.items()}
    assert by_label["clean ×8"][1].startswith("[[")  # per-partition step: stacked shape
    assert by_label["trips ×8"][1].startswith("[(")  # source (8 files): cylinder
    assert by_label["write_parquet (per partition)"][1].startswith("[/")  # sink
    assert by_label["fare-by zone"][1] == '["fare-by zone"]'
    edges = [line for line in lines if "-->" in line]
    assert len(edges) == len(EDGES)
    labels = [re.search(r'-->\|"(.*)"\|', edge).group(1) for edge in edges]
    assert labels == ["trips", "clean", "zones #quot;v2#quot;", "fare_by_zone", "clean"]
    clean_id, fare_id = by_label["clean ×8"][0], by_label["fare-by zone"][0]
    assert f"    {clean_id} -->|\"clean\"| {fare_id}" in lines
    # Colour classes: one classDef per status present (else per kind), applied to the right nodes.
    assert f"    class {fare_id} failed" in lines
    assert f"    class {by_label['trips ×8'][0]},{by_label['zones'][0]} source" in lines
    class_defs = [line.split()[1] for line in lines if line.startswith("    classDef ")]
    assert sorted(class_defs) == ["failed", "sink", "skipped", "source", "succeeded"]


def test_mermaid_ids_stay_unique_when_names_sanitise_alike():
    text = to_mermaid([{"name": "a-b"}, {"name": "a.b"}, {"name": "a_b"}], [("a-b", "a.b", "x")])
    ids = list(_mermaid_nodes(text))
    assert len(set(ids)) == 3


def test_dot_quotes_names_and_colours_by_status():
    source = to_dot(NODES, EDGES)
    assert source.startswith('digraph "pipeline" {') and source.rstrip().endswith("}")
    assert '"fare-by zone" -> "end" [label="fare_by_zone"];' in source
    assert '[label="zones \\"v2\\""]' in source
    assert re.search(r'"clean" \[label="clean ×8\\nsucceeded", shape=box3d', source)
    assert re.search(r'"trips" \[[^\]]*shape=cylinder', source)
    failed = re.search(r'"fare-by zone" \[[^\]]*\]', source).group(0)
    assert 'fillcolor="#fde0dd"' in failed


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed (apt-get install graphviz)")
def test_render_svg_with_real_graphviz():
    svg = render_svg(to_dot(NODES, EDGES))
    root = ET.fromstring(svg.encode())
    assert root.tag.endswith("svg")
    ns = {"svg": "http://www.w3.org/2000/svg"}
    node_titles = {g.find("svg:title", ns).text for g in root.iter("{http://www.w3.org/2000/svg}g")
                   if g.get("class") == "node"}
    assert node_titles == {node["name"] for node in NODES}
    edge_count = sum(1 for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "edge")
    assert edge_count == len(EDGES)
    assert "clean ×8" in svg


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed (apt-get install graphviz)")
def test_render_svg_reports_graphviz_syntax_errors():
    with pytest.raises(FlowymlError, match="exit status"):
        render_svg("digraph { a -> }")


def test_missing_graphviz_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(FlowymlError) as info:
        render_svg(to_dot(NODES, EDGES))
    message = str(info.value)
    assert "Graphviz" in message and "apt-get install graphviz" in message
    assert "conda install graphviz" in message and "brew install graphviz" in message
    assert "to_mermaid()" in message
