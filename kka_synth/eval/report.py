"""A self-contained HTML report of a run: the loop's iterations, samples of what it made, the evaluation.

:func:`write_report` reads whatever a run directory holds at the time it is called (iterations only,
iterations and evaluation, a run cut off half-way) and writes ``report.html`` next to the manifest. A piece
that is missing or unreadable is left out with a short note in the page and a logged warning.

The page is one file that any browser opens without a server: plots are drawn with matplotlib's Agg
canvas (never pyplot's global state) and every plot and image is embedded as a base64 PNG data URI, with
inline CSS and no external links. Thumbnails are at most :data:`THUMB` pixels and the number of samples and
overlays is bounded, so a report stays a few MB. A small inline script counts the images that loaded and
those that failed into ``data-images-loaded`` / ``data-images-broken`` on ``<body>`` and shows a notice
when any failed.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.eval.html import (
    READ_ERRORS,
    figure_uri,
    finite_number,
    fmt_cell,
    hard_share_figure,
    img_html,
    load_thumbnail,
    new_figure,
    note_html,
    notes_html,
    outlined,
    read_json,
    read_reason,
    section_html,
    table_html,
    thumb_html,
    warn_note,
)
from kka_synth.eval.report_eval import evaluation_section
from kka_synth.eval.report_render import match_band_html, rejection_html, renderer_html
from kka_synth.runs import MANIFEST, RunDir, RunError, atomic_write_text, inside, read_candidates

logger = logging.getLogger(__name__)

REPORT = "report.html"
SAMPLES_PER_SIDE = 6
"""Most hardest (and most easiest) kept candidates shown per category."""
SAMPLE_BUDGET = 96
"""Most candidates shown in the sample grid over all categories (fewer per category when there are many)."""
HOW_TO_READ = {
    "Hard share": "the share of kept candidates the evaluator calls hard (close to normal) per iteration; "
    "solid lines are the Deep SAD refit each iteration, dashed ones the fixed judge (fixed goalposts).",
    "Hardness": "hardness of the kept candidates per iteration; right of the dotted line (hardness > 0) "
    "is hard; the axis is logarithmic beyond ±1, so the long easy tail fits.",
    "Rejections": "why proposals were dropped: parse (the text was no valid spec), render (the renderer "
    "failed) or filter (the render changed too little, too much or outside its region); then which "
    "renderer made the renders, and the match band's scores per iteration against its calibrated edges.",
    "Samples": "the hardest and easiest kept candidates of the last iteration that kept any, each as the "
    "image and the image with its mask outlined, with its spec and hardness.",
    "Evaluation": "detectors trained on normal images plus each synthetic variant, tested on the real test "
    "split: mean ± std over seeds, best per column in bold; ROC curves and anomaly maps come from seed "
    "0.",
}

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 7px;text-align:right}th{background:#f2f2f2}
td.l,th.l{text-align:left}.how{color:#555;font-size:14px}
.note{background:#fff4e0;border-left:4px solid #e69500;padding:4px 8px;margin:.4em 0}
#broken-images{display:none;background:#fde2e2;border-left:4px solid #c00;padding:6px 10px}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.card{border:1px solid #ddd;padding:4px;width:264px;font-size:12px}
.card img{margin-right:2px}img.thumb{image-rendering:pixelated}
.cap{font-size:12px;max-width:260px;word-wrap:break-word}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.getElementsByTagName("img"), loaded = 0, broken = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; } else { broken++; }
  }
  document.body.dataset.imagesLoaded = String(loaded);
  document.body.dataset.imagesBroken = String(broken);
  if (broken > 0) {
    var notice = document.getElementById("broken-images");
    notice.textContent = broken + " of " + images.length + " images in this report failed to load.";
    notice.style.display = "block";
  }
});
"""


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    Raises:
        RunError: when ``run_dir`` or its manifest is missing or the manifest is unreadable.
    """
    run_dir = Path(run_dir)
    manifest = RunDir.load(run_dir).manifest
    config = manifest.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise RunError(f"{run_dir / MANIFEST} holds no run config")
    iterations = _load_iterations(run_dir, int(config.get("iterations") or 0))
    sections = [
        _guarded("Run", _header, manifest, iterations),
        _guarded("Hard share", _hard_share_section, iterations),
        _guarded("Hardness", _hardness_section, iterations),
        _guarded("Rejections", _rejection_section, iterations),
        _guarded("Samples", _sample_section, iterations),
        _guarded("Evaluation", evaluation_section, run_dir),
    ]
    title = html.escape(f"kka-synth report: {config.get('name', run_dir.name)}")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n"
        '<div id="broken-images"></div>\n' + "\n".join(sections) + f"\n<script>{_SCRIPT}</script>\n"
        "</body></html>\n"
    )
    path = run_dir / REPORT
    atomic_write_text(path, page)
    logger.info("wrote %s (%.1f kB)", path, len(page) / 1e3)
    return path


def _guarded(title: str, build: Callable[..., str], *args: Any) -> str:
    """One section from ``build(*args)``; a piece of the run malformed in an unforeseen way costs only it."""
    try:
        return build(*args)
    except READ_ERRORS as error:
        logger.warning("report: the %s section failed", title, exc_info=True)
        reason = f"{type(error).__name__}: {read_reason(error)}"
        return section_html(title, note_html(f"this section could not be drawn ({reason})"))


# loading -----------------------------------------------------------------------------------------------
@dataclass
class _Iteration:
    """One iteration's stats and candidate rows as far as they could be read, and what could not be."""

    k: int
    folder: Path
    stats: dict[str, Any] | None = None
    rows: list[dict[str, Any]] | None = None
    notes: dict[str, str] = field(default_factory=dict)


