"""The KKA loop, stage by stage and resumable.

One iteration (KKA, "Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs",
arXiv 2502.14880, with the render filters of arXiv 2512.23227)::

    propose   the proposer writes defect specs per category            -> proposals.jsonl
    render    each spec is drawn on a normal image, filters judge it   -> images/, masks/, candidates.parquet
    evaluate  Deep SAD, refit on this iteration, scores hardness       -> candidates.parquet (hardness, label)
    align     preference pairs per prompt, DPO with a LoRA adapter     -> pairs.jsonl, adapters/<k>/
    stats     counts, hard share, diversity, seconds per stage         -> stats.json

A prompt set saved by `kka-synth chat` (``RunConfig.prompts``) is copied into the run directory: its
constraints go into every proposal request (prompt lines, and a hard check on what comes back) and its
approved specs join the run's earlier hard specs as few-shot examples. A proposer that cannot be trained (an
OpenAI-compatible endpoint) skips the align stage with a note in the stats.

Before the first iteration, ``prepare`` calibrates the match-count band per category and fits a fixed judge
(a Deep SAD trained once on normals and rule-based Perlin anomalies, never refit): the refit evaluator moves
with the data it sees, so the hard share is also reported under the judge, whose goalposts stay put.
After the last iteration the curated set is written in MVTec AD layout: KKA's ``add`` mode keeps the union of
every iteration's hard set, ``rep`` keeps the last one.

Every stage is written atomically and marked done in the manifest; a resumed run skips finished stages,
reloads what they wrote and redoes only the stage that was cut off. Every random choice draws from a
generator seeded by (run seed, iteration, stage, category), so a redone stage repeats itself exactly.

Under ``accelerate launch --num_processes N`` (several GPUs or nodes, one run directory on a shared file
system) the render stage is split over the processes: each renders a contiguous share of the jobs on its own
device and writes its images, masks and render shard (:mod:`kka_synth.synth.shards`); the main process merges
the shards, runs the filters (the batch band needs a category's whole batch) and writes
``candidates.parquet``, which equals a one-process render. Render shards a killed run left behind are
removed by the next render stage, whatever its number of processes. DPO trains in every process (TRL
shards the batches); every other stage, and every write to the manifest, happens on the main process while
the others wait and then reread the manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.agents import PromptSet, ProposalContext, build_proposer
from kka_synth.alignment.hardness import JudgeEvaluator, cross_fit_hardness
from kka_synth.alignment.pairs import build_pairs
from kka_synth.config import RunConfig
from kka_synth.data import DataError, load_rgb, load_samples, save_mask, save_rgb
from kka_synth.data import load_mask as read_mask
from kka_synth.eval.iteration_stats import summarize_iteration
from kka_synth.prompts.knowledge import load_knowledge, read_user_knowledge
from kka_synth.runs import (
    RunDir,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    inside,
    read_candidates,
    read_jsonl,
    safe_component,
    write_candidates,
    write_jsonl,
)
from kka_synth.synth import RENDERERS, RenderError, apply_filters_batch, build_filters
from kka_synth.synth.filters import MatchBand, band_from_dict, build_band
from kka_synth.synth.perlin import random_spec
from kka_synth.synth.shards import Kept, keep_render, merge_shards, remove_shards, write_shard
from kka_synth.synth.stage import RenderJob, build_renderers, render_jobs, renderer_order
from kka_synth.types import Candidate, DefectSpec, PreferencePair, Proposal
from kka_synth.utils import dist

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""Called as ``progress(task, done, total)``; the CLI draws bars from it."""

STAGES = ("propose", "render", "evaluate", "align")
MIN_NORMALS = 8
"""Fewest normal training images a category needs: some fit the models, some are held out to calibrate."""
_STAGE_INDEX = {name: i for i, name in enumerate(("prepare", *STAGES, "judge"))}


def _silent(task: str, done: int, total: int) -> None:
    return None


