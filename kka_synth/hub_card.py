"""The dataset card (README.md) of a published run, and its hard-share plot.

The card says first that the defects are synthetic, then how they were made (the KKA loop, "Improving
Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880, with the
match-count filter of arXiv 2512.23227), the columns, the hard share per iteration as a table and as a PNG
(uploaded as :data:`PLOT_PATH`), the run's provenance with its full config, and the licence of the source
images, which the renders inherit. Its prose is the ``dataset_card`` template in ``prompts/templates.yaml``.

The YAML metadata merges into the card ``datasets.DatasetDict.push_to_hub`` writes: its ``dataset_info``
and ``configs`` stay as they are, and the licence, task categories, tags and name are added. Absolute local
paths in the config (data roots, local model folders) are shown by their last component only.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import yaml

from kka_synth.eval.html import figure_png, finite_number, hard_share_figure
from kka_synth.prompts.templates import render_prompt
from kka_synth.runs import RunDir

PLOT_PATH = "assets/hard_share.png"
"""Where the hard-share plot goes in the dataset repository."""
TAGS = ["synthetic", "anomaly-detection", "kka-synth"]

SOURCE_LICENSES: dict[str, tuple[str | None, str, str]] = {
    "demo": (
        "cc0-1.0",
        "kka-synth's built-in demo dataset",
        'Its brick images are crops of scikit-image\'s photograph of CC0Textures "Bricks25" (CC0 1.0), and '
        "its washer images are drawn procedurally by kka-synth's demo generator.",
    ),
    "mvtec_ad": (
        "cc-by-nc-sa-4.0",
        "MVTec AD (Bergmann et al., CVPR 2019)",
        "MVTec AD is licensed CC BY-NC-SA 4.0: attribution, non-commercial use only, share alike.",
    ),
    "mvtec_loco": (
        "cc-by-nc-sa-4.0",
        "MVTec LOCO AD (Bergmann et al., IJCV 2022)",
        "MVTec LOCO AD is licensed CC BY-NC-SA 4.0: attribution, non-commercial use only, share alike.",
    ),
    "visa": ("cc-by-4.0", "VisA (Zou et al., ECCV 2022)", "VisA is licensed CC BY 4.0: attribution."),
    "folder": (
        None,
        "a folder of the publisher's own images",
        "kka-synth cannot know the licence of a folder of images.",
    ),
}
"""Dataset name -> (Hub licence id of its images or None when unknown, its name, its licence in words)."""

_DIFFUSION = ("inpaint", "edit", "text2img")
_RENDERER_WORDS = {
    "procedural": "procedural (spec-driven strokes, blobs, cracks and stains; no model)",
    "perlin": "perlin (DRAEM-style Perlin-noise texture blending; no model)",
    "inpaint": "inpaint (diffusion inpainting at the spec's region)",
    "edit": "edit (instruction editing)",
    "text2img": "text2img (text-to-image)",
}


def resolve_license(dataset: str, license: str | None, renderers: list[str] | None = None) -> tuple[str, str]:
    """The card's licence id and licence paragraph, for a run on ``dataset`` and the publisher's ``license``.

    A dataset whose licence is unknown (a folder) publishes as ``other`` without ``license``, and the card
    says so. ``renderers`` adds a note when the perlin renderer pasted scikit-image's CC0 textures.
    """
    known, name, words = SOURCE_LICENSES.get(dataset, (None, f"the {dataset} dataset", ""))
    chosen = license or known or "other"
    lines = [f"The normal images come from {name}.", words]
    if known is None and license is None:
        lines.append(
            "This card therefore says `license: other`: the publisher should state the source images' terms "
            "here, or publish again with a licence (`kka-synth publish --license`)."
        )
    elif known is not None and license is not None and license != known:
        lines.append(f"The publisher set the licence to `{license}`; the source images' own is `{known}`.")
    else:
        lines.append(f"This dataset is published under `{chosen}`.")
    if dataset != "demo" and known is not None:
        lines.append(
            "If the images the run read are not the official dataset of that name, their own terms apply."
        )
    if renderers and "perlin" in renderers:
        lines.append("The perlin renderer blends in crops of scikit-image's CC0 1.0 textures.")
    lines.append("The renders are derived from the source images and inherit their licence terms.")
    return chosen, " ".join(line for line in lines if line)


def iteration_stats(run: RunDir) -> list[dict[str, Any]]:
    """Each finished iteration's ``stats.json``, in order (unreadable or missing ones are left out)."""
    root = run.path / "iterations"
    found = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    out = []
    for k in found:
        path = root / str(k) / "stats.json"
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(stats, dict):
            out.append({**stats, "iteration": k})
    return out