def _load_iterations(run_dir: Path, planned: int) -> list[_Iteration]:
    root = run_dir / "iterations"
    found = (
        {int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()} if root.is_dir() else set()
    )
    out = []
    for k in sorted(found | set(range(1, planned + 1))):
        it = _Iteration(k, root / str(k))
        if k not in found:
            it.notes["stats"] = it.notes["rows"] = f"iteration {k} has not run (no folder)"
        else:
            try:
                it.stats = json.loads((it.folder / "stats.json").read_text())
                if not isinstance(it.stats, dict):
                    it.stats = None
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as error:
                it.notes["stats"] = f"iteration {k}: no readable stats.json ({read_reason(error)})"
            try:
                it.rows = read_candidates(it.folder)
            except READ_ERRORS as error:
                it.notes["rows"] = f"iteration {k}: no readable candidates.parquet ({read_reason(error)})"
        for note in dict.fromkeys(it.notes.values()):
            logger.warning("report: %s", note)
        out.append(it)
    return out


# sections ----------------------------------------------------------------------------------------------
def _categories(manifest: dict[str, Any], iterations: list[_Iteration]) -> list[str]:
    prepared = manifest.get("stages", {}).get("prepare", {}).get("categories")
    if prepared:
        return list(prepared)
    seen: dict[str, None] = {}
    for it in iterations:
        seen.update(dict.fromkeys((it.stats or {}).get("per_category", {}) or {}))
        seen.update(dict.fromkeys(r["category"] for r in it.rows or []))
    return list(seen) or list(manifest["config"]["data"].get("categories") or [])


def _header(manifest: dict[str, Any], iterations: list[_Iteration]) -> str:
    config = manifest["config"]
    data = config["data"]
    curated = manifest.get("stages", {}).get("curate", {})
    counts = curated.get("counts") if curated.get("status") == "done" else None
    facts = [
        ("run", config.get("name", "?")),
        ("dataset", f"{data.get('dataset', '?')} at {data.get('image_size', '?')} px"),
        ("categories", ", ".join(_categories(manifest, iterations)) or "all"),
        ("profile", config.get("profile", "?")),
        (
            "iterations",
            f"{sum(it.stats is not None for it in iterations)} of {config.get('iterations', '?')}",
        ),
        ("mode", config.get("mode", "?")),
        ("created", manifest.get("created", "?")),
        (
            "curated set",
            "none yet"
            if counts is None
            else ", ".join(f"{c}: {n} hard" for c, n in counts.items()) or "empty",
        ),
    ]
    versions = manifest.get("versions", {}) or {}
    rows = [[html.escape(k), html.escape(str(v))] for k, v in facts]
    rows.append(["versions", html.escape(", ".join(f"{k} {v}" for k, v in versions.items()) or "unknown")])
    lines = "".join(
        f"<li><b>{html.escape(t)}</b>: {html.escape(line)}</li>" for t, line in HOW_TO_READ.items()
    )
    how = f"<p>How to read this report:</p><ul class=how>{lines}</ul>"
    title = html.escape(f"kka-synth run {config.get('name', '')}")
    return f"<header><h1>{title}</h1>{table_html(None, rows, left=2)}{how}</header>"


