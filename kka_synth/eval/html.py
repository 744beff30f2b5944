"""HTML, PNG and number formatting for the run report: escaped table cells, notes that log a warning,
images and matplotlib figures as base64 PNG data URIs, thumbnails and mask outlines, and the hard-share plot
that the report and the dataset card both draw.

Notes name files relative to the run (from its ``eval`` folder on), never by a machine path.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

THUMB = 128
"""Longest side in pixels of every embedded image."""
OUTLINE = (255, 0, 255)
"""Colour of the mask outline drawn on a sample."""


# formatting --------------------------------------------------------------------------------------------
def read_reason(error: BaseException) -> str:
    """A short reason for a read failure, without the machine path most error messages carry."""
    if isinstance(error, FileNotFoundError):
        return "file missing"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    return first_line(error)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def run_relative(path: Path) -> str:
    """``path`` from the run's ``eval`` folder on, else its name: notes carry no machine paths."""
    parts = path.parts
    if "eval" not in parts:
        return path.name
    return "/".join(parts[len(parts) - 1 - parts[::-1].index("eval") :])


def warn_note(text: str) -> str:
    logger.warning("report: %s", text)
    return text


def note_html(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def notes_html(texts: list[str]) -> str:
    return "".join(note_html(t) for t in dict.fromkeys(texts))


def finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def fmt_cell(value: Any, digits: int = 2) -> str:
    """A number for a table cell: ints as they are, floats with ``digits`` decimals, else a dash."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = finite_number(value)
    return "–" if number is None else f"{number:.{digits}f}"


def table_html(head: list[str] | None, rows: list[list[str]], left: int = 1) -> str:
    """An HTML table of already escaped cells; the first ``left`` columns are left-aligned."""

    def cells(tag: str, values: list[str]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{v}</{tag}>" for i, v in enumerate(values))

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    top = f"<tr>{cells('th', head)}</tr>" if head else ""
    return f"<table>{top}{body}</table>"


def img_html(uri: str, alt: str, size: tuple[int, int] | None = None) -> str:
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{dims}>'


def thumb_html(image: Image.Image, alt: str) -> str:
    """A thumbnail as an ``<img>``, shown with its longest side at :data:`THUMB` (small images scale up)."""
    scale = THUMB / max(image.size)
    shown = (round(image.size[0] * scale), round(image.size[1] * scale))
    return img_html(png_uri(image), alt, shown).replace("<img ", '<img class="thumb" ', 1)


# images and plots --------------------------------------------------------------------------------------
def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_png(figure: Figure) -> bytes:
    """``figure`` drawn on an Agg canvas (no pyplot state) as PNG bytes."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def figure_uri(figure: Figure) -> str:
    return "data:image/png;base64," + base64.b64encode(figure_png(figure)).decode("ascii")


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=90, layout="constrained")


def hard_share_figure(iterations: list[int], stats: list[dict[str, Any]]) -> Figure:
    """The hard share per iteration: overall (thick, black) and per category, refit solid and judge dashed.

    Args:
        iterations: the iteration number of each entry of ``stats``; the x axis.
        stats: one ``stats.json`` dict per iteration, with ``hard_share`` and ``hard_share_judge`` overall
            and per category under ``per_category``. Missing or non-finite values are left out.

    Returns:
        The figure, unrendered; draw it with :func:`figure_png` or :func:`figure_uri`.

    Raises:
        ValueError: ``iterations`` and ``stats`` differ in length.
    """
    if len(iterations) != len(stats):
        raise ValueError(f"hard_share_figure: {len(iterations)} iterations but {len(stats)} stats entries")
    figure = new_figure(7.5, 3.4)
    axes = figure.add_subplot()
    categories = list(dict.fromkeys(c for s in stats for c in (s.get("per_category") or {})))
    series = [("overall", "black", list(stats))]
    series += [
        (name, f"C{i % 10}", [(s.get("per_category") or {}).get(name) or {} for s in stats])
        for i, name in enumerate(categories)
    ]
    for name, colour, entries in series:
        for key, style, label in (("hard_share", "-", "refit"), ("hard_share_judge", "--", "judge")):
            points = [(k, finite_number(e.get(key))) for k, e in zip(iterations, entries, strict=True)]
            points = [(k, v) for k, v in points if v is not None]
            if points:
                axes.plot(
                    *zip(*points, strict=True),
                    style,
                    marker="o",
                    color=colour,
                    linewidth=2.2 if name == "overall" else 1.2,
                    label=f"{name} ({label})",
                )
    axes.set(xlabel="iteration", ylabel="hard share", ylim=(-0.02, 1.02), xticks=iterations)
    axes.grid(alpha=0.3)
    if axes.get_lines():
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def load_thumbnail(path: Path) -> Image.Image:
    """An image file as RGB, shrunk so its longest side is at most :data:`THUMB`; raises on a bad file."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    image.thumbnail((THUMB, THUMB), Image.Resampling.BOX)
    return image


def outlined(image: Image.Image, mask_path: Path) -> Image.Image:
    """``image`` with the outline of the mask at ``mask_path`` (resized to it) drawn in :data:`OUTLINE`."""
    with Image.open(mask_path) as opened:
        mask_image = opened.convert("L").resize(image.size, Image.Resampling.NEAREST)
    mask = np.asarray(mask_image) > 0  # (H, W)
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~inner
    grown = np.pad(edge, 1)  # thicken the edge by one pixel inwards and outwards so it reads at 128 px
    edge = edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
    pixels = np.array(image)  # (H, W, 3)
    pixels[edge] = OUTLINE
    return Image.fromarray(pixels)


READ_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    Image.DecompressionBombError,
)
"""What reading a piece of the run may raise (pyarrow's errors derive from OSError and ValueError)."""


def section_html(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def read_json(path: Path, notes: list[str]) -> Any:
    """The JSON at ``path``, or None with a warning note appended to ``notes``."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        notes.append(warn_note(f"cannot read {run_relative(path)}: {read_reason(error)}"))
        return None
