"""`kka-synth chat`: refine the prompt set in conversation, preview renders, save what the user approved.

In KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
the proposer is conditioned on anomaly-related knowledge of each category. Chat lets a user add to that
conditioning before a run: constraints ("no stains", "size < 2%"), free-text notes for LLM backends and
approved example specs, gathered in a :class:`~kka_synth.agents.constraints.PromptSet` that
``kka-synth run --prompts FILE`` reads.

:class:`ChatSession` holds the state and exposes it as tools, plain methods that take strings and numbers
and return text; an LLM agent calls them by name (``kka_synth.agents.chat_agent``). The compact offline
proposer cannot converse, so ``kka_synth.agents.chat_intent.IntentChat`` maps an utterance onto the same
tools with fixed rules. The work behind the tools lives beside it: reading tool values and writing replies
(:mod:`~kka_synth.agents.chat_values`), constraint edits and the prompt set
(:mod:`~kka_synth.agents.chat_constraints`), preview renders (:mod:`~kka_synth.agents.chat_preview`) and the
run summary (:mod:`~kka_synth.agents.chat_stats`).
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.agents.base import ProposalContext, Proposer
from kka_synth.agents.chat_constraints import (
    add_values,
    constraint_field,
    constraint_summary,
    constraint_values,
    load_prompt_set,
    prompt_set_listing,
    remove_values,
    save_prompt_set,
    scope_label,
)
from kka_synth.agents.chat_preview import (
    TINT,
    build_render_stage,
    normal_images,
    preview_lines,
    render_previews,
)
from kka_synth.agents.chat_stats import run_summary
from kka_synth.agents.chat_values import (
    ALL_WORDS,
    MAX_SPECS,
    ToolError,
    canonical_name,
    describe_spec,
    example_text,
    first_line,
    knowledge_lines,
    match_category,
    match_names,
    parse_count,
    parse_numbers,
    proposals_reply,
)
from kka_synth.agents.constraints import ALL, Constraints, PromptSet
from kka_synth.config import RunConfig
from kka_synth.prompts.knowledge import CategoryKnowledge, load_knowledge, read_user_knowledge
from kka_synth.types import Proposal

logger = logging.getLogger(__name__)

PROPOSE_ROUNDS = 3
"""Times propose asks again for the specs that came back rejected."""
NOTES_REMARK = (
    "note: the compact offline proposer cannot read notes; they reach LLM backends "
    "(transformers, vllm, openai)"
)


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
        self.prompt_set: PromptSet = load_prompt_set(self.prompts_path, config.data.dataset)
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
        return match_category(category, self.known_categories())

    def _focus(self, category: str | None) -> str:
        name = self.resolve_category(category)
        self.category = name
        return name

    def _scope(self, category: str | None) -> str:
        """:data:`ALL` for "*" or "all", else the category (which comes into focus)."""
        if category is not None and str(category).strip().lower() in ALL_WORDS:
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
        lines = knowledge_lines(name, self.knowledge_of(name))
        return "\n".join([*lines, constraint_summary(self.prompt_set, name)])

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
        n = parse_count(n)
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
        self._last[name] = kept[:n]
        return proposals_reply(name, self._last[name], n, rejected, PROPOSE_ROUNDS)

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
        name = self._focus(category)
        n = parse_count(n)
        head = []
        if not self._last.get(name):
            head.append(self.propose(name, n))
        proposals = self._last[name][:n]
        if not proposals:
            return "\n".join([*head, "nothing to render: no proposal parsed"])
        normals = self._normal_images(name)
        renderers = self._render_stage()
        self._draws += 1
        results = render_previews(self.config, name, proposals, normals, renderers, self._draws)
        lines = [*head, f"preview of {name} in {self.preview_dir}:"]
        lines += preview_lines(results, name, self.preview_dir)
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
        chosen = parse_numbers(numbers, len(last), name)
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
        field = constraint_field(field)
        values = constraint_values(field, value, lambda: self.types_of(scope), scope_label(scope))
        categories = self.known_categories() if scope == ALL else [scope]
        lines = [add_values(self.prompt_set, scope, field, values, categories, self.knowledge_of)]
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
        return remove_values(self.prompt_set, scope, constraint_field(field), value)

    def list_constraints(self, category: str | None = None) -> str:
        """List the constraints and approved examples of the prompt set.

        Args:
            category: a category name to see what applies to it (its own constraints merged with those for
                every category); None lists every category's own constraints.
        """
        if category is not None and str(category).strip().lower() not in ALL_WORDS:
            return prompt_set_listing(self.prompt_set, self._focus(category))
        return prompt_set_listing(self.prompt_set, None)

    def run_stats(self, top: int = 5) -> str:
        """Summarise the run this chat was opened on: per-iteration counts and the hardest kept candidates.

        Per iteration: proposals, kept, hard share, parse failures, and retries (replies an LLM backend was
        asked again, on how many proposals, by reason). Then the `top` kept candidates with the highest
        hardness (hardness > 0 means hard), with their text and image path.

        Args:
            top: how many of the hardest candidates to list (1 to 16).
        """
        top = parse_count(top, "top")
        if self.run_dir is None:
            raise ToolError("no run directory; open the chat on a run (--run DIR) to read its stats")
        return run_summary(self.run_dir, top)

    def save_prompts(self, path: str | None = None) -> str:
        """Save the prompt set (constraints and approved examples) for `kka-synth run --prompts FILE`.

        Args:
            path: the YAML file to write; None writes the chat's prompt-set file.
        """
        target = self.prompts_path if path is None or not str(path).strip() else Path(str(path).strip())
        return save_prompt_set(self.prompt_set, target, self.config.data.dataset)

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

    def _normal_images(self, category: str) -> list[np.ndarray]:
        """The category's normal training images at the run's image size (loaded once)."""
        if category not in self._normals:
            self._normals[category] = normal_images(self.config.data, category)
        return self._normals[category]

    def _render_stage(self) -> dict[str, Any]:
        """The run's renderers (``config.render``), built once; diffusion pipelines load here."""
        if self._renderers is None:
            negative = {n: self.knowledge_of(n).negative_prompt for n in self.known_categories()}
            self._renderers = build_render_stage(self.config, negative)
        return self._renderers


__all__ = [
    "MAX_SPECS",
    "TINT",
    "ChatSession",
    "ToolError",
    "canonical_name",
    "describe_spec",
    "example_text",
    "first_line",
    "match_names",
]