def _hard_share_section(iterations: list[_Iteration]) -> str:
    done = [it for it in iterations if it.stats is not None]
    notes = [it.notes["stats"] for it in iterations if "stats" in it.notes]
    if not done:
        return section_html("Hard share", notes_html([*notes, "no iteration has finished yet"]))
    figure = hard_share_figure([it.k for it in done], [it.stats for it in done])
    head = [
        "iteration", "proposals", "parse fail", "retries", "render fail", "filtered", "kept", "hard share",
        "judge share", "median hardness", "distinct specs", "DPO margin", "seconds",
    ]  # fmt: skip
    rows = []
    for it in done:
        s = it.stats
        dpo = s.get("dpo") or {}
        margin = "–"
        if (
            finite_number(dpo.get("margin_before")) is not None
            or finite_number(dpo.get("margin_after")) is not None
        ):
            margin = f"{fmt_cell(dpo.get('margin_before'))} → {fmt_cell(dpo.get('margin_after'))}"
        elif dpo.get("note"):
            margin = "skipped"
        seconds = [finite_number(v) for v in (s.get("seconds") or {}).values()]
        total = sum(v for v in seconds if v is not None) if seconds else None
        rows.append(
            [str(it.k)]
            + [
                fmt_cell(s.get(key))
                for key in (
                    "proposals",
                    "parse_failures",
                    "parse_retries",
                    "render_failures",
                    "filtered",
                    "kept",
                )
            ]
            + [fmt_cell(s.get(key)) for key in ("hard_share", "hard_share_judge", "median_hardness")]
            + [fmt_cell(s.get("distinct_specs")), margin, fmt_cell(total, 1)]
        )
    skipped = [(it.stats.get("dpo") or {}).get("note") for it in done]
    notes = [*notes, *dict.fromkeys(note for note in skipped if isinstance(note, str))]
    body = (
        notes_html(notes) + img_html(figure_uri(figure), "hard share per iteration") + table_html(head, rows)
    )
    return section_html("Hard share", body)


