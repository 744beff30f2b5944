"""`kka-synth chat`: refine the prompt set in conversation, preview renders, save what the user approved.

In KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
the proposer is conditioned on anomaly-related knowledge of each category. Chat lets a user add to that
conditioning before a run: constraints ("no stains", "size < 2%"), free-text notes for LLM backends and
approved example specs, gathered in a :class:`~kka_synth.agents.constraints.PromptSet` that
``kka-synth run --prompts FILE`` reads.

:class:`ChatSession` holds the state and exposes it as tools, plain methods that take strings and numbers
and return text; an LLM agent calls them by name (``kka_synth.agents.chat_agent``). The compact offline
proposer cannot converse, so ``kka_synth.agents.chat_intent.IntentChat`` maps an utterance onto the same
tools with fixed rules.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.agents.base import ProposalContext, Proposer
from kka_synth.agents.constraints import ALL, FIELDS, NUMBER_FIELDS, Constraints, PromptSet
from kka_synth.agents.corpus import spec_text
from kka_synth.config import RunConfig
from kka_synth.prompts.knowledge import CategoryKnowledge, load_knowledge, read_user_knowledge
from kka_synth.types import REGIONS, SHAPES, SPEC_FIELDS, TONES, Proposal

logger = logging.getLogger(__name__)

MAX_SPECS = 16
"""Most specs one propose or preview call makes (a chat shows a few, a run makes many)."""
PROPOSE_ROUNDS = 3
"""Times propose asks again for the specs that came back rejected."""
TINT = 0.4
"""Share of the outline colour mixed into the masked pixels of a preview overlay."""
NOTES_REMARK = (
    "note: the compact offline proposer cannot read notes; they reach LLM backends "
    "(transformers, vllm, openai)"
)
_ALL_WORDS = ("*", "all", "every", "everything", "all categories", "all products", "every category")
_REGION_ALIASES = {"centre": "center", "middle": "center", "upper": "top", "lower": "bottom"}
_TONE_ALIASES = {
    "dark": "darker",
    "bright": "brighter",
    "light": "brighter",
    "lighter": "brighter",
    "color": "colour",
    "coloured": "colour",
    "colored": "colour",
    "discoloured": "colour",
    "discolored": "colour",
}


class ToolError(ValueError):
    """Bad tool input; one line, shown to the user as ``error: ...``."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _singulars(word: str) -> list[str]:
    """``word`` and the singular forms it may stand for ("stains" -> stains, stain)."""
    forms = [word]
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and len(word) > 2:
        forms.append(word[:-1])
    return list(dict.fromkeys(forms))


def _name(text: str) -> str:
    """Lowercase, with spaces and hyphens as underscores ("Edge chips" -> edge_chips)."""
    return re.sub(r"[\s\-]+", "_", str(text).strip().lower())


def _fraction(value: Any, what: str) -> float:
    """A number, with "2%" read as 0.02."""
    text = str(value).strip().lower()
    percent = text.endswith("%") or text.endswith("percent")
    text = text.rstrip("%").removesuffix("percent").strip()
    try:
        number = float(text)
    except ValueError:
        raise ToolError(f"{what} must be a number such as 0.02 or 2%, got {value!r}") from None
    return number / 100.0 if percent else number


def _count(n: Any, what: str = "n") -> int:
    if isinstance(n, str) and n.strip().isdigit():
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SPECS:
        raise ToolError(f"{what} must be a whole number from 1 to {MAX_SPECS}, got {n!r}")
    return n


def describe_spec(proposal: Proposal) -> str:
    """One readable line for a parsed proposal: type, region, size, shape, tone, severity, description."""
    spec = proposal.spec
    if spec is None:
        return f"(rejected: {proposal.error})"
    region = spec.region_name() or "[" + ", ".join(f"{v:.2f}" for v in spec.region) + "]"
    return (
        f"{spec.defect_type} at {region}, size {spec.size * 100:g}% of the object, "
        f'{spec.shape}, {spec.tone}, severity {spec.severity:g}: "{spec.description}"'
    )


def example_text(proposal: Proposal) -> str:
    """The canonical JSON text of a parsed proposal, as approved examples store it."""
    spec = proposal.spec
    if spec is None:
        raise ToolError(f"a rejected proposal ({proposal.error}) cannot be an example")
    data = spec.to_dict()
    data["region"] = spec.region_name() or data["region"]
    return spec_text({key: data[key] for key in SPEC_FIELDS})


