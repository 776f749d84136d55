"""Run reports: the text summary, a self-contained HTML page, and the notebook view.

Every function here takes the run record that ``PipelineResult.to_dict()``
returns (plain JSON-ready data) and nothing else, so a report can be redrawn
later from a saved ``.json`` file::

    run = json.loads(Path("run.json").read_text())
    save_report(run, "run.html")

- :mod:`~flowyml.report.summary`: the step table, as text and as rows for the HTML views;
- :mod:`~flowyml.report.timeline`: the SVG timeline of every task;
- :mod:`~flowyml.report.page`: the HTML page (its CSS and JavaScript are the
  package data files ``static/report.css`` and ``static/report.js``) and the
  notebook view;
- :mod:`~flowyml.report.formatting`: how numbers, times and text are shown.
"""

from __future__ import annotations

from flowyml.report.page import render_html, save_report, to_html_repr
from flowyml.report.summary import format_summary

__all__ = ["format_summary", "render_html", "save_report", "to_html_repr"]