@dataclass
class CategoryData:
    """A category's normal images at the loop's size: ``fit`` trains models, ``holdout`` calibrates them."""

    name: str
    fit: list[np.ndarray]
    fit_ids: list[str]
    holdout: list[np.ndarray]
    knowledge: Any
    band: MatchBand | None = None
    judge: JudgeEvaluator | None = None
    caption: str | None = None


class KKALoop:
    """Runs a configured KKA loop in a run directory."""

    def __init__(self, run: RunDir, progress: Progress | None = None):
        self.run = run
        self.config: RunConfig = run.config
        self.progress = progress or _silent
        self.categories: dict[str, CategoryData] = {}
        self.proposer: Any = None
        self.prompt_set = PromptSet()
        self._built_renderers: dict[str, Any] | None = None

    # helpers -----------------------------------------------------------------------------------------
    def _rng(self, iteration: int, stage: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, iteration, _STAGE_INDEX[stage], *extra])

    def _seed(self, iteration: int, stage: str, *extra: int) -> int:
        return int(self._rng(iteration, stage, *extra).integers(2**31 - 1))

    # prepare -----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load normals, build the proposer, calibrate the filters and fit the fixed judges.

        Each is cheap to redo or reloaded from the run directory, so a resumed run calls this again. Under
        ``accelerate launch`` the main process prepares while the others wait; they then load only what
        rendering a shard needs (the normals and the renderers).
        """
        dist.on_main(self._prepare)
        main = dist.world().is_main
        if not main:
            self.run = RunDir.load(self.run.path)
        with dist.together():
            if not main:
                self._load_categories()
                if self._renders_left():
                    self._renderers()

    def _prepare(self) -> None:
        cfg = self.config
        started = time.perf_counter()
        names = self._load_categories()
        calibration_path = self.run.path / "calibration.json"
        calibration = {}
        if calibration_path.is_file():
            calibration = json.loads(calibration_path.read_text())
        self.prompt_set = self._load_prompt_set()
        self.proposer = build_proposer(cfg.proposer, seed=cfg.seed, knowledge_file=cfg.data.knowledge)
        self._captions()
        for k in range(1, cfg.iterations + 1):
            if (
                self.run.stage_done(f"{k}/align")
                and (self.run.adapter_dir(k) / "adapter_config.json").is_file()
            ):
                self.proposer.apply_adapter(self.run.adapter_dir(k))
        for index, (name, data) in enumerate(self.categories.items()):
            if cfg.filters.match_band:
                if name in calibration:
                    data.band = band_from_dict(calibration[name], cfg.filters)
                else:
                    self.progress(f"calibrating the match band ({name})", 0, 1)
                    data.band = build_band(cfg.filters)
                    data.band.calibrate(data.fit + data.holdout, self._rng(0, "prepare", index, 1))
                    self.progress(f"calibrating the match band ({name})", 1, 1)
                    calibration[name] = data.band.to_dict()
        atomic_write_json(calibration_path, calibration)
        if self._renders_left():
            self._renderers()  # a missing diffusion model fails here, before any judge is trained
        self._prepare_judges()
        if not self.run.stage_done("prepare"):
            self.run.mark_done("prepare", time.perf_counter() - started, categories=names)

    def _renders_left(self) -> bool:
        return not all(self.run.stage_done(f"{k}/render") for k in range(1, self.config.iterations + 1))

    def _load_categories(self) -> list[str]:
        """Read each category's normals and split them into fit and holdout (seeded); returns the names."""
        cfg = self.config
        if cfg.data.dataset == "mvtec_ad" and cfg.data.root and Path(cfg.data.root).is_dir():
            # an existing empty folder asks for the download; a missing one is more likely a typo
            from kka_synth.data.download import ensure_mvtec_ad

            ensure_mvtec_ad(cfg.data.root, cfg.data.categories or None, progress=self.progress)
        samples = load_samples(
            cfg.data.dataset, cfg.data.root, cfg.data.categories or None, columns=cfg.data.hf_columns
        )
        user_knowledge = read_user_knowledge(cfg.data.knowledge)
        names = sorted({s.category for s in samples})
        for index, name in enumerate(names):
            good = sorted(
                (s for s in samples if s.category == name and s.split == "train" and s.label == 0),
                key=lambda s: str(s.image_path),
            )
            if len(good) < MIN_NORMALS:
                raise DataError(
                    f"category {name!r} has {len(good)} normal training images; "
                    f"at least {MIN_NORMALS} are needed"
                )
            order = self._rng(0, "prepare", index).permutation(len(good))
            n_hold = max(2, round(len(good) * cfg.data.holdout))
            hold = [good[i] for i in order[:n_hold]]
            fit = [good[i] for i in sorted(order[n_hold:])]
            self.progress(f"loading {name}", 0, len(good))
            data = CategoryData(
                name=name,
                fit=[load_rgb(s.image_path, cfg.data.image_size) for s in fit],
                fit_ids=[f"{name}/{Path(s.image_path).stem}" for s in fit],
                holdout=[load_rgb(s.image_path, cfg.data.image_size) for s in hold],
                knowledge=load_knowledge(
                    name, None if cfg.data.dataset == "folder" else cfg.data.dataset, extra=user_knowledge
                ),
            )
            self.progress(f"loading {name}", len(good), len(good))
            self.categories[name] = data
        return names

    def _load_prompt_set(self) -> PromptSet:
        """The run's prompt set: copied into the run directory on first use, so a resumed run keeps it."""
        stored = self.run.path / "prompts.yaml"
        if stored.is_file():
            return PromptSet.load(stored)
        if self.config.prompts is None:
            return PromptSet()
        prompt_set = PromptSet.load(self.config.prompts)
        if prompt_set.dataset not in (None, self.config.data.dataset):
            logger.warning(
                "prompt set %s was made for dataset %s, this run uses %s",
                self.config.prompts,
                prompt_set.dataset,
                self.config.data.dataset,
            )
        for name in self.categories:
            prompt_set.for_category(name).narrow(self.categories[name].knowledge)  # fails now, not later
        atomic_write_text(stored, Path(self.config.prompts).read_text())
        return prompt_set

    def _captions(self) -> None:
        """A vision-language caption of one normal image per category, when ``proposer.caption`` asks."""
        cfg = self.config.proposer
        if not cfg.caption:
            return
        if cfg.backend == "compact":
            logger.warning("proposer.caption is ignored by the compact proposer, which reads no prompt text")
            return
        path = self.run.path / "captions.json"
        captions = json.loads(path.read_text()) if path.is_file() else {}
        missing = [name for name in self.categories if name not in captions]
        if missing:
            from kka_synth.agents.caption import Captioner

            captioner = Captioner(cfg.caption_model, device=cfg.device)
            for name in missing:
                self.progress(f"captioning {name}", 0, 1)
                captions[name] = captioner.caption(self.categories[name].fit[0], name)
                self.progress(f"captioning {name}", 1, 1)
            atomic_write_json(path, captions)
        for name, data in self.categories.items():
            data.caption = captions[name]

    def _prepare_judges(self) -> None:
        perlin = RENDERERS["perlin"]()
        for index, (name, data) in enumerate(self.categories.items()):
            folder = self.run.path / "judges" / safe_component(name)
            if (folder / "judge.json").is_file():
                data.judge = JudgeEvaluator.load(folder)
                continue
            rng = self._rng(0, "judge", index)
            images, masks = [], []
            types = list(data.knowledge.defect_types)
            for i in range(len(data.fit)):
                spec = random_spec(name, types, rng)
                try:
                    image, mask = perlin.render(data.fit[i], spec, rng)
                except RenderError:
                    continue
                images.append(image)
                masks.append(mask)
            self.progress(f"fitting judge for {name}", 0, 1)
            judge = JudgeEvaluator(self.config.evaluator, seed=self._seed(0, "judge", index))
            judge.fit(data.fit, images, masks, data.holdout)
            with atomic_dir(folder) as tmp:
                judge.save(tmp)
            data.judge = judge
            self.progress(f"fitting judge for {name}", 1, 1)

    # one iteration -----------------------------------------------------------------------------------
    def iterate(self, k: int) -> dict[str, Any]:
        """Run (or finish) iteration ``k``; returns its stats."""
        folder = self.run.iteration_dir(k)
        if self.run.stage_done(f"{k}/stats"):
            return json.loads((folder / "stats.json").read_text())
        seconds: dict[str, float] = dict(self.run.stage_seconds(f"{k}/"))
        for stage in STAGES:
            if self.run.stage_done(f"{k}/{stage}"):
                continue
            started = time.perf_counter()
            work = getattr(self, f"_{stage}")
            # render and align run in every process (each returns its info on the main one); the rest on main
            info = (work(k, folder) if stage in ("render", "align") else dist.on_main(work, k, folder)) or {}
            seconds[stage] = time.perf_counter() - started
            self._mark_done(f"{k}/{stage}", seconds[stage], **info)
        stats = dist.on_main(self._write_stats, k, folder, seconds)
        self._mark_done(f"{k}/stats", 0.0)
        return stats if stats is not None else json.loads((folder / "stats.json").read_text())

    def _mark_done(self, key: str, seconds: float, **info: Any) -> None:
        """Mark a stage done in the manifest (the main process writes it, the others then reread it)."""
        dist.on_main(self.run.mark_done, key, seconds, **info)
        if not dist.world().is_main:
            self.run = RunDir.load(self.run.path)

    def _propose(self, k: int, folder: Path) -> dict[str, Any]:
        rows = []
        examples = self._hard_examples(k)
        for index, (name, data) in enumerate(self.categories.items()):
            context = ProposalContext(
                category=name,
                knowledge=data.knowledge,
                # the user's approved examples last, so a backend that shows only the latest few keeps them
                examples=examples.get(name, []) + self.prompt_set.examples.get(name, []),
                constraints=self.prompt_set.for_category(name),
                caption=data.caption,
            )
            self.progress(f"iteration {k}: proposing ({name})", 0, 1)
            proposals = self.proposer.propose(
                context, self.config.proposals_per_iteration, seed=self._seed(k, "propose", index)
            )
            rows.extend({"category": name, **p.to_dict()} for p in proposals)
            self.progress(f"iteration {k}: proposing ({name})", 1, 1)
        write_jsonl(folder / "proposals.jsonl", rows)
        return {"proposals": len(rows)}

    def _hard_examples(self, k: int) -> dict[str, list[str]]:
        """Texts of earlier hard candidates per category (few-shot context for proposers that use it)."""
        examples: dict[str, list[str]] = {}
        for j in range(1, k):
            path = self.run.iteration_dir(j) / "candidates.parquet"
            if path.is_file():
                for row in read_candidates(path.parent):
                    if row["label"] == "hard":
                        examples.setdefault(row["category"], []).append(row["text"])
        return examples

    def _render(self, k: int, folder: Path) -> dict[str, Any]:
        rows = read_jsonl(folder / "proposals.jsonl")
        cfg = self.config
        renderers = self._renderers()
        cat_index = {name: i for i, name in enumerate(self.categories)}
        out, jobs = [], []
        for i, row in enumerate(rows):
            name = row["category"]
            data = self.categories[name]
            proposal = Proposal.from_dict({key: row[key] for key in ("prompt", "text", "spec", "error")})
            rng = self._rng(k, "render", cat_index[name], i)
            source = int(rng.integers(len(data.fit)))
            out.append(
                {
                    "id": f"{k}-{name}-{i:04d}",
                    "iteration": k,
                    "category": name,
                    "prompt": proposal.prompt,
                    "text": proposal.text,
                    "spec": None if proposal.spec is None else proposal.spec.to_dict(),
                    "source_id": data.fit_ids[source],
                    "renderer": "",
                    "image": None,
                    "mask": None,
                    "verdicts": {},
                    "hardness": None,
                    "hardness_judge": None,
                    "label": "rejected",
                    "label_judge": None,
                    "reason": "" if proposal.spec is not None else f"parse:{proposal.error}",
                    "render_info": {},
                }
            )
            if proposal.spec is not None:
                order = renderer_order(
                    cfg.render.renderers, cfg.render.weights, self._rng(k, "render", cat_index[name], i, 1)
                )
                jobs.append(RenderJob(i, name, proposal.spec, source, rng, order))
        world = dist.world()
        kept: dict[int, Kept] = {}
        with dist.together():
            results = render_jobs(
                dist.shard(jobs),
                renderers,
                {name: data.fit for name, data in self.categories.items()},
                progress=lambda done, total: self.progress(f"iteration {k}: rendering", done, total),
            )
            for result in results:
                fit_ids = self.categories[result.job.category].fit_ids
                rendered = keep_render(folder, out[result.job.key], result, fit_ids)
                if rendered is not None:
                    kept[result.job.key] = rendered
            if world.size > 1:
                write_shard(folder, world.rank, results, out, kept)
        if world.size > 1:
            return dist.on_main(self._merge_renders, k, folder, rows, out, world.size) or {}
        return self._judge_renders(k, folder, rows, out, kept)

    def _merge_renders(
        self, k: int, folder: Path, rows: list[dict[str, Any]], out: list[dict[str, Any]], size: int
    ) -> dict[str, Any]:
        """Main process: fold every process's render shard into ``out``, then filter and write as one."""
        return self._judge_renders(k, folder, rows, out, merge_shards(k, folder, out, size))

    def _judge_renders(
        self,
        k: int,
        folder: Path,
        rows: list[dict[str, Any]],
        out: list[dict[str, Any]],
        kept: dict[int, Kept],
    ) -> dict[str, Any]:
        """Run the filters over each category's renders (``kept``: key -> source, image, mask) and write.

        Main process only. Once the candidates are written, the iteration's render shards go: this render's
        own, or stale ones that a killed multi-process run left (a resume may use any number of processes).
        """
        cfg = self.config
        judged: dict[str, list[tuple[dict[str, Any], np.ndarray, Candidate]]] = {}
        for key, (source, image, mask) in kept.items():
            record = out[key]
            proposal = Proposal.from_dict(
                {field: rows[key][field] for field in ("prompt", "text", "spec", "error")}
            )
            candidate = Candidate(
                record["id"], k, proposal, record["source_id"], image, mask, record["renderer"]
            )
            data = self.categories[record["category"]]
            judged.setdefault(record["category"], []).append((record, data.fit[source], candidate))
        for name, items in judged.items():
            self.progress(f"iteration {k}: filtering ({name})", 0, 1)
            verdicts = apply_filters_batch(
                build_filters(cfg.filters, band=self.categories[name].band),
                [source for _, source, _ in items],
                [candidate for _, _, candidate in items],
                batch_band=cfg.filters.batch_band,
            )
            for (record, _, _), found in zip(items, verdicts, strict=True):
                record["verdicts"] = {
                    n: {"ok": v.ok, "score": float(v.score), "reason": v.reason} for n, v in found.items()
                }
                failed = [f"filter:{n}:{v.reason}" for n, v in found.items() if not v.ok]
                record["label"], record["reason"] = ("rejected", failed[0]) if failed else ("pending", "")
            self.progress(f"iteration {k}: filtering ({name})", 1, 1)
        self.progress(f"iteration {k}: rendering", len(rows), len(rows))
        write_candidates(folder, out)
        remove_shards(folder)
        return {"rendered": sum(r["image"] is not None for r in out)}

    def _foreground_masks(self) -> dict[str, np.ndarray]:
        """The user's foreground masks by category, at the loop's image size."""
        size = self.config.data.image_size
        return {name: read_mask(path, size) for name, path in self.config.render.foreground_masks.items()}

    def _renderers(self) -> dict[str, Any]:
        """The run's renderers, built once (diffusion pipelines load here)."""
        if self._built_renderers is None:
            negative = {name: data.knowledge.negative_prompt for name, data in self.categories.items()}
            self._built_renderers = build_renderers(
                self.config.render, RENDERERS, negative, self._foreground_masks()
            )
        return self._built_renderers

    def _evaluate(self, k: int, folder: Path) -> dict[str, Any]:
        rows = read_candidates(folder)
        for index, (name, data) in enumerate(self.categories.items()):
            kept = [r for r in rows if r["category"] == name and r["label"] != "rejected"]
            if not kept:
                continue
            self.progress(f"iteration {k}: scoring hardness ({name})", 0, 1)
            # paths come back from candidates.parquet: a tampered row may not lead out of the iteration
            images = [load_rgb(inside(folder, r["image"])) for r in kept]
            masks = [None if r["mask"] is None else read_mask(inside(folder, r["mask"])) for r in kept]
            result = cross_fit_hardness(
                data.fit,
                data.holdout,
                images,
                masks,
                self.config.evaluator,
                seed=self._seed(k, "evaluate", index),
            )
            judged = data.judge.hardness(images)
            for r, h, hard, hj, hard_j in zip(
                kept, result.hardness, result.hard, judged.hardness, judged.hard, strict=True
            ):
                r["hardness"], r["label"] = float(h), "hard" if hard else "easy"
                r["hardness_judge"], r["label_judge"] = float(hj), "hard" if hard_j else "easy"
            self.progress(f"iteration {k}: scoring hardness ({name})", 1, 1)
        write_candidates(folder, rows)
        return {"scored": sum(r["hardness"] is not None for r in rows)}

    def _align(self, k: int, folder: Path) -> dict[str, Any]:
        pairs, info, train = dist.broadcast(dist.on_main(self._pair_up, k, folder))
        if not train:
            return info
        from kka_synth.alignment.dpo import train_dpo

        world = dist.world()
        processes = self.config.alignment.processes
        if processes and world.size > 1:
            if world.is_main:
                logger.warning(
                    "alignment.processes is ignored under accelerate launch: DPO trains in the %d processes",
                    world.size,
                )
            processes = 0
        self.progress(f"iteration {k}: DPO", 0, 1)
        # every process trains into the main one's temporary folder (TRL shards the batches; only the main
        # process saves), and the main one renames it into place once all are done
        adapter = atomic_dir(self.run.adapter_dir(k)) if world.is_main else contextlib.nullcontext()
        with adapter as tmp:
            tmp = dist.broadcast(tmp)
            if processes:
                import torch

                from kka_synth.alignment.launch import run_workers

                result = run_workers(
                    self.run.path,
                    k,
                    tmp,
                    self._seed(k, "align"),
                    processes,
                    cpu=not torch.cuda.is_available(),
                )
            else:
                with dist.together():  # loading is where one process may fail alone: then all stop here
                    model, tokenizer, start = self._training_inputs(k)
                # TRL's own collectives run in here, so a process that fails ends the launch as a whole
                trained = train_dpo(
                    model,
                    tokenizer,
                    pairs,
                    self.config.alignment,
                    tmp,
                    seed=self._seed(k, "align"),
                    start_adapter=start,
                )
                result = {
                    key: getattr(trained, key)
                    for key in ("steps", "train_loss", "margin_before", "margin_after")
                }
            dist.barrier()
        if not world.is_main:
            return info
        self.proposer.apply_adapter(self.run.adapter_dir(k))
        self.progress(f"iteration {k}: DPO", 1, 1)
        losses = result["train_loss"]
        info.update(
            steps=result["steps"],
            margin_before=result["margin_before"],
            margin_after=result["margin_after"],
            loss=float(np.mean(losses)) if len(losses) else None,
            processes=processes or world.size,
        )
        return info

    def _training_inputs(self, k: int) -> tuple[Any, Any, Path | None]:
        """(model, tokenizer, adapter to continue) for DPO round ``k``: the proposer's own on the main
        process; the other processes, which hold no proposer, rebuild them from the run directory."""
        if dist.world().is_main:
            model, start = self.proposer.training_model()
            return model, self.proposer.tokenizer, start
        from kka_synth.alignment.launch import training_inputs

        return training_inputs(self.config, self.run.path, k)

    def _pair_up(self, k: int, folder: Path) -> tuple[list[PreferencePair], dict[str, Any], bool]:
        """Main process: this round's preference pairs (written to pairs.jsonl), its info, and whether DPO
        trains on them."""
        rows = read_candidates(folder)
        items = []
        for r in rows:
            spec = None if r["spec"] is None else DefectSpec.from_dict(r["spec"])
            items.append((Proposal(prompt=r["prompt"], text=r["text"], spec=spec), r["label"], r["hardness"]))
        pairs = build_pairs(
            items,
            self.config.alignment.pairs_per_prompt,
            self.config.alignment.max_pairs,
            self._rng(k, "align"),
            diversity_key=_diversity_key,
        )
        write_jsonl(folder / "pairs.jsonl", [p.__dict__ for p in pairs])
        info: dict[str, Any] = {"pairs": len(pairs)}
        if not self.config.alignment.enabled or not pairs:
            if self.config.alignment.enabled:
                logger.warning("iteration %d: no preference pairs, so no DPO round", k)
            return pairs, info, False
        if not getattr(self.proposer, "trainable", False):
            note = f"proposer backend {self.config.proposer.backend!r} is not trainable; DPO round skipped"
            logger.warning("iteration %d: %s", k, note)
            info["note"] = note
            return pairs, info, False
        return pairs, info, True

    # stats and curation ------------------------------------------------------------------------------
    def _write_stats(self, k: int, folder: Path, seconds: dict[str, float]) -> dict[str, Any]:
        stats = summarize_iteration(
            k,
            read_candidates(folder),
            read_jsonl(folder / "proposals.jsonl"),
            list(self.categories),
            self.run.manifest["stages"].get(f"{k}/align", {}),
            seconds,
            STAGES,
        )
        atomic_write_json(folder / "stats.json", stats)
        return stats

    def curate(self) -> dict[str, int]:
        """Write the curated hard set in MVTec AD layout (``add`` or ``rep`` mode) and an index."""
        iterations = range(1, self.config.iterations + 1)
        if self.config.mode == "rep":
            iterations = range(self.config.iterations, self.config.iterations + 1)
        index = []
        with atomic_dir(self.run.curated_dir) as tmp:
            for k in iterations:
                folder = self.run.iteration_dir(k)
                for r in read_candidates(folder):
                    if r["label"] != "hard":
                        continue
                    defect = r["spec"]["defect_type"]
                    # category and defect type come from data and specs: neither may lead out of the set
                    category, defect = safe_component(r["category"]), safe_component(defect)
                    image = tmp / category / "test" / defect / safe_component(f"{r['id']}.png")
                    save_rgb(image, load_rgb(inside(folder, r["image"])))
                    mask = None
                    if r["mask"] is not None:
                        mask = (
                            tmp / category / "ground_truth" / defect / safe_component(f"{r['id']}_mask.png")
                        )
                        save_mask(mask, read_mask(inside(folder, r["mask"])))
                    index.append(
                        {
                            "id": r["id"],
                            "iteration": k,
                            "source_id": r["source_id"],
                            "category": r["category"],
                            "defect_type": defect,
                            "image": str(image.relative_to(tmp)),
                            "mask": None if mask is None else str(mask.relative_to(tmp)),
                            "hardness": r["hardness"],
                            "text": r["text"],
                        }
                    )
            write_jsonl(tmp / "index.jsonl", index)
        counts = Counter(row["category"] for row in index)
        self.run.mark_done("curate", 0.0, mode=self.config.mode, counts=dict(counts))
        return dict(counts)


def _diversity_key(proposal: Proposal) -> object:
    """The diversity guard's groups: a spec's tone and shape (see alignment.pairs)."""
    return None if proposal.spec is None else (proposal.spec.tone, proposal.spec.shape)


def run_loop(
    config: RunConfig, resume: bool = False, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) the whole loop and curate; returns each iteration's stats.

    Under ``accelerate launch`` every process calls this: the main one opens the run directory and the
    others then load it (see the module notes for what runs where).
    """
    run = dist.on_main(RunDir.open, config, resume=resume)
    loop = KKALoop(run if run is not None else RunDir.load(config.run_dir), progress)
    loop.prepare()
    stats = [loop.iterate(k) for k in range(1, loop.config.iterations + 1)]
    dist.on_main(loop.curate)
    return stats


__all__ = ["KKALoop", "Progress", "read_candidates", "run_loop"]
