"""The nouns of kka-synth: plain dataclasses that flow between stages.

No heavy imports here. At module boundaries images are RGB ``uint8`` arrays of shape (H, W, 3) and masks
are ``bool`` arrays of shape (H, W); torch tensors stay inside models.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("scratch", "crack", "blob", "spot", "hole", "stain", "missing")
"""Defect shapes every renderer understands."""

TONES = ("darker", "brighter", "colour")
"""How the defect's pixels differ from their surroundings."""

REGIONS: dict[str, tuple[float, float, float, float]] = {
    "anywhere": (0.0, 0.0, 1.0, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75),
    "top": (0.0, 0.0, 1.0, 0.4),
    "bottom": (0.0, 0.6, 1.0, 1.0),
    "left": (0.0, 0.0, 0.4, 1.0),
    "right": (0.6, 0.0, 1.0, 1.0),
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0),
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
}
"""Named regions a proposer may write instead of a box, as normalised (x0, y0, x1, y1) on the object."""

SIZE_RANGE = (0.0005, 0.5)
"""Allowed share of the object's area a defect may cover."""

SPEC_FIELDS = ("defect_type", "description", "region", "size", "shape", "tone", "severity")
"""The keys a proposer writes, in the order the compact proposer writes them."""


class SpecError(ValueError):
    """A proposer's text is not a valid :class:`DefectSpec`.

    ``reason`` is a short stable code (counted in iteration stats); the message says what was wrong.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def _number(data: dict[str, Any], key: str, reason: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpecError(reason, f"{key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise SpecError(reason, f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SpecError(reason, f"{key} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class DefectSpec:
    """A structured description of one defect to render."""

    category: str
    defect_type: str
    description: str
    region: tuple[float, float, float, float]
    """Normalised box (x0, y0, x1, y1) on the object's bounding box where the defect sits."""
    size: float
    """Share of the object's area the defect covers."""
    shape: str
    tone: str
    severity: float
    """0 is barely visible, 1 is obvious."""

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.region
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise SpecError("bad_region", f"region {self.region} is not a box inside [0, 1]")
        if not SIZE_RANGE[0] <= self.size <= SIZE_RANGE[1]:
            raise SpecError("bad_size", f"size {self.size} is outside {SIZE_RANGE}")
        if self.shape not in SHAPES:
            raise SpecError("bad_shape", f"shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        if self.tone not in TONES:
            raise SpecError("bad_tone", f"tone {self.tone!r} is not one of {', '.join(TONES)}")
        if not 0.0 <= self.severity <= 1.0:
            raise SpecError("bad_severity", f"severity {self.severity} is outside [0, 1]")
        if not self.defect_type.strip():
            raise SpecError("missing_field", "defect_type is empty")

    @classmethod
    def from_text(cls, text: str, category: str, defect_types: list[str] | None = None) -> DefectSpec:
        """Parse what a proposer wrote: one JSON object with the keys of :data:`SPEC_FIELDS`.

        ``region`` may be a name from :data:`REGIONS` or a box of four numbers. When ``defect_types`` is
        given, the type must be one of them. Raises :class:`SpecError` with the reason on any failure.
        """
        text = text.strip()
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            match = _JSON_OBJECT.search(text)
            if match is None:
                raise SpecError("not_json", "no JSON object in the reply") from None
            try:
                data = json.loads(match.group(0))
            except json.JSONDecodeError as error:
                raise SpecError("not_json", f"invalid JSON ({error.msg} at char {error.pos})") from None
            except (ValueError, RecursionError) as error:
                raise SpecError("not_json", f"unreadable JSON ({type(error).__name__})") from None
        if not isinstance(data, dict):
            raise SpecError("not_json", f"expected a JSON object, got {type(data).__name__}")
        missing = [key for key in SPEC_FIELDS if key not in data]
        if missing:
            raise SpecError("missing_field", f"missing {', '.join(missing)}")
        defect_type = data["defect_type"]
        if not isinstance(defect_type, str):
            raise SpecError("missing_field", f"defect_type must be a string, got {defect_type!r}")
        if defect_types is not None and defect_type not in defect_types:
            raise SpecError("unknown_type", f"defect type {defect_type!r} is not known for {category!r}")
        region = data["region"]
        if isinstance(region, str):
            if region not in REGIONS:
                raise SpecError("bad_region", f"unknown region {region!r}")
            box = REGIONS[region]
        elif isinstance(region, (list, tuple)) and len(region) == 4:
            try:
                box = tuple(float(v) for v in region)
            except (TypeError, ValueError):
                raise SpecError("bad_region", f"region {region!r} is not four numbers") from None
        else:
            raise SpecError("bad_region", f"region must be a name or four numbers, got {region!r}")
        for key in ("shape", "tone", "description"):
            if not isinstance(data[key], str):
                raise SpecError(
                    f"bad_{key}" if key != "description" else "missing_field",
                    f"{key} must be a string, got {data[key]!r}",
                )
        return cls(
            category=category,
            defect_type=defect_type,
            description=data["description"].strip(),
            region=box,  # type: ignore[arg-type]
            size=_number(data, "size", "bad_size"),
            shape=data["shape"],
            tone=data["tone"],
            severity=_number(data, "severity", "bad_severity"),
        )

    def region_name(self) -> str | None:
        """The name of :data:`REGIONS` whose box equals this spec's region, if any."""
        for name, box in REGIONS.items():
            if np.allclose(box, self.region):
                return name
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["region"] = [round(v, 4) for v in self.region]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DefectSpec:
        return cls(**{**data, "region": tuple(data["region"])})

    def prompt(self) -> str:
        """The text handed to a diffusion model."""
        strength = (
            "subtle" if self.severity < 0.35 else "clearly visible" if self.severity > 0.7 else "visible"
        )
        tone = {"darker": "dark", "brighter": "bright", "colour": "discoloured"}[self.tone]
        where = self.region_name() or "marked"
        text = (
            f"a {strength} {tone} {self.shape} ({self.defect_type}) in the {where} area of a {self.category}"
        )
        if self.description:
            text += f", {self.description}"
        return text


@dataclass
class Proposal:
    """One completion of a proposer: the prompt it saw, the raw text it wrote, and the parse result."""

    prompt: str
    text: str
    spec: DefectSpec | None = None
    error: str | None = None
    """The :class:`SpecError` reason code when the text did not parse."""
    retries: list[str] = field(default_factory=list)
    """Reason codes of earlier replies to the same request that failed and were asked again (chat backends
    feed the parser's error back); ``text`` is the last reply."""

    @property
    def attempts(self) -> int:
        """Replies it took: 1 plus the retries."""
        return 1 + len(self.retries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "spec": None if self.spec is None else self.spec.to_dict(),
            "error": self.error,
            "retries": list(self.retries),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Proposal:
        spec = data.get("spec")
        return cls(
            prompt=data["prompt"],
            text=data["text"],
            spec=None if spec is None else DefectSpec.from_dict(spec),
            error=data.get("error"),
            retries=list(data.get("retries") or []),
        )


@dataclass(frozen=True)
class Verdict:
    """A filter's decision on one candidate."""

    ok: bool
    score: float
    reason: str = ""


LABELS = ("pending", "hard", "easy", "rejected")


@dataclass
class Candidate:
    """A rendered defect: the image, its mask, and what the filters and the evaluator said of it."""

    id: str
    iteration: int
    proposal: Proposal
    source_id: str
    image: np.ndarray | None
    """RGB uint8 (H, W, 3); None when loaded without pixels."""
    mask: np.ndarray | None
    """bool (H, W); None when loaded without pixels."""
    renderer: str
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    hardness: float | None = None
    label: str = "pending"
    reason: str = ""
    """Why it was rejected (parse, render or filter reason)."""

    @property
    def kept(self) -> bool:
        return self.label in ("pending", "hard", "easy")


@dataclass(frozen=True)
class PreferencePair:
    """One DPO example in TRL's column names."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class DetectorOutput:
    """A detector's prediction (anomalib's field names)."""

    pred_score: np.ndarray
    """(N,) float32 image anomaly scores; higher means more anomalous."""
    anomaly_map: np.ndarray
    """(N, H, W) float32 pixel anomaly scores."""


@dataclass
class SyntheticStage:
    """One stage of a detector's training schedule: the synthetic anomalies it trains on, and for how long.

    A stage either holds a fixed set of ``anomalies`` (a run's curated set) or a ``draw`` function that puts a
    fresh rule-based anomaly on a normal image at every use (DRAEM's on-the-fly Perlin defects).
    """

    name: str
    """What the stage trains on, e.g. "rule" or "kka"; shown in logs and metrics."""
    anomalies: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = field(default_factory=list)
    """Fixed anomalies as (image RGB uint8 (H, W, 3), mask bool (H, W), clean source image or None)."""
    draw: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]] | None = None
    """``draw(normal, rng) -> (image, mask)``: a fresh anomaly on a normal image; used when ``anomalies`` is
    empty."""
    share: float = 1.0
    """Share of the detector's training steps spent in this stage, in (0, 1]."""

    def __post_init__(self) -> None:
        if not self.anomalies and self.draw is None:
            raise ValueError(f"synthetic stage {self.name!r} has neither anomalies nor a draw function")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"synthetic stage {self.name!r}: share must be in (0, 1], got {self.share}")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split."""

    image_path: Path
    category: str
    split: str
    """"train" or "test" (or "validation" where a layout has one)."""
    label: int
    """0 normal, 1 anomalous."""
    defect_type: str
    """"good" for normal images."""
    mask_path: Path | None = None