class ChatSession:
    """What a chat about the prompt set can do, as tools an agent calls by name.

    Args:
        config: the run configuration (dataset, proposer, renderers, seed).
        run_dir: a finished or running run whose stats ``run_stats`` reads (optional).
        prompts_path: the prompt-set file, loaded when it exists and written by ``save_prompts``.
        preview_dir: folder the preview PNGs are written to.
        proposer: the proposer to use; None builds ``config.proposer`` on the first proposal.
    """

    TOOLS: tuple[str, ...] = (
        "list_categories",
        "show_knowledge",
        "propose",
        "preview",
        "approve",
        "add_constraint",
        "remove_constraint",
        "list_constraints",
        "run_stats",
        "save_prompts",
    )

    def __init__(
        self,
        config: RunConfig,
        *,
        run_dir: Path | None = None,
        prompts_path: Path,
        preview_dir: Path,
        proposer: Proposer | None = None,
    ) -> None:
        self.config = config
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.prompts_path = Path(prompts_path)
        self.preview_dir = Path(preview_dir)
        self.proposer = proposer
        if self.prompts_path.is_file():
            self.prompt_set = PromptSet.load(self.prompts_path)
            if self.prompt_set.dataset not in (None, config.data.dataset):
                logger.warning(
                    "prompt set %s was made for dataset %r, the config uses %r",
                    self.prompts_path,
                    self.prompt_set.dataset,
                    config.data.dataset,
                )
        else:
            self.prompt_set = PromptSet(dataset=config.data.dataset)
        self.category: str | None = None
        self._categories: list[str] | None = None
        self._knowledge: dict[str, CategoryKnowledge] = {}
        self._user_knowledge: dict[str, CategoryKnowledge] | None = None
        self._last: dict[str, list[Proposal]] = {}
        self._normals: dict[str, list[np.ndarray]] = {}
        self._renderers: dict[str, Any] | None = None
        self._draws = 0

    # lookups (not tools) -----------------------------------------------------------------------------
    def known_categories(self) -> list[str]:
        """The dataset's category names (``data.categories`` when the config restricts them)."""
        if self._categories is None:
            from kka_synth.data import list_categories

            names = list_categories(self.config.data.dataset, self.config.data.root)
            wanted = self.config.data.categories
            self._categories = [n for n in names if n in wanted] if wanted else names
        return self._categories

    def resolve_category(self, category: str | None) -> str:
        """The category ``category`` names: exact, case-insensitive, plural or a unique prefix."""
        known = self.known_categories()
        listing = ", ".join(known)
        if category is None or not str(category).strip():
            raise ToolError(f"no category in focus; name one (known: {listing})")
        wanted = _name(category)
        for form in _singulars(wanted):
            exact = [n for n in known if n.lower() == form]
            if exact:
                return exact[0]
        prefixed = [n for n in known if n.lower().startswith(wanted)]
        if len(prefixed) == 1:
            return prefixed[0]
        if prefixed:
            raise ToolError(f"{category!r} matches several categories: {', '.join(prefixed)}")
        raise ToolError(f"unknown category {category!r} (known: {listing})")

    def _focus(self, category: str | None) -> str:
        name = self.resolve_category(category)
        self.category = name
        return name

    def _scope(self, category: str | None) -> str:
        """:data:`ALL` for "*" or "all", else the category (which comes into focus)."""
        if category is not None and str(category).strip().lower() in _ALL_WORDS:
            return ALL
        return self._focus(category)

    def knowledge_of(self, category: str) -> CategoryKnowledge:
        if category not in self._knowledge:
            dataset = self.config.data.dataset
            if self._user_knowledge is None:
                self._user_knowledge = read_user_knowledge(self.config.data.knowledge)
            self._knowledge[category] = load_knowledge(
                category, None if dataset == "folder" else dataset, extra=self._user_knowledge
            )
        return self._knowledge[category]

    def types_of(self, scope: str) -> list[str]:
        """Defect type names of a category, or of every category for :data:`ALL`."""
        names = self.known_categories() if scope == ALL else [scope]
        return list(dict.fromkeys(t for n in names for t in self.knowledge_of(n).defect_types))

    def match_types(self, scope: str, value: str) -> list[str]:
        """The defect types ``value`` names in ``scope`` ("chips" -> chip, edge_chip), plural or singular."""
        return match_names(value, self.types_of(scope))

    def constraints_of(self, scope: str) -> Constraints:
        """The scope's own constraints (not merged with those for every category)."""
        return self.prompt_set.constraints.get(scope, Constraints())

    def last_proposals(self, category: str) -> list[Proposal]:
        return list(self._last.get(category, []))

    def _label(self, scope: str) -> str:
        return "all categories" if scope == ALL else scope

    # tools -------------------------------------------------------------------------------------------
    def list_categories(self) -> str:
        """List the dataset's categories (products) with their defect types and constraints set.

        Returns:
            One line per category.
        """
        lines = []
        for name in self.known_categories():
            knowledge = self.knowledge_of(name)
            count = len(self.constraints_of(name).compact_dict())
            extra = f"; {count} constraint field(s) set" if count else ""
            lines.append(f"{name} ({knowledge.kind}): {', '.join(knowledge.defect_types)}{extra}")
        if not self.constraints_of(ALL).empty:
            lines.append(f"constraints for all categories: {len(self.constraints_of(ALL).compact_dict())}")
        return "\n".join(lines)

    def show_knowledge(self, category: str) -> str:
        """Show what the knowledge base says about a category: its components and defect types.

        Each defect type lists the regions, shapes, tones, size range (share of the object area) and
        description phrases it may take, then the constraints now in force for the category.

        Args:
            category: category name, e.g. "washer" (a unique prefix is enough).
        """
        name = self._focus(category)
        knowledge = self.knowledge_of(name)
        lines = [f"{name}: {knowledge.kind}, components: {', '.join(knowledge.components)}"]
        for defect in knowledge.defect_types.values():
            low, high = defect.size
            lines.append(
                f"- {defect.name}: regions {', '.join(defect.regions)}; shapes {', '.join(defect.shapes)}; "
                f"tones {', '.join(defect.tones)}; size {low * 100:g}-{high * 100:g}%; "
                f"e.g. {'; '.join(defect.phrases[:2])}"
            )
        lines.append(self._constraint_summary(name))
        return "\n".join(lines)

    def propose(self, category: str, n: int = 3) -> str:
        """Propose new defect specs for a category under the current constraints and approved examples.

        The specs are numbered; approve(category, numbers) keeps the ones the user likes and preview renders
        them. Replies the proposer wrote that were rejected (unparsable or breaking a constraint) are asked
        again and counted by reason.

        Args:
            category: category name, e.g. "washer".
            n: how many specs to propose (1 to 16).
        """
        name = self._focus(category)
        n = _count(n)
        context = ProposalContext(
            category=name,
            knowledge=self.knowledge_of(name),
            examples=list(self.prompt_set.examples.get(name, [])),
            constraints=self.prompt_set.for_category(name),
        )
        proposer = self._proposer()
        kept: list[Proposal] = []
        rejected: Counter[str] = Counter()
        for _ in range(PROPOSE_ROUNDS):
            for proposal in proposer.propose(context, n - len(kept), seed=self._next_seed()):
                rejected.update(proposal.retries)
                if proposal.spec is None:
                    rejected[proposal.error or "unknown"] += 1
                else:
                    kept.append(proposal)
            if len(kept) >= n:
                break
        kept = kept[:n]
        self._last[name] = kept
        lines = [f"{len(kept)} proposal(s) for {name}:"]
        lines += [f"{k}. {describe_spec(p)}" for k, p in enumerate(kept, 1)]
        if len(kept) < n:
            lines.append(f"only {len(kept)} of {n} parsed after {PROPOSE_ROUNDS} rounds")
        total = sum(rejected.values())
        reasons = ", ".join(f"{r} {c}" for r, c in sorted(rejected.items(), key=lambda rc: (-rc[1], rc[0])))
        lines.append(f"rejected replies: {total} ({reasons})" if total else "rejected replies: 0")
        return "\n".join(lines)

    def preview(self, category: str, n: int = 3) -> str:
        """Render the category's last proposals on normal training images and save them as PNG files.

        Proposes n specs first when there are none. For proposal k it writes <category>-<k>.png (the
        render), <category>-<k>-mask.png and <category>-<k>-overlay.png (the defect mask outlined and
        tinted) to the preview folder and returns their paths; failed renders are listed with the reason.

        Args:
            category: category name, e.g. "washer".
            n: how many of the last proposals to render (1 to 16; also how many to propose when there are
                none).
        """
        from kka_synth.synth.stage import RenderJob, render_jobs, renderer_order

        name = self._focus(category)
        n = _count(n)
        head = []
        if not self._last.get(name):
            head.append(self.propose(name, n))
        proposals = self._last[name][:n]
        if not proposals:
            return "\n".join([*head, "nothing to render: no proposal parsed"])
        normals = self._normal_images(name)
        renderers = self._render_stage()
        self._draws += 1
        jobs = []
        for k, proposal in enumerate(proposals, 1):
            rng = np.random.default_rng([self.config.seed, self._draws, k])
            order = renderer_order(self.config.render.renderers, self.config.render.weights, rng)
            assert proposal.spec is not None
            jobs.append(RenderJob(k, name, proposal.spec, int(rng.integers(len(normals))), rng, order))
        results = render_jobs(jobs, renderers, {name: normals})
        lines = [*head, f"preview of {name} in {self.preview_dir}:"]
        for result in results:
            k, spec = result.job.key, result.job.spec
            if result.output is None:
                tried = ", ".join(result.job.errors) or "no renderer"
                lines.append(f"{k}. {spec.defect_type}: render failed ({result.reason}; tried {tried})")
                continue
            lines.append(f"{k}. {spec.defect_type} at {spec.region_name() or 'a box'} ({result.renderer}):")
            lines += [f"   {path}" for path in self._save_preview(name, k, result.output)]
        return "\n".join(lines)

    def approve(self, category: str, numbers: list[int]) -> str:
        """Keep some of the category's last proposals as approved examples in the prompt set.

        LLM backends show approved examples as few-shot examples in every run that uses the saved prompt set.

        Args:
            category: category name, e.g. "washer".
            numbers: the numbers of the proposals to keep, as the last propose listed them, e.g. [1, 3].
        """
        name = self._focus(category)
        last = self._last.get(name, [])
        if not last:
            raise ToolError(f"nothing proposed for {name} yet; propose first")
        if not isinstance(numbers, (list, tuple)) or not numbers:
            raise ToolError(f"numbers must be a non-empty list of proposal numbers 1-{len(last)}")
        chosen = []
        for number in numbers:
            if isinstance(number, str) and number.strip().isdigit():
                number = int(number)
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= len(last):
                raise ToolError(f"no proposal {number!r} for {name}; the last ones are 1-{len(last)}")
            chosen.append(number)
        examples = self.prompt_set.examples.setdefault(name, [])
        added = []
        for number in dict.fromkeys(chosen):
            text = example_text(last[number - 1])
            if text not in examples:
                examples.append(text)
                added.append(number)
        lines = [
            f"approved {len(added)} new example(s) for {name} "
            f"({', '.join(map(str, added)) or 'all already approved'}); {len(examples)} in all"
        ]
        if self.config.proposer.backend == "compact":
            lines.append("note: the compact offline proposer does not read examples; LLM backends do")
        return "\n".join(lines)

    def add_constraint(self, category: str, field: str, value: str) -> str:
        """Add a constraint on proposed defects for one category, or for every category.

        Args:
            category: category name, or "*" (also "all") for every category.
            field: one of exclude_types, only_types (defect type names of the category, e.g. "stain"; plural
                and partial names match every fitting type), regions, exclude_regions (anywhere, center, top,
                bottom, left, right, top-left, top-right, bottom-left, bottom-right), shapes, exclude_shapes
                (scratch, crack, blob, spot, hole, stain, missing), tones, exclude_tones (darker, brighter,
                colour), size_min, size_max (share of the object area, e.g. 0.02 or "2%"), severity_min,
                severity_max (0 barely visible to 1 obvious), notes (free text for LLM backends).
            value: the value to add (one name, a number, or the note's text).
        """
        scope = self._scope(category)
        field = self._field(field)
        updated = self.constraints_of(scope)
        values = self._values(scope, field, value)
        for item in values:
            updated = updated.add(field, item)
        self._check_satisfiable(scope, updated)
        self.prompt_set.constraints[scope] = updated
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        lines = [f"{self._label(scope)}: {field} += {shown}", self._constraint_summary(scope)]
        if field == "notes" and self.config.proposer.backend == "compact":
            lines.append(NOTES_REMARK)
        return "\n".join(lines)

    def remove_constraint(self, category: str, field: str, value: str | None = None) -> str:
        """Remove a constraint from one category, or from the constraints for every category.

        Args:
            category: category name, or "*" (also "all") for the constraints of every category.
            field: the constraint field (see add_constraint), e.g. "size_max" or "exclude_types".
            value: for list fields, the value to remove (e.g. "stain"); None removes the whole field.
        """
        scope = self._scope(category)
        field = self._field(field)
        current = self.constraints_of(scope)
        label = self._label(scope)
        held = getattr(current, field)
        if held in (None, []):
            raise ToolError(f"{label} has no {field} constraint ({self._constraint_summary(scope)})")
        if value is None or field in NUMBER_FIELDS:
            updated = current.remove(field)
            removed = held
        else:
            removed = self._held_values(field, str(value), held)
            if not removed:
                raise ToolError(f"{field} of {label} holds no {value!r} (it holds {', '.join(held)})")
            updated = current
            for item in removed:
                updated = updated.remove(field, item)
        self.prompt_set.constraints[scope] = updated
        shown = ", ".join(removed) if isinstance(removed, list) else f"{removed:g}"
        return "\n".join([f"{label}: removed {field} {shown}", self._constraint_summary(scope)])

    def list_constraints(self, category: str | None = None) -> str:
        """List the constraints and approved examples of the prompt set.

        Args:
            category: a category name to see what applies to it (its own constraints merged with those for
                every category); None lists every category's own constraints.
        """
        if category is not None and str(category).strip().lower() not in _ALL_WORDS:
            name = self._focus(category)
            examples = self.prompt_set.examples.get(name, [])
            lines = [self._constraint_summary(name), f"approved examples: {len(examples)}"]
            return "\n".join(lines + [f"  {text}" for text in examples])
        scopes = [s for s, c in sorted(self.prompt_set.constraints.items()) if not c.empty]
        lines = [self._constraint_summary(scope, merged=False) for scope in scopes]
        lines += [
            f"{n}: {len(t)} approved example(s)" for n, t in sorted(self.prompt_set.examples.items()) if t
        ]
        return "\n".join(lines) if lines else "no constraints and no approved examples yet"

    def run_stats(self, top: int = 5) -> str:
        """Summarise the run this chat was opened on: per-iteration counts and the hardest kept candidates.

        Per iteration: proposals, kept, hard share, parse failures, and retries (replies an LLM backend was
        asked again, on how many proposals, by reason). Then the `top` kept candidates with the highest
        hardness (hardness > 0 means hard), with their text and image path.

        Args:
            top: how many of the hardest candidates to list (1 to 16).
        """
        from kka_synth.runs import read_candidates

        top = _count(top, "top")
        if self.run_dir is None:
            raise ToolError("no run directory; open the chat on a run (--run DIR) to read its stats")
        folder = self.run_dir / "iterations"
        steps = sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit())
        lines, kept = [], []
        for k in steps:
            stats_path = folder / str(k) / "stats.json"
            if stats_path.is_file():
                try:
                    lines.append(_stats_line(json.loads(stats_path.read_text())))
                except (ValueError, KeyError, TypeError) as error:
                    lines.append(f"iteration {k}: unreadable stats.json ({first_line(error)})")
            if (folder / str(k) / "candidates.parquet").is_file():
                rows = read_candidates(folder / str(k))
                kept += [
                    (r, k) for r in rows if r["label"] in ("hard", "easy") and r.get("hardness") is not None
                ]
        if not lines and not kept:
            raise ToolError(f"run {self.run_dir.name} has no finished iteration yet")
        kept.sort(key=lambda item: -float(item[0]["hardness"]))
        if kept:
            lines.append(f"hardest {min(top, len(kept))} of {len(kept)} kept candidates:")
        for rank, (row, k) in enumerate(kept[:top], 1):
            text = " ".join(str(row["text"]).split())
            image = folder / str(k) / row["image"] if row.get("image") else "no image"
            lines.append(
                f"{rank}. hardness {float(row['hardness']):.3f} ({row['label']}), iteration {k}, "
                f"{row['category']}: {text}\n   {image}"
            )
        return "\n".join(lines)

    def save_prompts(self, path: str | None = None) -> str:
        """Save the prompt set (constraints and approved examples) for `kka-synth run --prompts FILE`.

        Args:
            path: the YAML file to write; None writes the chat's prompt-set file.
        """
        target = self.prompts_path if path is None or not str(path).strip() else Path(str(path).strip())
        if self.prompt_set.dataset is None:
            self.prompt_set.dataset = self.config.data.dataset
        try:
            self.prompt_set.save(target)
        except OSError as error:
            raise ToolError(f"cannot write {target}: {first_line(error)}") from None
        scopes = sum(not c.empty for c in self.prompt_set.constraints.values())
        examples = sum(len(t) for t in self.prompt_set.examples.values())
        return (
            f"saved {scopes} constraint set(s) and {examples} approved example(s) to {target}\n"
            f"use it with: kka-synth run --prompts {target}"
        )

    # dispatch ----------------------------------------------------------------------------------------
    def call(self, tool: str, **arguments: Any) -> str:
        """Run tool ``tool``; bad input comes back as ``error: <one line>``, never as an exception."""
        if tool not in self.TOOLS:
            return f"error: unknown tool {tool!r} (known: {', '.join(self.TOOLS)})"
        method = getattr(self, tool)
        try:
            inspect.signature(method).bind(**arguments)
        except TypeError as error:
            return f"error: bad arguments for {tool}: {first_line(error)}"
        try:
            return method(**arguments)
        except (ValueError, OSError) as error:  # ToolError, ConstraintError, DataError, ConfigError, ...
            logger.debug("tool %s failed", tool, exc_info=True)
            return f"error: {first_line(error)}"
        except Exception as error:  # a backend failing (a model, an endpoint) must not end the chat
            logger.debug("tool %s failed", tool, exc_info=True)
            return f"error: {type(error).__name__}: {first_line(error)}"

    # helpers -----------------------------------------------------------------------------------------
    def _proposer(self) -> Proposer:
        if self.proposer is None:
            from kka_synth.agents import build_proposer

            self.proposer = build_proposer(
                self.config.proposer, self.config.seed, knowledge_file=self.config.data.knowledge
            )
        return self.proposer

    def _next_seed(self) -> int:
        self._draws += 1
        return int(np.random.default_rng([self.config.seed, self._draws]).integers(2**31 - 1))

    def _field(self, field: str) -> str:
        name = _name(field)
        if name not in FIELDS:
            raise ToolError(f"unknown constraint field {field!r} (known: {', '.join(FIELDS)})")
        return name

    def _values(self, scope: str, field: str, value: Any) -> list[Any]:
        """The values ``value`` stands for in ``field``, checked against the category's knowledge."""
        if field in NUMBER_FIELDS:
            return [_fraction(value, field)]
        text = str(value).strip()
        if not text:
            raise ToolError(f"{field} needs a value")
        if field == "notes":
            return [text]
        if field in ("exclude_types", "only_types"):
            found = self.match_types(scope, text)
            if not found:
                raise ToolError(
                    f"{self._label(scope)} has no defect type like {text!r} "
                    f"(known: {', '.join(self.types_of(scope))})"
                )
            return found
        allowed = {"regions": tuple(REGIONS), "shapes": SHAPES, "tones": TONES}[
            field.removeprefix("exclude_")
        ]
        found = canonical_name(field, text)
        if found not in allowed:
            raise ToolError(f"{field}: {text!r} is not one of {', '.join(allowed)}")
        return [found]

    def _held_values(self, field: str, value: str, held: list[str]) -> list[str]:
        if field in ("exclude_types", "only_types"):
            return match_names(value, held)
        if field == "notes":
            return [v for v in held if v == value.strip()] or [v for v in held if value.lower() in v.lower()]
        return [v for v in held if v == canonical_name(field, value)]

    def _check_satisfiable(self, scope: str, updated: Constraints) -> None:
        """Raise ConstraintError when ``updated`` in ``scope`` leaves a category nothing to propose."""
        for name in self.known_categories() if scope == ALL else [scope]:
            mine = updated if scope == name else self.constraints_of(name)
            every = updated if scope == ALL else self.constraints_of(ALL)
            every.merged(mine).narrow(self.knowledge_of(name))

    def _constraint_summary(self, scope: str, merged: bool = True) -> str:
        if scope != ALL and merged:
            lines = self.prompt_set.for_category(scope).lines()
            title = f"constraints for {scope} (with those for all categories)"
        else:
            lines = self.constraints_of(scope).lines()
            title = f"constraints for {self._label(scope)}"
        return f"{title}: " + (" ".join(line.rstrip(".") + "." for line in lines) if lines else "none")

    def _normal_images(self, category: str) -> list[np.ndarray]:
        """The category's normal training images at the run's image size (loaded once)."""
        if category not in self._normals:
            from kka_synth.data import load_rgb, load_samples

            cfg = self.config.data
            samples = load_samples(cfg.dataset, cfg.root, [category], columns=cfg.hf_columns)
            good = sorted(
                (s for s in samples if s.split == "train" and s.label == 0), key=lambda s: str(s.image_path)
            )
            if not good:
                raise ToolError(f"{category} has no normal training images to render on")
            self._normals[category] = [load_rgb(s.image_path, cfg.image_size) for s in good]
        return self._normals[category]

    def _render_stage(self) -> dict[str, Any]:
        """The run's renderers (``config.render``), built once; diffusion pipelines load here."""
        if self._renderers is None:
            from kka_synth.data import load_mask
            from kka_synth.synth import RENDERERS
            from kka_synth.synth.stage import build_renderers

            negative = {n: self.knowledge_of(n).negative_prompt for n in self.known_categories()}
            size = self.config.data.image_size
            masks = {n: load_mask(p, size) for n, p in self.config.render.foreground_masks.items()}
            self._renderers = build_renderers(self.config.render, RENDERERS, negative, masks)
        return self._renderers

    def _save_preview(self, category: str, k: int, output: Any) -> list[Path]:
        from PIL import Image

        from kka_synth.data import save_mask, save_rgb
        from kka_synth.eval.html import OUTLINE, outlined

        image_path = self.preview_dir / f"{category}-{k}.png"
        overlay_path = self.preview_dir / f"{category}-{k}-overlay.png"
        save_rgb(image_path, output.image)
        if output.mask is None:
            save_rgb(overlay_path, output.image)
            return [image_path, overlay_path]
        mask_path = self.preview_dir / f"{category}-{k}-mask.png"
        save_mask(mask_path, output.mask)
        tinted = output.image.astype(np.float32)  # (H, W, 3)
        tinted[output.mask] = (1 - TINT) * tinted[output.mask] + TINT * np.asarray(OUTLINE, np.float32)
        overlay = outlined(Image.fromarray(tinted.round().astype(np.uint8)), mask_path)
        save_rgb(overlay_path, np.asarray(overlay))
        return [image_path, overlay_path, mask_path]


def canonical_name(field: str, value: str) -> str:
    """A region, shape or tone name in its known spelling ("top left" -> top-left, "blobs" -> blob)."""
    text = re.sub(r"[\s_]+", "-", value.strip().lower())
    kind = field.removeprefix("exclude_")
    if kind == "regions":
        return "-".join(_REGION_ALIASES.get(part, part) for part in text.split("-"))
    if kind == "tones":
        return _TONE_ALIASES.get(text, text)
    return next((form for form in _singulars(text) if form in SHAPES), text)


def match_names(value: str, names: list[str]) -> list[str]:
    """Names ``value`` stands for: those it (or its singular) names or is a word of, else those holding it."""
    wanted = _name(value)
    forms = _singulars(wanted)
    found = [n for n in names if n in forms or any(f in n.split("_") for f in forms)]
    if found:
        return found
    return [n for n in names if any(len(f) >= 3 and f in n for f in forms)]


def _stats_line(stats: dict[str, Any]) -> str:
    """One iteration's stats.json as a line."""

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


__all__ = ["ChatSession", "ToolError", "canonical_name", "describe_spec", "example_text", "match_names"]