def _share(value: Any) -> str:
    number = finite_number(value)
    return "–" if number is None else f"{number:.2f}"


def hard_share_table(stats: list[dict[str, Any]]) -> str:
    """A Markdown table of the hard share per iteration: overall (refit and judge) and per category."""
    if not stats:
        return "No iteration has finished."
    categories = list(dict.fromkeys(c for s in stats for c in (s.get("per_category") or {})))
    head = ["iteration", "kept", "hard", "hard share (refit)", "hard share (judge)"]
    head += [f"{name} (refit / judge)" for name in categories]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        cells = [str(s["iteration"]), str(s.get("kept", "–")), str(s.get("hard", "–"))]
        cells += [_share(s.get("hard_share")), _share(s.get("hard_share_judge"))]
        for name in categories:
            one = (s.get("per_category") or {}).get(name) or {}
            cells.append(f"{_share(one.get('hard_share'))} / {_share(one.get('hard_share_judge'))}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hard_share_png(stats: list[dict[str, Any]]) -> bytes:
    """The hard share per iteration as a PNG: overall and per category, refit solid and judge dashed."""
    return figure_png(hard_share_figure([s["iteration"] for s in stats], stats))


def public_value(value: Any) -> Any:
    """``value`` with every absolute local path (a string) cut to ``<local>/<last component>``."""
    if isinstance(value, dict):
        return {key: public_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(item) for item in value]
    if isinstance(value, str) and (value.startswith(("/", "~", "\\\\")) or Path(value).is_absolute()):
        return f"<local>/{Path(value).name}"
    return value


def _model_words(config: dict[str, Any]) -> dict[str, str]:
    proposer = config["proposer"]
    if proposer["backend"] == "compact":
        steps = proposer["pretrain_steps"]
        model = f"compact causal LM pretrained from scratch on the knowledge corpus ({steps} steps)"
    else:
        model = f"{proposer['backend']}: {public_value(proposer['model'])}"
    render = config["render"]
    renderers = []
    for i, name in enumerate(render["renderers"]):
        words = _RENDERER_WORDS.get(name, name)
        if name in _DIFFUSION:
            settings = render[name]
            words += f", model {public_value(settings['model'])}, {settings['steps']} steps"
        if render.get("weights"):
            words += f", weight {render['weights'][i]}"
        renderers.append(words)
    filters = config["filters"]
    matcher = "off"
    if filters["match_band"]:
        matcher = (
            "OpenCV SIFT"
            if filters["matcher"] == "sift"
            else f"LightGlue ({public_value(filters['matcher_model'])})"
        )
        matcher += f", band quantiles {list(filters['band_quantiles'])}"
    evaluator = config["evaluator"]
    return {
        "proposer": model,
        "renderers": "; ".join(renderers),
        "matcher": matcher,
        "evaluator": (
            f"{evaluator['name']} at {evaluator['size']} px, {evaluator['folds']}-fold cross-fitted, refit "
            f"each iteration; hard = scoring below the {evaluator['hard_quantile']} quantile of held-out "
            "normals"
        ),
    }


def provenance(run: RunDir, stats: list[dict[str, Any]]) -> str:
    """A Markdown list of what made the run: versions, data, models, seeds."""
    manifest = run.manifest
    config = manifest["config"]
    versions = manifest.get("versions") or {}
    version = versions.get("kka-synth") or _installed_version()
    data = config["data"]
    words = _model_words(config)
    alignment = config["alignment"]
    dpo = "off (no-DPO control)"
    if alignment["enabled"]:
        dpo = (
            f"TRL DPO with a PEFT LoRA adapter (r={alignment['lora'].get('r')}), "
            f"learning rate {alignment['dpo'].get('learning_rate')}, beta {alignment['dpo'].get('beta')}"
        )
    seeds = manifest.get("seeds") or {"run": config.get("seed")}
    items = [
        ("kka-synth", version),
        ("run", f"{config['name']}, created {manifest.get('created', '?')}"),
        ("iterations", f"{len(stats)} finished of {config['iterations']}; curation mode {config['mode']}"),
        (
            "dataset",
            f"{data['dataset']}, categories {', '.join(data['categories']) or 'all'}, "
            f"{data['image_size']} px",
        ),
        ("profile", config["profile"]),
        ("proposer", words["proposer"]),
        ("renderers", words["renderers"]),
        ("matcher", words["matcher"]),
        ("locality filter", "on" if config["filters"]["locality"] else "off"),
        ("evaluator", words["evaluator"]),
        ("fixed judge", "Deep SAD trained once on normals and Perlin anomalies, never refit"),
        ("alignment", dpo),
        ("seeds", ", ".join(f"{key} {value}" for key, value in seeds.items())),
        ("package versions", ", ".join(f"{key} {value}" for key, value in versions.items()) or "unknown"),
    ]
    return "\n".join(f"- **{key}**: {value}" for key, value in items)


def _installed_version() -> str:
    try:
        return importlib.metadata.version("kka-synth")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def size_category(rows: int) -> str:
    """The Hub's size bucket for ``rows`` examples."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if rows < limit:
            return name
    return "100K<n<1M" if rows < 1_000_000 else "1M<n<10M"


def build_card(
    run: RunDir,
    rows: dict[str, int],
    *,
    repo_id: str,
    include: str = "curated",
    split_by: str = "category",
    license: str | None = None,
    has_masks: bool = True,
    base: str | None = None,
) -> str:
    """The README.md of ``run`` published as ``repo_id``, with YAML metadata.

    Args:
        run: the run directory.
        rows: rows per split.
        repo_id: the dataset repository (for the loading snippet).
        include: "curated" (the curated hard set) or "all" (every kept candidate).
        split_by: "category" or "iteration".
        license: the publisher's licence id; None takes the source dataset's.
        has_masks: whether any row has a mask (adds the image-segmentation task).
        base: the card ``push_to_hub`` wrote; its metadata is kept and ours added, its text replaced.
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    config = run.manifest["config"]
    dataset = config["data"]["dataset"]
    stats = iteration_stats(run)
    license_id, license_words = resolve_license(dataset, license, config["render"]["renderers"])
    pretty_name = f"kka-synth {config['name']}: synthetic defects on {dataset}"
    tasks = ["image-classification", *(["image-segmentation"] if has_masks else [])]
    ours = {
        "license": license_id,
        "pretty_name": pretty_name,
        "task_categories": tasks,
        "tags": TAGS,
        "size_categories": size_category(sum(rows.values())),
        "annotations_creators": ["machine-generated"],
    }
    theirs = DatasetCard(base).data.to_dict() if base else {}
    data = DatasetCardData(**{**ours, **{k: v for k, v in theirs.items() if k not in ours}})
    if include == "curated":
        which = "every iteration" if config["mode"] == "add" else "the last iteration"
        selection = (
            f"The rows are the run's curated set (KKA's `{config['mode']}` mode): the renders of {which} "
            "that the evaluator called hard, so `hard` is true throughout."
        )
    else:
        selection = (
            "The rows are every render the filters kept, hard and easy alike; the `hard` column says which."
        )
    split_table = "\n".join(f"| {name} | {count} |" for name, count in rows.items())
    body = render_prompt(
        "dataset_card",
        pretty_name=pretty_name,
        source=SOURCE_LICENSES.get(dataset, (None, f"the {dataset} dataset", ""))[1],
        version=run.manifest.get("versions", {}).get("kka-synth") or _installed_version(),
        selection=selection,
        split_by=split_by,
        split_table=split_table,
        plot=PLOT_PATH,
        hard_share_table=hard_share_table(stats),
        provenance=provenance(run, stats),
        config=yaml.safe_dump(public_value(config), sort_keys=False).rstrip(),
        license=license_words,
        repo_id=repo_id,
    )
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"))


__all__ = [
    "PLOT_PATH",
    "SOURCE_LICENSES",
    "build_card",
    "hard_share_png",
    "hard_share_table",
    "iteration_stats",
    "provenance",
    "public_value",
    "resolve_license",
]
