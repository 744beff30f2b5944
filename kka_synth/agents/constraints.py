"""User constraints on proposed defects, and the prompt set that carries them from `chat` to `run`.

A :class:`Constraints` holds what a user asked for in words ("exclude stains", "only the top-left",
"size < 2%") as fields a program can check. Every backend receives the constraints twice: as lines of its
prompt (:meth:`Constraints.lines`, which a chat LLM reads), and as a hard check on what it wrote
(:meth:`Constraints.violation`, a rejection counted by reason like any parse failure). The compact proposer
also narrows its sampling grammar with :meth:`Constraints.narrow_values`, so its specs obey them by
construction. Free-text ``notes`` ("make the scratches thinner") reach chat LLMs only; no check can read them.

A :class:`PromptSet` is the file `kka-synth chat` saves and `kka-synth run --prompts FILE` reads: constraints
for every category (``"*"``) and per category, plus spec texts the user approved, shown as few-shot examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kka_synth.prompts.knowledge import CategoryKnowledge
from kka_synth.types import REGIONS, SHAPES, SIZE_RANGE, TONES, DefectSpec

ALL = "*"
"""The prompt-set key whose constraints apply to every category."""

LIST_FIELDS = (
    "exclude_types",
    "only_types",
    "regions",
    "exclude_regions",
    "shapes",
    "exclude_shapes",
    "tones",
    "exclude_tones",
    "notes",
)
NUMBER_FIELDS = ("size_min", "size_max", "severity_min", "severity_max")
FIELDS = LIST_FIELDS + NUMBER_FIELDS
"""Every constraint field; :meth:`Constraints.add` and :meth:`Constraints.remove` take these names."""

_ALLOWED = {
    "regions": tuple(REGIONS),
    "exclude_regions": tuple(REGIONS),
    "shapes": SHAPES,
    "exclude_shapes": SHAPES,
    "tones": TONES,
    "exclude_tones": TONES,
}


class ConstraintError(ValueError):
    """A constraint is malformed, or constraints leave nothing to propose; the message is one line."""


@dataclass
class Constraints:
    """What proposed specs must satisfy. Empty lists and None bounds mean "no constraint"."""

    exclude_types: list[str] = field(default_factory=list)
    only_types: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    """Region names a spec must use (a box counts when it lies inside one of them)."""
    exclude_regions: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    exclude_shapes: list[str] = field(default_factory=list)
    tones: list[str] = field(default_factory=list)
    exclude_tones: list[str] = field(default_factory=list)
    size_min: float | None = None
    size_max: float | None = None
    severity_min: float | None = None
    severity_max: float | None = None
    notes: list[str] = field(default_factory=list)
    """Free-text instructions for chat LLMs."""

    def __post_init__(self) -> None:
        for name in LIST_FIELDS:
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise ConstraintError(f"constraint {name} must be a list of non-empty strings")
            allowed = _ALLOWED.get(name)
            bad = [v for v in values if allowed is not None and v not in allowed]
            if bad:
                raise ConstraintError(f"constraint {name}: {bad[0]!r} is not one of {', '.join(allowed)}")
        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConstraintError(f"constraint {name} must be a number, got {value!r}")
            low, high = SIZE_RANGE if name.startswith("size") else (0.0, 1.0)
            if not low <= value <= high:
                raise ConstraintError(f"constraint {name} must be in [{low}, {high}], got {value}")
            setattr(self, name, float(value))
        for low, high in (("size_min", "size_max"), ("severity_min", "severity_max")):
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                raise ConstraintError(f"constraint {low} ({a}) is above {high} ({b})")

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) in (None, []) for name in FIELDS)

    # editing -----------------------------------------------------------------------------------------
    def add(self, name: str, value: Any) -> Constraints:
        """A copy with ``value`` added to list field ``name`` or set as bound ``name``."""
        if name not in FIELDS:
            raise ConstraintError(f"unknown constraint {name!r} (known: {', '.join(FIELDS)})")
        data = self.to_dict()
        if name in LIST_FIELDS:
            text = str(value).strip()
            if text not in data[name]:
                data[name] = [*data[name], text]
        else:
            try:
                data[name] = float(value)
            except (TypeError, ValueError):
                raise ConstraintError(f"constraint {name} must be a number, got {value!r}") from None
        return Constraints.from_dict(data)

    def remove(self, name: str, value: Any = None) -> Constraints:
        """A copy without ``value`` in list field ``name`` (all when None), or with bound ``name`` unset."""
        if name not in FIELDS:
            raise ConstraintError(f"unknown constraint {name!r} (known: {', '.join(FIELDS)})")
        data = self.to_dict()
        if name in NUMBER_FIELDS:
            data[name] = None
        elif value is None:
            data[name] = []
        else:
            text = str(value).strip()
            if text not in data[name]:
                raise ConstraintError(f"constraint {name} holds no {text!r}")
            data[name] = [v for v in data[name] if v != text]
        return Constraints.from_dict(data)

    def merged(self, other: Constraints) -> Constraints:
        """Both sets at once: lists of exclusions and notes join, allow-lists intersect, bounds tighten."""
        data: dict[str, Any] = {}
        for name in LIST_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name in ("only_types", "regions", "shapes", "tones") and mine and theirs:
                data[name] = [v for v in mine if v in theirs]
                if not data[name]:
                    raise ConstraintError(f"constraints on {name} exclude each other ({mine} and {theirs})")
            else:
                data[name] = mine + [v for v in theirs if v not in mine]
        for name in NUMBER_FIELDS:
            values = [v for v in (getattr(self, name), getattr(other, name)) if v is not None]
            data[name] = (max if name.endswith("min") else min)(values) if values else None
        return Constraints.from_dict(data)

    # reading -----------------------------------------------------------------------------------------
    def lines(self) -> list[str]:
        """One instruction per constraint, as a chat LLM reads them."""
        out = []
        if self.only_types:
            out.append("Use only these defect types: " + ", ".join(self.only_types) + ".")
        if self.exclude_types:
            out.append("Do not use these defect types: " + ", ".join(self.exclude_types) + ".")
        for allow, deny, what in (
            ("regions", "exclude_regions", "region"),
            ("shapes", "exclude_shapes", "shape"),
            ("tones", "exclude_tones", "tone"),
        ):
            if getattr(self, allow):
                out.append(f'The "{what}" must be one of: ' + ", ".join(getattr(self, allow)) + ".")
            if getattr(self, deny):
                out.append(f'The "{what}" must not be: ' + ", ".join(getattr(self, deny)) + ".")
        for name, what in (("size", '"size"'), ("severity", '"severity"')):
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if low is not None and high is not None:
                out.append(f"The {what} must be between {low:g} and {high:g}.")
            elif low is not None:
                out.append(f"The {what} must be at least {low:g}.")
            elif high is not None:
                out.append(f"The {what} must be at most {high:g}.")
        return out + list(self.notes)

    def violation(self, spec: DefectSpec) -> str | None:
        """The reason code ``constraint_<field>`` of the first constraint ``spec`` breaks, or None."""
        return self.explain(spec)[0]

    def explain(self, spec: DefectSpec) -> tuple[str | None, str]:
        """(reason code or None, one-line detail) for ``spec``."""
        if spec.defect_type in self.exclude_types or (
            self.only_types and spec.defect_type not in self.only_types
        ):
            return (
                "constraint_type",
                f"defect type {spec.defect_type!r} is excluded by the user's constraints",
            )
        region = spec.region_name()
        if self.regions and not any(_inside(spec.region, REGIONS[name]) for name in self.regions):
            return (
                "constraint_region",
                f"region {region or list(spec.region)} is outside {', '.join(self.regions)}",
            )
        if region is not None and region in self.exclude_regions:
            return "constraint_region", f"region {region!r} is excluded"
        for allow, deny, value in (
            ("shapes", "exclude_shapes", spec.shape),
            ("tones", "exclude_tones", spec.tone),
        ):
            if value in getattr(self, deny) or (getattr(self, allow) and value not in getattr(self, allow)):
                return f"constraint_{allow[:-1]}", f"{allow[:-1]} {value!r} is excluded"
        for name, value in (("size", spec.size), ("severity", spec.severity)):
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"[{'-' if low is None else f'{low:g}'}, {'-' if high is None else f'{high:g}'}]"
                return f"constraint_{name}", f"{name} {value:g} is outside {bounds}"
        return None, ""

    def narrow(self, knowledge: CategoryKnowledge) -> CategoryKnowledge:
        """``knowledge`` with the defect types, regions, shapes, tones and sizes the constraints allow.

        A defect type left without a region, shape, tone or size is dropped; when none is left the
        constraints cannot be met for this category and :class:`ConstraintError` says so.
        """
        if self.empty:
            return knowledge
        kept = {}
        for name, defect in knowledge.defect_types.items():
            if name in self.exclude_types or (self.only_types and name not in self.only_types):
                continue
            regions = self.narrow_values("region", defect.regions)
            shapes = self.narrow_values("shape", defect.shapes)
            tones = self.narrow_values("tone", defect.tones)
            low = max(defect.size[0], self.size_min if self.size_min is not None else defect.size[0])
            high = min(defect.size[1], self.size_max if self.size_max is not None else defect.size[1])
            if not (regions and shapes and tones) or low > high:
                continue
            kept[name] = dataclasses.replace(
                defect, regions=regions, shapes=shapes, tones=tones, size=(low, high)
            )
        if not kept:
            raise ConstraintError(f"the constraints leave no defect type to propose for {knowledge.name!r}")
        return dataclasses.replace(knowledge, defect_types=kept)

    def narrow_values(self, field_name: str, values: tuple[str, ...]) -> tuple[str, ...]:
        """The values of ``field_name`` (region, shape or tone) among ``values`` the constraints allow."""
        allow, deny = {
            "region": ("regions", "exclude_regions"),
            "shape": ("shapes", "exclude_shapes"),
            "tone": ("tones", "exclude_tones"),
        }[field_name]
        out = tuple(v for v in values if v not in getattr(self, deny))
        if field_name == "region" and self.regions:
            return tuple(v for v in out if any(_inside(REGIONS[v], REGIONS[r]) for r in self.regions))
        if getattr(self, allow):
            return tuple(v for v in out if v in getattr(self, allow))
        return out

    # storage -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def compact_dict(self) -> dict[str, Any]:
        """Only the fields that are set (what a prompt-set file shows)."""
        return {k: v for k, v in self.to_dict().items() if v not in (None, [])}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Constraints:
        if not isinstance(data, dict):
            raise ConstraintError(f"constraints must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ConstraintError(f"unknown constraint {unknown[0]!r} (known: {', '.join(FIELDS)})")
        return cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in data.items()})


def _inside(box: tuple[float, ...], outer: tuple[float, ...]) -> bool:
    return bool(box[0] >= outer[0] and box[1] >= outer[1] and box[2] <= outer[2] and box[3] <= outer[3])


PROMPT_SET_VERSION = 1


@dataclass
class PromptSet:
    """Constraints and approved examples per category: what `chat` saves and `run --prompts` uses."""

    constraints: dict[str, Constraints] = field(default_factory=dict)
    """Category name (or :data:`ALL`) -> its constraints."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Category name -> spec texts the user approved, shown to chat backends as few-shot examples."""
    dataset: str | None = None
    """The dataset the set was made for (informative; a run on another dataset logs a warning)."""

    def for_category(self, category: str) -> Constraints:
        """The constraints of every category merged with ``category``'s own."""
        return self.constraints.get(ALL, Constraints()).merged(self.constraints.get(category, Constraints()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PROMPT_SET_VERSION,
            "dataset": self.dataset,
            "constraints": {k: v.compact_dict() for k, v in sorted(self.constraints.items()) if not v.empty},
            "examples": {k: list(v) for k, v in sorted(self.examples.items()) if v},
        }

    def save(self, path: str | Path) -> Path:
        """Write the set as YAML (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        """Read a set written by :meth:`save`; a missing or malformed file is one :class:`ConstraintError`."""
        path = Path(path)
        if not path.is_file():
            raise ConstraintError(f"prompt set not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConstraintError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConstraintError(f"{path} must hold a mapping (version, dataset, constraints, examples)")
        try:
            return cls.from_dict(data)
        except ConstraintError as error:
            raise ConstraintError(f"{path}: {error}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptSet:
        unknown = sorted(set(data) - {"version", "dataset", "constraints", "examples"})
        if unknown:
            raise ConstraintError(f"unknown prompt-set key {unknown[0]!r}")
        version = data.get("version", PROMPT_SET_VERSION)
        if version != PROMPT_SET_VERSION:
            raise ConstraintError(f"prompt-set version {version!r} is not {PROMPT_SET_VERSION}")
        constraints = data.get("constraints") or {}
        examples = data.get("examples") or {}
        if not isinstance(constraints, dict) or not isinstance(examples, dict):
            raise ConstraintError("constraints and examples must be mappings keyed by category")
        for name, texts in examples.items():
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ConstraintError(f"examples of {name!r} must be a list of spec texts")
        return cls(
            constraints={str(k): Constraints.from_dict(v or {}) for k, v in constraints.items()},
            examples={str(k): list(v) for k, v in examples.items()},
            dataset=data.get("dataset"),
        )
