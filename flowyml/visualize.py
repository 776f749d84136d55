"""Pictures of a pipeline's step graph: Mermaid text, Graphviz DOT, and SVG.

Pure functions over a small graph description, so the core decides what a
node is and this module only decides how it looks::

    nodes = [
        {"name": "trips", "kind": "source", "per_partition": True, "partitions": 8, "status": None},
        {"name": "clean", "kind": "step", "per_partition": True, "partitions": 8, "status": "succeeded"},
    ]
    edges = [("trips", "clean", "trips")]     # (producer, consumer, asset name)

- ``kind`` is ``"step"``, ``"source"`` (an input such as ``read_csv``) or ``"sink"``
  (a writer such as ``write_parquet``).
- ``status`` is None before a run, else ``succeeded``/``failed``/``skipped``/``cached``.

``to_mermaid`` needs nothing installed (GitHub, GitLab and JupyterLab render
it); ``render_svg`` runs Graphviz's ``dot`` program, the one optional tool
visualisation needs.

>>> print(to_mermaid([{"name": "load"}, {"name": "clean", "per_partition": True, "partitions": 4}],
...                  [("load", "clean", "raw")]))
flowchart LR
    n_load["load"]
    n_clean[["clean ×4"]]
    n_load -->|"raw"| n_clean
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flowyml.exceptions import FlowymlError

__all__ = ["render_svg", "to_dot", "to_mermaid"]

Node = Mapping[str, Any]
Edge = Sequence[str]

# Fill and border colours per run status; shared by the DOT and Mermaid output
# so a graph and a report read the same way.
STATUS_COLOURS: dict[str, tuple[str, str]] = {
    "succeeded": ("#dff3e4", "#2e8b57"),
    "cached": ("#deebf7", "#3a78b5"),
    "failed": ("#fde0dd", "#c0392b"),
    "skipped": ("#eeeeee", "#8c8c8c"),
}
KIND_COLOURS: dict[str, tuple[str, str]] = {
    "step": ("#ffffff", "#4a5568"),
    "source": ("#fff7e0", "#b7791f"),
    "sink": ("#f3e8fd", "#7b4bb7"),
}


def _node_label(node: Node) -> str:
    """The text shown in a node: its name, and the fan-out of a per-partition or tree step."""
    name = str(node["name"])
    if node.get("split_every"):
        return f"{name} (split_every={node['split_every']})"
    if not node.get("per_partition"):
        return name
    partitions = node.get("partitions")
    return f"{name} ×{partitions}" if partitions is not None else f"{name} (per partition)"


def _colours(node: Node) -> tuple[str, str]:
    """(fill, border): the run status wins over the kind once there is one."""
    status = node.get("status")
    if status in STATUS_COLOURS:
        return STATUS_COLOURS[status]
    return KIND_COLOURS.get(node.get("kind") or "step", KIND_COLOURS["step"])


def _mermaid_ids(names: Iterable[str]) -> dict[str, str]:
    """Map each name to a Mermaid-safe, unique id.

    Mermaid ids allow only word characters and some words (``end``, ``graph``)
    are keywords, so every id gets a ``n_`` prefix and the rest is sanitised;
    two names that sanitise alike (``a-b``, ``a.b``) get a numeric suffix.
    """
    ids: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        if name in ids:
            continue
        base = "n_" + re.sub(r"\W", "_", name, flags=re.ASCII)
        candidate, suffix = base, 2
        while candidate in used:
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        ids[name] = candidate
        used.add(candidate)
    return ids


def _mermaid_text(text: str) -> str:
    """Escape text for a quoted Mermaid label (entity codes, as Mermaid documents)."""
    return (
        text.replace("&", "#amp;")
        .replace('"', "#quot;")
        .replace("<", "#lt;")
        .replace(">", "#gt;")
        .replace("|", "#124;")
    )


# Mermaid shape brackets per node: per-partition steps use the "subroutine"
# shape [[...]] (a box with doubled sides: many copies of one step).
_MERMAID_SHAPES = {
    "source": ('[("', '")]'),  # cylinder: data at rest
    "sink": ('[/"', '"/]'),  # parallelogram: data leaving the pipeline
    "step": ('["', '"]'),
    "partitioned": ('[["', '"]]'),
}


def to_mermaid(nodes: Sequence[Node], edges: Iterable[Edge]) -> str:
    """The graph as a Mermaid ``flowchart LR``.

    Parameters
    ----------
    nodes : list of dict
        ``name`` plus optional ``kind`` (``step``/``source``/``sink``),
        ``per_partition``, ``partitions`` and ``status``.
    edges : iterable of (src, dst, asset)
        One per asset passed from ``src`` to ``dst``; the asset names the edge.

    Returns
    -------
    str
        Mermaid source. Sources are cylinders, sinks parallelograms and
        per-partition steps ``[[name ×N]]``; nodes get a class coloured
        like the DOT output and the HTML report (by status, else by kind).
    """
    edges = [tuple(edge) for edge in edges]
    names = [str(node["name"]) for node in nodes]
    ids = _mermaid_ids(names + [str(n) for edge in edges for n in edge[:2]])
    lines = ["flowchart LR"]
    classes: dict[str, list[str]] = {}
    for node in nodes:
        kind = node.get("kind") or "step"
        shape = "partitioned" if kind == "step" and node.get("per_partition") else kind
        opening, closing = _MERMAID_SHAPES.get(shape, _MERMAID_SHAPES["step"])
        node_id = ids[str(node["name"])]
        lines.append(f"    {node_id}{opening}{_mermaid_text(_node_label(node))}{closing}")
        if node.get("status") in STATUS_COLOURS:
            classes.setdefault(node["status"], []).append(node_id)
        elif kind in ("source", "sink"):
            classes.setdefault(kind, []).append(node_id)
    for src, dst, *asset in edges:
        label = f'|"{_mermaid_text(str(asset[0]))}"|' if asset and asset[0] else ""
        lines.append(f"    {ids[str(src)]} -->{label} {ids[str(dst)]}")
    for class_name, members in classes.items():
        fill, border = STATUS_COLOURS.get(class_name) or KIND_COLOURS[class_name]
        lines.append(f"    classDef {class_name} fill:{fill},stroke:{border},color:#1a202c")
        lines.append(f"    class {','.join(members)} {class_name}")
    return "\n".join(lines)


def _dot_quote(text: str) -> str:
    """A DOT double-quoted string; backslash and quote escaped, newlines kept as ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


