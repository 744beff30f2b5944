"""The evaluation's part of the report: metrics tables, detector notes, ROC curves and anomaly-map overlays.

It reads ``metrics.json`` and the seed-0 ``result.json`` of every detector and variant that
``kka-synth eval`` wrote (see :mod:`kka_synth.eval.protocol`); a piece that is missing or unreadable is left
out with a note.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from kka_synth.eval.html import (
    READ_ERRORS,
    figure_uri,
    finite_number,
    fmt_cell,
    img_html,
    load_thumbnail,
    new_figure,
    note_html,
    notes_html,
    read_json,
    read_reason,
    run_relative,
    section_html,
    table_html,
    thumb_html,
    warn_note,
)

OVERLAY_BUDGET = 12
"""Most anomaly-map overlays shown per category, shared by its detectors and variants."""
METRICS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_f1_max", "image F1-max"),
    ("pixel_f1_max", "pixel F1-max"),
    ("spro", "sPRO"),
)
LOCO_COLUMNS = (("logical_auroc", "logical AUROC"), ("structural_auroc", "structural AUROC"))


def evaluation_section(run_dir: Path) -> str:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return section_html("Evaluation", note_html(f"no evaluation yet: run `kka-synth eval {run_dir}`"))
    notes: list[str] = []
    metrics = read_json(path, notes)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("categories"), dict):
        if metrics is not None:
            notes.append(warn_note("metrics.json has no 'categories' mapping"))
        return section_html("Evaluation", notes_html(notes))
    seeds = metrics.get("seeds") or [0]
    parts = [
        f"<p>dataset {html.escape(str(metrics.get('dataset', '?')))}, "
        f"{fmt_cell(metrics.get('image_size'))} px, "
        f"seeds {html.escape(', '.join(str(s) for s in seeds))}</p>"
    ]
    for category, detectors in metrics["categories"].items():
        parts.append(f"<h3>{html.escape(str(category))}</h3>")
        if not isinstance(detectors, dict):
            notes.append(warn_note(f"metrics.json: category {category} is not a mapping"))
            continue
        parts.append(_metrics_table(detectors))
        notes_at = len(parts)
        results = {}
        for detector, variants in detectors.items():
            for variant in variants if isinstance(variants, dict) else {}:
                result_path = (
                    run_dir / "eval" / category / detector / variant / f"seed{seeds[0]}" / "result.json"
                )
                result = read_json(result_path, notes)
                if isinstance(result, dict):
                    results[(detector, variant)] = (result, result_path.parent)
        parts.insert(notes_at, _detector_notes(results))
        parts.append(_roc_plots(category, results, notes))
        parts.append(_overlays(results, notes))
    return section_html("Evaluation", "".join(parts) + notes_html(notes))


def _metrics_table(detectors: dict[str, Any]) -> str:
    rows: list[tuple[str, str, dict[str, Any]]] = [
        (det, var, entry)
        for det, variants in detectors.items()
        if isinstance(variants, dict)
        for var, entry in variants.items()
        if isinstance(entry, dict)
    ]
    # MVTec LOCO's logical and structural AUROC only where some result has them
    shown = [
        (key, label)
        for key, label in METRICS + LOCO_COLUMNS
        if (key, label) in METRICS or any((e.get("mean") or {}).get(key) is not None for _, _, e in rows)
    ]
    best = {}
    for key, _ in shown:
        means = [finite_number((entry.get("mean") or {}).get(key)) for _, _, entry in rows]
        present = [m for m in means if m is not None]
        best[key] = max(present) if present else None
    head = ["detector", "variant", *(label for _, label in shown), "seeds", "train s"]
    body = []
    for detector, variant, entry in rows:
        cells = [html.escape(detector), html.escape(variant)]
        for key, _ in shown:
            mean = finite_number((entry.get("mean") or {}).get(key))
            std = finite_number((entry.get("std") or {}).get(key))
            text = _metric_cell(mean, None if entry.get("n") == 1 else std)  # one seed has no spread
            if mean is not None and best[key] is not None and math.isclose(mean, best[key], abs_tol=1e-12):
                text = f"<b>{text}</b>"
            cells.append(text)
        cells += [fmt_cell(entry.get("n")), fmt_cell(entry.get("train_seconds"), 1)]
        body.append(cells)
    return table_html(head, body, left=2)


def _detector_notes(results: dict[tuple[str, str], tuple[dict, Path]]) -> str:
    """What detectors said about themselves in result.json ``notes`` (e.g. random backbone weights), once per
    detector and note, naming the variants when a note holds for only some of them."""
    variants: dict[str, list[str]] = {}
    by_note: dict[tuple[str, str], list[str]] = {}
    for (detector, variant), (result, _) in results.items():
        variants.setdefault(detector, []).append(variant)
        notes = result.get("notes")
        for note in notes if isinstance(notes, list) else []:
            by_note.setdefault((detector, str(note)), []).append(variant)
    lines = []
    for (detector, note), where in by_note.items():
        scope = detector if len(where) == len(variants[detector]) else f"{detector} ({', '.join(where)})"
        lines.append(f"{scope}: {note}")
    return notes_html(lines)


def _metric_cell(mean: float | None, std: float | None) -> str:
    """``mean ± std`` with three decimals; the mean alone without a std; a dash without a mean."""
    if mean is None:
        return "–"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _curve(result: dict[str, Any], name: str) -> tuple[list[float], list[float]] | None:
    curve = (result.get("curves") or {}).get(name)
    if not isinstance(curve, dict):
        return None
    fpr, tpr = curve.get("fpr"), curve.get("tpr")
    if not isinstance(fpr, list) or not isinstance(tpr, list) or len(fpr) != len(tpr) or len(fpr) < 2:
        raise ValueError(f"{name} needs fpr and tpr lists of one length (at least 2)")
    if any(finite_number(v) is None or not 0.0 <= v <= 1.0 for v in fpr + tpr):
        raise ValueError(f"{name} holds values that are no rates in [0, 1]")
    return fpr, tpr


def _roc_plots(category: str, results: dict[tuple[str, str], tuple[dict, Path]], notes: list[str]) -> str:
    images = []
    for detector in dict.fromkeys(det for det, _ in results):
        curves: dict[str, list[tuple[str, list[float], list[float]]]] = {"image_roc": [], "pixel_roc": []}
        for (det, variant), (result, folder) in results.items():
            if det != detector:
                continue
            for name in curves:
                try:
                    points = _curve(result, name)
                except ValueError as error:
                    notes.append(warn_note(f"{run_relative(folder)}: {error}"))
                    continue
                if points is not None:
                    curves[name].append((variant, *points))
        panels = [(name, lines) for name, lines in curves.items() if lines]
        if not panels:
            continue
        figure = new_figure(3.6 * len(panels), 3.2)
        for index, (name, lines) in enumerate(panels, start=1):
            axes = figure.add_subplot(1, len(panels), index)
            for variant, fpr, tpr in lines:
                axes.plot(fpr, tpr, linewidth=1.4, label=variant)
            axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            level = name.split("_")[0]
            axes.set(
                title=f"{detector}: {level} ROC", xlabel="false positive rate", ylabel="true positive rate"
            )
            axes.set(xlim=(0, 1), ylim=(0, 1.01))
            axes.title.set_fontsize(9)
            axes.legend(fontsize=7, loc="lower right")
        images.append(img_html(figure_uri(figure), f"{category} {detector} ROC curves"))
    return f'<div class="row">{"".join(images)}</div>' if images else ""


def _overlays(results: dict[tuple[str, str], tuple[dict, Path]], notes: list[str]) -> str:
    if not results:
        return ""
    per_result = max(1, OVERLAY_BUDGET // len(results))
    cards = []
    for (detector, variant), (result, folder) in results.items():
        overlays = result.get("overlays") or []
        for entry in overlays[:per_result]:
            try:
                image = load_thumbnail(folder / str(entry["file"]))
            except READ_ERRORS as error:
                notes.append(warn_note(f"{run_relative(folder)}: overlay unreadable ({read_reason(error)})"))
                continue
            label = "anomalous" if entry.get("label") == 1 else "good" if entry.get("label") == 0 else "?"
            score = fmt_cell(entry.get("score"), 3)
            caption = f"{detector} / {variant}: {entry.get('image', '?')} ({label}), score {score}"
            picture = thumb_html(image, caption)
            cards.append(f'<div class="cap">{picture}<br>{html.escape(caption)}</div>')
    return f"<h4>Anomaly maps</h4><div class='row'>{''.join(cards)}</div>" if cards else ""


__all__ = ["LOCO_COLUMNS", "METRICS", "evaluation_section"]