def _kept(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kept candidates (hard or easy) with a finite hardness."""
    return [
        r for r in rows if r.get("label") in ("hard", "easy") and finite_number(r.get("hardness")) is not None
    ]


def _hardness_section(iterations: list[_Iteration]) -> str:
    notes = [it.notes["rows"] for it in iterations if "rows" in it.notes]
    kept = {it.k: _kept(it.rows) for it in iterations if it.rows is not None}
    values = [r["hardness"] for rows in kept.values() for r in rows]
    if not values:
        return section_html("Hardness", notes_html([*notes, "no kept candidate has a hardness yet"]))
    bins = _symlog_bins(np.asarray(values))
    plots = []
    for k, rows in kept.items():
        if not rows:
            notes.append(f"iteration {k}: no kept candidate with a hardness")
            continue
        figure = new_figure(3.3, 2.3)
        axes = figure.add_subplot()
        groups = [[r["hardness"] for r in rows if r["label"] == label] for label in ("hard", "easy")]
        axes.hist(groups, bins=bins, stacked=True, color=["#d62728", "#1f77b4"], label=["hard", "easy"])
        axes.axvline(0.0, color="k", linestyle=":", linewidth=1)
        axes.set_xscale("symlog", linthresh=1.0)
        axes.set(title=f"iteration {k} ({len(rows)} kept)", xlabel="hardness", ylabel="count")
        axes.title.set_fontsize(9)
        axes.legend(fontsize=7)
        plots.append(img_html(figure_uri(figure), f"hardness histogram, iteration {k}"))
    return section_html("Hardness", notes_html(notes) + f'<div class="row">{"".join(plots)}</div>')


def _symlog_bins(values: np.ndarray, count: int = 24) -> np.ndarray:
    """About ``count`` bin edges even in ``sign(x) * log(1 + |x|)``, with 0 an edge (hard and easy never share
    a bin): hardness is unbounded below, and an easy tail of -300 would squash linear bins near 0."""
    squashed = np.sign(values) * np.log1p(np.abs(values))
    low, high = min(float(squashed.min()), -1.0), max(float(squashed.max()), 1.0)
    width = (high - low) / count
    below = np.linspace(low, 0.0, max(1, math.ceil(-low / width)) + 1)
    above = np.linspace(0.0, high, max(1, math.ceil(high / width)) + 1)[1:]
    edges = np.concatenate([below, above])
    return np.sign(edges) * np.expm1(np.abs(edges))


def _rejection_section(iterations: list[_Iteration]) -> str:
    done = [it for it in iterations if it.stats is not None and isinstance(it.stats.get("rejections"), dict)]
    if not done:
        return section_html("Rejections", note_html("no iteration has rejection counts yet"))
    stats = [(it.k, it.stats) for it in done]
    notes: list[str] = []
    path = done[0].folder.parent.parent / "calibration.json"
    calibration = (read_json(path, notes) if path.is_file() else None) or {}
    body = rejection_html(stats) + renderer_html(stats) + match_band_html(stats, calibration)
    return section_html("Rejections", body + notes_html(notes))


def _sample_section(iterations: list[_Iteration]) -> str:
    notes: list[str] = []
    latest: dict[str, tuple[int, list[dict[str, Any]], Path]] = {}  # category -> its last iteration's kept
    for it in reversed(iterations):
        kept = _kept(it.rows or [])
        for name in dict.fromkeys(r["category"] for r in kept):
            if name not in latest:
                latest[name] = (it.k, [r for r in kept if r["category"] == name], it.folder)
    if not latest:
        return section_html("Samples", note_html("no kept candidates to show yet"))
    per_side = max(1, min(SAMPLES_PER_SIDE, SAMPLE_BUDGET // (2 * len(latest))))
    parts = []
    for name, (k, rows, folder) in sorted(latest.items()):
        ranked = sorted(rows, key=lambda r: r["hardness"], reverse=True)
        n_hard = min(per_side, (len(ranked) + 1) // 2)
        hardest = ranked[:n_hard]
        easiest = ranked[n_hard:][-per_side:][::-1]
        parts.append(f"<h3>{html.escape(name)} (iteration {k}, {len(rows)} kept)</h3>")
        for title, group in (("hardest", hardest), ("easiest", easiest)):
            if group:
                cards = "".join(_sample_card(row, folder, notes) for row in group)
                parts.append(f'<p><b>{title}</b></p><div class="row">{cards}</div>')
    return section_html("Samples", notes_html(notes) + "".join(parts))


def _sample_card(row: dict[str, Any], folder: Path, notes: list[str]) -> str:
    spec = row.get("spec") or {}
    pictures = ""
    try:
        image = load_thumbnail(inside(folder, str(row["image"])))
        pictures = thumb_html(image, str(row["id"]))
        try:
            if row.get("mask") is None:
                pictures += "<p>(no mask: the renderer could not locate the defect)</p>"
            else:
                with_mask = outlined(image, inside(folder, str(row["mask"])))
                pictures += thumb_html(with_mask, f"{row['id']} with its mask outlined")
        except READ_ERRORS as error:
            notes.append(warn_note(f"{row['id']}: mask unreadable ({read_reason(error)})"))
    except READ_ERRORS as error:
        notes.append(warn_note(f"{row['id']}: image unreadable ({read_reason(error)})"))
        pictures = "<p>(image unreadable)</p>"
    words = [spec.get("defect_type", "?"), spec.get("shape", "?"), spec.get("tone", "?")]
    line = " · ".join(str(w) for w in words)
    size = finite_number(spec.get("size"))
    line += f" · size {'–' if size is None else f'{size:.3g}'} · severity {fmt_cell(spec.get('severity'), 1)}"
    judge = fmt_cell(row.get("hardness_judge"))
    return (
        f'<div class="card">{pictures}<div>{html.escape(line)}</div>'
        f"<div><i>{html.escape(str(spec.get('description', '')))}</i></div>"
        f"<div>hardness <b>{fmt_cell(row['hardness'])}</b> ({html.escape(str(row['label']))}), judge {judge}"
        f" · {html.escape(str(row['id']))}</div></div>"
    )


# evaluation --------------------------------------------------------------------------------------------


__all__ = ["REPORT", "write_report"]
