"""The render stage's part of the report: why proposals were rejected, and the match band at work.

arXiv 2512.23227 ("Anomaly Detection by Effectively Leveraging Synthetic Images") sets its match-count
thresholds by looking at the distribution of match counts over the generated images. The report shows the
same per iteration and category: the histogram of the band's scores (the share of the source's keypoints
still matched in the render) with the band's calibrated edges, so a reader sees how much of each batch the
band cuts as near copies (right of the upper edge) or broken renders (left of the lower edge).
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
from matplotlib import colormaps

from kka_synth.eval.html import figure_uri, finite_number, img_html, new_figure, table_html

Stats = list[tuple[int, dict[str, Any]]]
"""(iteration, stats.json) of the iterations that have stats."""


def rejection_html(done: Stats) -> str:
    """A stacked bar per iteration of its rejection reasons."""
    reasons = sorted({reason for _, stats in done for reason in stats["rejections"]})
    if not reasons:
        return "<p>No proposal was rejected.</p>"
    figure = new_figure(8.0, 1.2 + 0.4 * len(done))
    axes = figure.add_subplot()
    labels = [f"iteration {k}" for k, _ in done]
    left = np.zeros(len(done))
    for index, reason in enumerate(reasons):
        counts = np.array([float(finite_number(stats["rejections"].get(reason)) or 0.0) for _, stats in done])
        colour = f"C{index}" if len(reasons) <= 10 else colormaps["tab20"](index % 20)
        axes.barh(labels, counts, left=left, color=colour, label=reason)
        left += counts
    axes.invert_yaxis()
    axes.set(xlabel="rejected proposals")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return img_html(figure_uri(figure), "rejection reasons per iteration")


def renderer_html(done: Stats) -> str:
    """One line per iteration: how many renders each renderer made, and how many have no mask."""
    lines = []
    for k, stats in done:
        used = stats.get("renderers")
        if not isinstance(used, dict) or not used:
            continue
        parts = ", ".join(f"{html.escape(str(name))} {int(count)}" for name, count in sorted(used.items()))
        absent = int(finite_number(stats.get("masks_absent")) or 0)
        extra = f"; {absent} without a mask (text-to-image far from every normal)" if absent else ""
        lines.append(f"iteration {k}: {parts}{extra}")
    return "<p>Renders by renderer: " + "<br>".join(lines) + "</p>" if lines else ""


def _distribution(stats: dict[str, Any], category: str) -> dict[str, Any] | None:
    entry = (stats.get("per_category") or {}).get(category) or {}
    found = entry.get("match_scores")
    return found if isinstance(found, dict) and found.get("count") else None


def match_band_html(done: Stats, calibration: dict[str, Any]) -> str:
    """Per category: the band scores' histogram per iteration with the band's edges, and their quantiles."""
    categories = sorted({c for _, stats in done for c in (stats.get("per_category") or {})})
    parts = []
    for category in categories:
        series = [(k, found) for k, stats in done if (found := _distribution(stats, category))]
        if not series:
            continue
        band = calibration.get(category) if isinstance(calibration.get(category), dict) else {}
        figure = new_figure(5.5, 2.6)
        axes = figure.add_subplot()
        for index, (k, found) in enumerate(series):
            edges = np.asarray(found["histogram"]["edges"], dtype=float)
            counts = np.asarray(found["histogram"]["counts"], dtype=float)
            share = counts / max(counts.sum(), 1.0)
            axes.stairs(share, edges, color=f"C{index % 10}", label=f"iteration {k} (n={found['count']})")
        for edge, style in (("low", ":"), ("high", "--")):
            value = finite_number(band.get(edge))
            if value is not None:
                axes.axvline(value, color="k", linestyle=style, linewidth=1, label=f"band {edge} {value:.2f}")
        matcher = band.get("matcher", "sift")
        axes.set(xlabel=f"match ratio ({matcher})", ylabel="share of renders", xlim=(0, 1), title=category)
        axes.legend(fontsize=7)
        rows = [
            [f"{k}", str(found["count"]), str(found.get("nan", 0))]
            + [_fmt(found.get("quantiles", {}).get(q)) for q in ("q05", "q25", "q50", "q75", "q95")]
            for k, found in series
        ]
        table = table_html(["iteration", "renders", "NaN", "5%", "25%", "median", "75%", "95%"], rows)
        parts.append(
            f'<div class="row"><div>{img_html(figure_uri(figure), f"match scores of {category}")}</div>'
            f"<div>{table}</div></div>"
        )
    return "<h3>Match band</h3>" + "".join(parts) if parts else ""


def _fmt(value: Any) -> str:
    number = finite_number(value)
    return "–" if number is None else f"{number:.3f}"
