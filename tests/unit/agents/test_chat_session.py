"""ChatSession: the tools of `kka-synth chat` on the demo dataset with the tiny compact proposer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.ndimage import binary_dilation

from kka_synth.agents import CompactProposer, ProposalContext, parse_completion
from kka_synth.agents.chat import ChatSession, ToolError
from kka_synth.agents.constraints import ALL, Constraints
from kka_synth.config import RunConfig
from kka_synth.data import load_mask, load_rgb, save_rgb
from kka_synth.runs import RunDir, atomic_write_json, write_candidates
from kka_synth.synth import RenderError
from kka_synth.types import DefectSpec, Proposal

WASHER_SPEC = (
    '{"defect_type": "rust", "description": "rust spot on the metal", "region": "top-left", "size": 0.01, '
    '"shape": "spot", "tone": "colour", "severity": 0.5}'
)


@pytest.fixture
def session(tmp_path: Path, tiny_proposer: CompactProposer) -> ChatSession:
    return ChatSession(
        RunConfig(out=str(tmp_path / "runs")),
        prompts_path=tmp_path / "prompts.yaml",
        preview_dir=tmp_path / "preview",
        proposer=tiny_proposer,
    )


class ScriptedProposer:
    """Answers each propose call with the next list of texts, parsed as the compact proposer would."""

    def __init__(self, *batches: list[str]) -> None:
        self.batches = list(batches)
        self.asked: list[int] = []

    def propose(self, context: ProposalContext, n: int, seed: int) -> list[Proposal]:
        self.asked.append(n)
        proposals = [parse_completion(text, context, prompt="p") for text in self.batches.pop(0)[:n]]
        proposals[0].retries = ["bad_size"]  # a reply asked again before it parsed (LLM backends)
        return proposals


def test_constraints_are_saved_and_reloaded(session: ChatSession, tmp_path: Path) -> None:
    assert "exclude_types += stain" in session.add_constraint("brick", "exclude_types", "stains")
    session.add_constraint("all", "size_max", "2%")
    session.add_constraint("washer", "regions", "top left")
    session.add_constraint("washer", "exclude_types", "chips")  # a word of edge_chip
    session.add_constraint("washer", "notes", "place defects near the inner edge")
    assert session.category == "washer"
    out = session.save_prompts()
    assert str(tmp_path / "prompts.yaml") in out
    saved = yaml.safe_load((tmp_path / "prompts.yaml").read_text())
    assert saved == {
        "version": 1,
        "dataset": "demo",
        "constraints": {
            "*": {"size_max": 0.02},
            "brick": {"exclude_types": ["stain"]},
            "washer": {
                "exclude_types": ["edge_chip"],
                "regions": ["top-left"],
                "notes": ["place defects near the inner edge"],
            },
        },
        "examples": {},
    }
    again = ChatSession(
        session.config,
        prompts_path=tmp_path / "prompts.yaml",
        preview_dir=tmp_path,
        proposer=session.proposer,
    )
    assert again.prompt_set.constraints == session.prompt_set.constraints
    assert again.prompt_set.for_category("washer").size_max == 0.02
    assert "must not be: stain" not in again.list_constraints("washer")
    assert "Do not use these defect types: stain." in again.list_constraints("brick")


def test_remove_constraint_by_singular_and_whole_field(session: ChatSession) -> None:
    session.add_constraint("brick", "exclude_types", "cracks")
    session.add_constraint("brick", "exclude_types", "holes")
    session.add_constraint("brick", "size_min", "0.01")
    session.remove_constraint("brick", "exclude_types", "crack")
    assert session.constraints_of("brick").exclude_types == ["hole"]
    session.remove_constraint("brick", "size_min")
    assert session.constraints_of("brick") == Constraints(exclude_types=["hole"])
    with pytest.raises(ToolError, match="has no size_max"):
        session.remove_constraint("brick", "size_max")
    with pytest.raises(ToolError, match="holds no 'stain'"):
        session.remove_constraint("brick", "exclude_types", "stain")


def test_propose_under_exclusion_never_returns_the_type(session: ChatSession) -> None:
    session.propose("washer", 16)
    before = {p.spec.defect_type for p in session.last_proposals("washer")}
    assert before & {"scratch", "crack"}  # the exclusion below has something to remove
    session.add_constraint("washer", "exclude_types", "scratches")
    session.add_constraint("washer", "exclude_types", "crack")
    out = session.propose("washer", 16)
    proposals = session.last_proposals("washer")
    assert len(proposals) == 16
    assert {p.spec.defect_type for p in proposals}.isdisjoint({"scratch", "crack"})
    assert out.splitlines()[0] == "16 proposal(s) for washer:"
    assert [line.split(".")[0] for line in out.splitlines()[1:17]] == [str(k) for k in range(1, 17)]
    assert out.splitlines()[-1].startswith("rejected replies:") and "constraint_" not in out


def test_propose_asks_again_and_counts_rejections_by_reason(tmp_path: Path) -> None:
    good = WASHER_SPEC
    proposer = ScriptedProposer(["not json", good, WASHER_SPEC.replace('"rust"', '"stain"')], [good, good])
    session = ChatSession(
        RunConfig(), prompts_path=tmp_path / "p.yaml", preview_dir=tmp_path, proposer=proposer
    )
    out = session.propose("wash", 3)
    assert proposer.asked == [3, 2]
    assert len(session.last_proposals("washer")) == 3
    assert "rejected replies: 4 (bad_size 2, not_json 1, unknown_type 1)" in out
    assert (
        '1. rust at top-left, size 1% of the object, spot, colour, severity 0.5: "rust spot on the metal"'
        in out
    )


def test_preview_writes_renders_and_overlays(session: ChatSession, tmp_path: Path) -> None:
    out = session.preview("washer", 2)
    assert "2 proposal(s) for washer" in out  # nothing proposed before, so it proposed first
    for k in (1, 2):
        image_path = tmp_path / "preview" / f"washer-{k}.png"
        overlay_path = tmp_path / "preview" / f"washer-{k}-overlay.png"
        assert str(image_path) in out and str(overlay_path) in out
        image, overlay = load_rgb(image_path), load_rgb(overlay_path)
        mask = load_mask(tmp_path / "preview" / f"washer-{k}-mask.png")
        assert image.shape == overlay.shape == (128, 128, 3) and mask.shape == (128, 128)
        assert mask.any()
        assert (overlay != image).any(axis=2)[mask].all()
        far = ~binary_dilation(mask, iterations=2)
        assert (overlay[far] == image[far]).all()
    assert not (tmp_path / "preview" / "washer-3.png").exists()


def test_preview_lists_render_failures_with_their_reason(session: ChatSession, monkeypatch) -> None:
    class Failing:
        name = "procedural"

        def render(self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator) -> None:
            raise RenderError("no_foreground", "nothing to draw on")

    monkeypatch.setattr(session, "_render_stage", lambda: {"procedural": Failing()})
    out = session.preview("washer", 1)
    assert "1. " in out and "render failed (render:no_foreground; tried procedural:no_foreground)" in out


def test_approve_adds_examples(session: ChatSession) -> None:
    session.propose("washer", 3)
    last = session.last_proposals("washer")
    assert "approved 2 new example(s) for washer (1, 3); 2 in all" in session.approve("washer", [1, 3])
    session.approve("washer", [3])  # already approved: no duplicate
    examples = session.prompt_set.examples["washer"]
    assert len(examples) == 2
    for text, proposal in zip(examples, (last[0], last[2]), strict=True):
        assert DefectSpec.from_text(text, "washer") == proposal.spec
    with pytest.raises(ToolError, match="no proposal 4"):
        session.approve("washer", [4])
    with pytest.raises(ToolError, match="nothing proposed for brick"):
        session.approve("brick", [1])


def _candidate(k: int, index: int, label: str, hardness: float | None, image: str | None) -> dict:
    return {
        "id": f"{k}-washer-{index:04d}",
        "iteration": k,
        "category": "washer",
        "prompt": "p",
        "text": f"text {index}\nsecond line",
        "spec": None,
        "source_id": "washer/000",
        "renderer": "procedural",
        "image": image,
        "mask": None,
        "verdicts": {},
        "hardness": hardness,
        "hardness_judge": None,
        "label": label,
        "label_judge": None,
        "reason": "",
        "render_info": {},
    }


def test_run_stats_reads_iterations_and_the_hardest_candidates(tmp_path: Path, session: ChatSession) -> None:
    run = RunDir.open(RunConfig(out=str(tmp_path / "runs"), name="r"))
    for k, hardness in ((1, (0.5, -1.2)), (2, (0.9, 0.1))):
        folder = run.iteration_dir(k)
        rows = [
            _candidate(k, 0, "hard" if hardness[0] > 0 else "easy", hardness[0], f"images/{k}-0.png"),
            _candidate(k, 1, "hard" if hardness[1] > 0 else "easy", hardness[1], f"images/{k}-1.png"),
            _candidate(k, 2, "rejected", None, None),
        ]
        save_rgb(folder / "images" / f"{k}-0.png", np.zeros((8, 8, 3), np.uint8))
        write_candidates(folder, rows)
        stats = {
            "iteration": k,
            "proposals": 3,
            "kept": 2,
            "hard_share": 0.5 * k,
            "hard_share_judge": None,
            "parse_failures": k,
            "rejections": {"parse:not_json": k},
            "parse_retries": 3 * k,
            "retried": 2 * k,
            "retry_reasons": {"not_json": 2 * k, "bad_size": k},
        }
        atomic_write_json(folder / "stats.json", stats)
    session.run_dir = run.path
    lines = session.run_stats(top=2).splitlines()
    assert lines[0] == (
        "iteration 1: 3 proposals, 2 kept, hard share 0.50 (fixed judge -), 1 parse failures (not_json 1), "
        "3 retries on 2 proposals (bad_size 1, not_json 2)"
    )
    assert lines[1].startswith("iteration 2: 3 proposals, 2 kept, hard share 1.00")
    assert lines[1].endswith(", 6 retries on 4 proposals (bad_size 2, not_json 4)")
    assert lines[2] == "hardest 2 of 4 kept candidates:"
    assert lines[3] == "1. hardness 0.900 (hard), iteration 2, washer: text 0 second line"
    assert lines[4].strip() == str(run.iteration_dir(2) / "images/2-0.png")
    assert lines[5].startswith("2. hardness 0.500 (hard), iteration 1")
    assert len(lines) == 7


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_run_stats_refuses_image_paths_outside_the_run(
    tmp_path: Path, session: ChatSession, where: str
) -> None:
    run = RunDir.open(RunConfig(out=str(tmp_path / "runs"), name="r"))
    folder = run.iteration_dir(1)
    outside = tmp_path / "outside.png"
    save_rgb(outside, np.zeros((8, 8, 3), np.uint8))
    image = {"dotdot": "../../../../outside.png", "absolute": str(outside), "symlink": "images/link.png"}[
        where
    ]
    if where == "symlink":
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "images" / "link.png").symlink_to(outside)
    assert (run.path / "iterations" / "1" / image).resolve() == outside.resolve()  # each one leads out
    write_candidates(folder, [_candidate(1, 0, "hard", 0.5, image), _candidate(1, 1, "easy", -0.5, None)])
    session.run_dir = run.path
    out = session.call("run_stats", top=2)
    assert (
        out.startswith("error: candidate 1-washer-0000 of iteration 1: refusing to use ") and "\n" not in out
    )
    assert "it lies outside" in out
    # a row whose image stays inside is listed as before
    write_candidates(folder, [_candidate(1, 0, "hard", 0.5, "images/../images/1-0.png")])
    assert session.run_stats(top=1).splitlines()[-1].strip() == str(folder / "images/../images/1-0.png")


def test_call_turns_bad_input_into_one_line_errors(session: ChatSession) -> None:
    cases = [
        ("nope", {}, "error: unknown tool 'nope'"),
        ("propose", {"category": "bottle"}, "error: unknown category 'bottle' (known: brick, washer)"),
        ("propose", {"category": "washer", "n": 99}, "error: n must be a whole number from 1 to 16"),
        ("propose", {"categroy": "washer"}, "error: bad arguments for propose"),
        (
            "add_constraint",
            {"category": "washer", "field": "colour", "value": "x"},
            "error: unknown constraint",
        ),
        (
            "add_constraint",
            {"category": "w", "field": "size_max", "value": "big"},
            "error: size_max must be a",
        ),
        (
            "add_constraint",
            {"category": "washer", "field": "size_max", "value": "80%"},
            "error: constraint size_max must be in [0.0005, 0.5], got 0.8",
        ),
        (
            "add_constraint",
            {"category": "washer", "field": "exclude_types", "value": "stains"},
            "error: washer has no defect type like 'stains' (known: scratch, dent, rust",
        ),
        (
            "add_constraint",
            {"category": "washer", "field": "regions", "value": "inside"},
            "error: regions: 'inside' is not one of anywhere",
        ),
        ("approve", {"category": "washer", "numbers": [1]}, "error: nothing proposed for washer yet"),
        ("remove_constraint", {"category": "washer", "field": "notes"}, "error: washer has no notes"),
        ("run_stats", {}, "error: no run directory"),
    ]
    for tool, arguments, start in cases:
        out = session.call(tool, **arguments)
        assert out.startswith(start) and "\n" not in out, (tool, out)
    assert session.prompt_set.constraints.get("washer", Constraints()).empty


def test_constraints_that_leave_nothing_are_refused(session: ChatSession) -> None:
    session.add_constraint("washer", "only_types", "rust")
    out = session.call("add_constraint", category="washer", field="regions", value="center")
    assert out == "error: the constraints leave no defect type to propose for 'washer'"
    assert session.constraints_of("washer") == Constraints(only_types=["rust"])


def test_categories_resolve_by_prefix_plural_and_case(session: ChatSession) -> None:
    assert session.resolve_category("Wash") == "washer"
    assert session.resolve_category("washers") == "washer"
    assert session.resolve_category("BRICK") == "brick"
    with pytest.raises(ToolError, match="no category in focus"):
        session.resolve_category(None)
    session.show_knowledge("b")
    assert session.category == "brick"
    session.add_constraint("*", "severity_max", "0.5")
    assert session.category == "brick" and ALL in session.prompt_set.constraints
    assert session.match_types(ALL, "chips") == ["chip", "edge_chip"]
