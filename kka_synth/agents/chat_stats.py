"""The ``run_stats`` tool of `kka-synth chat`: a finished or running run summarised in a few lines.

It reads each iteration's ``stats.json`` (proposals, kept, hard share under the refit evaluator and the
fixed judge, parse failures, retries) and ``candidates.parquet``, and lists the kept candidates with the
highest hardness (KKA, arXiv 2502.14880: hardness > 0 means the Deep SAD evaluator placed the anomaly
among the normals). An image path read from a candidates file is shown only when it stays inside the run
directory (:func:`kka_synth.runs.inside`), so a tampered file cannot point the user elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kka_synth.agents.chat_values import ToolError, first_line
from kka_synth.runs import RunError, inside, read_candidates


def stats_line(stats: dict[str, Any]) -> str:
    """One iteration's ``stats.json`` as a line.

    Raises:
        KeyError: ``stats`` has no ``iteration``.
        ValueError, TypeError: a share or count is not a number.
    """

    def share(value: Any) -> str:
        return "-" if value is None else f"{float(value):.2f}"

    parse = {
        r.removeprefix("parse:"): c
        for r, c in (stats.get("rejections") or {}).items()
        if r.startswith("parse:")
    }
    parse_text = ", ".join(f"{r} {c}" for r, c in sorted(parse.items()))
    # LLM backends ask a failed reply again: how many times, for how many proposals, and why
    retries = f"{int(stats.get('parse_retries') or 0)} retries"
    if stats.get("retried"):
        retries += f" on {int(stats['retried'])} proposals"
    reasons = ", ".join(f"{r} {c}" for r, c in sorted((stats.get("retry_reasons") or {}).items()))
    return (
        f"iteration {stats['iteration']}: {stats.get('proposals', 0)} proposals, "
        f"{stats.get('kept', 0)} kept, "
        f"hard share {share(stats.get('hard_share'))} (fixed judge {share(stats.get('hard_share_judge'))}), "
        f"{stats.get('parse_failures', 0)} parse failures{f' ({parse_text})' if parse_text else ''}, "
        f"{retries}{f' ({reasons})' if reasons else ''}"
    )


def candidate_image(run_dir: Path, k: int, row: dict[str, Any]) -> Path | str:
    """Where candidate ``row`` of iteration ``k`` has its image, or "no image".

    The path is shown as the run directory names it (``run_dir/iterations/<k>/<image>``).

    Raises:
        ToolError: the path the row holds leads outside ``run_dir`` (absolute, ``..`` or a symbolic link).
    """
    if not row.get("image"):
        return "no image"
    relative = Path("iterations", str(k), str(row["image"]))
    try:
        inside(run_dir, relative)
    except RunError as error:
        raise ToolError(f"candidate {row.get('id')} of iteration {k}: {first_line(error)}") from None
    return run_dir / relative


def run_summary(run_dir: Path, top: int) -> str:
    """Per-iteration stats lines, then the ``top`` kept candidates with the highest hardness.

    An unreadable ``stats.json`` gets a line saying so; the other iterations are still listed.

    Args:
        run_dir: the run directory.
        top: how many of the hardest kept candidates to list.

    Raises:
        ToolError: no iteration has stats or candidates yet, or a listed candidate's image path leads
            outside the run directory.
    """
    folder = run_dir / "iterations"
    steps = sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit())
    lines, kept = [], []
    for k in steps:
        stats_path = folder / str(k) / "stats.json"
        if stats_path.is_file():
            try:
                lines.append(stats_line(json.loads(stats_path.read_text())))
            except (ValueError, KeyError, TypeError) as error:
                lines.append(f"iteration {k}: unreadable stats.json ({first_line(error)})")
        if (folder / str(k) / "candidates.parquet").is_file():
            rows = read_candidates(folder / str(k))
            kept += [(r, k) for r in rows if r["label"] in ("hard", "easy") and r.get("hardness") is not None]
    if not lines and not kept:
        raise ToolError(f"run {run_dir.name} has no finished iteration yet")
    kept.sort(key=lambda item: -float(item[0]["hardness"]))
    if kept:
        lines.append(f"hardest {min(top, len(kept))} of {len(kept)} kept candidates:")
    for rank, (row, k) in enumerate(kept[:top], 1):
        text = " ".join(str(row["text"]).split())
        lines.append(
            f"{rank}. hardness {float(row['hardness']):.3f} ({row['label']}), iteration {k}, "
            f"{row['category']}: {text}\n   {candidate_image(run_dir, k, row)}"
        )
    return "\n".join(lines)


__all__ = ["candidate_image", "run_summary", "stats_line"]