_DOT_SHAPES = {"source": "cylinder", "sink": "note", "step": "box"}


def to_dot(nodes: Sequence[Node], edges: Iterable[Edge], *, name: str = "pipeline") -> str:
    """The graph as Graphviz DOT source, left to right.

    Nodes are coloured by run status when they have one, else by kind
    (sources amber, sinks violet, steps white); per-partition steps are drawn
    as stacked boxes (``box3d``) labelled with their partition count; edges
    carry the asset name.

    >>> print(to_dot([{"name": "a"}], []).splitlines()[0])
    digraph "pipeline" {
    """
    lines = [
        f"digraph {_dot_quote(name)} {{",
        "    rankdir=LR;",
        '    graph [fontname="Helvetica", nodesep=0.35, ranksep=0.6, bgcolor="transparent"];',
        '    node [fontname="Helvetica", fontsize=11, style="rounded,filled", penwidth=1.4];',
        '    edge [fontname="Helvetica", fontsize=9, color="#718096", fontcolor="#4a5568"];',
    ]
    for node in nodes:
        kind = node.get("kind") or "step"
        fill, border = _colours(node)
        shape = "box3d" if kind == "step" and node.get("per_partition") else _DOT_SHAPES.get(kind, "box")
        # box3d and cylinder ignore "rounded"; plain "filled" avoids a Graphviz warning.
        style = "rounded,filled" if shape == "box" else "filled"
        label = _node_label(node)
        if node.get("status"):
            label += f"\n{node['status']}"
        lines.append(
            f"    {_dot_quote(str(node['name']))} [label={_dot_quote(label)}, shape={shape}, "
            f'style="{style}", fillcolor="{fill}", color="{border}"];'
        )
    for src, dst, *asset in edges:
        label = f" [label={_dot_quote(str(asset[0]))}]" if asset and asset[0] else ""
        lines.append(f"    {_dot_quote(str(src))} -> {_dot_quote(str(dst))}{label};")
    lines.append("}")
    return "\n".join(lines)


_NO_GRAPHVIZ = (
    "drawing the pipeline as SVG needs Graphviz's 'dot' program, which is not on PATH. "
    "Install Graphviz (apt-get install graphviz, conda install graphviz, or brew install graphviz), "
    "or use to_mermaid() for a picture that needs nothing installed."
)


def render_svg(dot_source: str, *, timeout: float = 30.0) -> str:
    """Run Graphviz ``dot -Tsvg`` on ``dot_source`` and return the SVG text.

    Raises
    ------
    FlowymlError
        ``dot`` is not installed (the message says how to install it, or to
        use ``to_mermaid()``), it rejected the source, or it ran longer than
        ``timeout`` seconds.
    """
    dot = shutil.which("dot")
    if dot is None:
        raise FlowymlError(_NO_GRAPHVIZ)
    try:
        completed = subprocess.run(
            [dot, "-Tsvg"],
            input=dot_source.encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FlowymlError(
            f"Graphviz 'dot' ({dot}) took longer than {timeout:g}s to draw the pipeline; "
            "pass a larger timeout to render_svg() or use to_mermaid()"
        ) from exc
    except OSError as exc:  # found on PATH but not runnable (permissions, broken install)
        raise FlowymlError(f"could not run Graphviz 'dot' ({dot}): {exc}. {_NO_GRAPHVIZ}") from exc
    if completed.returncode != 0:
        detail = completed.stderr.decode("utf-8", "replace").strip()
        raise FlowymlError(
            f"Graphviz 'dot' ({dot}) failed with exit status {completed.returncode}: {detail}"
        )
    return completed.stdout.decode("utf-8")
