"""Render shards without launching: keeping a render, writing shards, merging them back, refusing bad ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kka_synth.runs import RunError, write_jsonl
from kka_synth.synth.base import RenderOutput
from kka_synth.synth.shards import (
    RENDERED,
    keep_render,
    merge_shards,
    remove_shards,
    shard_path,
    write_shard,
)
from kka_synth.synth.stage import RenderJob, RenderResult
from kka_synth.types import DefectSpec

FIT_IDS = ["brick/000", "brick/001", "brick/002"]
SPEC = DefectSpec("brick", "crack", "a thin crack", (0.1, 0.1, 0.6, 0.6), 0.02, "crack", "darker", 0.5)


def _records() -> list[dict[str, Any]]:
    """Four candidates as the render stage starts them; key 2 failed to parse, so it is no job."""
    out = []
    for i in range(4):
        spec = None if i == 2 else SPEC.to_dict()
        out.append(
            {
                "id": f"1-brick-{i:04d}",
                "spec": spec,
                "source_id": FIT_IDS[0],
                "renderer": "",
                "image": None,
                "mask": None,
                "reason": "" if spec else "parse:not_json",
                "render_info": {},
            }
        )
    return out


def _result(key: int, rendered: bool = True, mask: bool = True, source: int | None = None) -> RenderResult:
    rng = np.random.default_rng(key)
    job = RenderJob(key, "brick", SPEC, source=1, rng=rng, order=["procedural"], tried=["procedural"])
    if not rendered:
        job.errors.append("procedural:no_foreground")
        return RenderResult(job, None, "")
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    drawn = rng.random((16, 16)) > 0.5 if mask else None
    return RenderResult(job, RenderOutput(image, drawn, source=source, info={"seed": key}), "procedural")


# (key, rendered, mask, source): rank 0 renders jobs 0 and 1, rank 1 renders job 3 (which fails)
PLAN = [[(0, True, True, None), (1, True, False, 2)], [(3, False, True, None)]]


def _render_shards(folder: Path) -> tuple[list[dict[str, Any]], dict[int, Any]]:
    """Render PLAN as two processes would: each keeps its renders in its own copy of the records and writes
    its shard. Returns the records and kept renders of a one-process render of the same jobs."""
    alone, kept_alone = _records(), {}
    for rank, plan in enumerate(PLAN):
        out, kept = _records(), {}
        results = [_result(*job) for job in plan]
        for result in results:
            rendered = keep_render(folder, out[result.job.key], result, FIT_IDS)
            if rendered is not None:
                kept[result.job.key] = rendered
            again = keep_render(folder, alone[result.job.key], result, FIT_IDS)
            if again is not None:
                kept_alone[result.job.key] = again
        write_shard(folder, rank, results, out, kept)
    return alone, kept_alone


def test_keep_render_fills_the_record_and_saves_files(tmp_path: Path):
    record = _records()[0]
    result = _result(0)
    source, image, mask = keep_render(tmp_path, record, result, FIT_IDS)
    assert source == 1 and record["source_id"] == "brick/001"  # the job's own source
    assert record["image"] == "images/1-brick-0000.png" and record["mask"] == "masks/1-brick-0000.png"
    assert record["renderer"] == "procedural" and record["reason"] == ""
    assert record["render_info"] == {"tried": ["procedural"], "errors": [], "seed": 0}
    assert (tmp_path / record["image"]).is_file() and (tmp_path / record["mask"]).is_file()
    assert image is result.output.image and mask is result.output.mask


def test_keep_render_without_mask_and_with_the_renderers_source(tmp_path: Path):
    record = _records()[1]
    source, _, mask = keep_render(tmp_path, record, _result(1, mask=False, source=2), FIT_IDS)
    assert source == 2 and record["source_id"] == "brick/002"
    assert mask is None and record["mask"] is None and not (tmp_path / "masks").exists()


def test_keep_render_of_a_failure_records_the_reason(tmp_path: Path):
    record = _records()[3]
    assert keep_render(tmp_path, record, _result(3, rendered=False), FIT_IDS) is None
    assert record["reason"] == "render:no_foreground" and record["image"] is None
    assert record["render_info"] == {"tried": ["procedural"], "errors": ["procedural:no_foreground"]}
    assert not (tmp_path / "images").exists()


def test_merge_of_two_shards_equals_one_process(tmp_path: Path):
    alone, kept_alone = _render_shards(tmp_path)
    out = _records()
    kept = merge_shards(1, tmp_path, out, 2)
    assert out == alone  # every rendered field folded back, the parse failure untouched
    assert list(kept) == [0, 1] == sorted(kept_alone)  # in key order; the failed job is not kept
    for key, (source, image, mask) in kept.items():
        want_source, want_image, want_mask = kept_alone[key]
        assert source == want_source and image.dtype == np.uint8
        assert np.array_equal(image, want_image)  # read back from the saved PNG, bit for bit
        assert (mask is None) == (want_mask is None)
        assert mask is None or (mask.dtype == bool and np.array_equal(mask, want_mask))


def test_shard_lines_carry_key_source_and_rendered_fields(tmp_path: Path):
    _render_shards(tmp_path)
    first = shard_path(tmp_path, 0).read_text().splitlines()
    assert len(first) == 2 and shard_path(tmp_path, 1).is_file()
    entry = json.loads(first[0])
    assert list(entry) == ["key", "source", *RENDERED]
    assert (entry["key"], entry["source"]) == (0, 1)
    failed = json.loads(shard_path(tmp_path, 1).read_text())
    assert failed["source"] is None and failed["image"] is None and failed["reason"] == "render:no_foreground"


def _entry(key: int) -> dict[str, Any]:
    entry = {"key": key, "source": None, "source_id": FIT_IDS[0], "renderer": "", "render_info": {}}
    return entry | {"reason": "render:none", "image": None, "mask": None}


@pytest.mark.parametrize(
    ("ranks", "counts"),
    [
        ([[0], [3]], "1 job(s) missing, 0 rendered more than once, 0 unknown"),
        ([[0, 1], [1, 3]], "0 job(s) missing, 1 rendered more than once, 0 unknown"),
        ([[0, 1], [3, 2]], "0 job(s) missing, 0 rendered more than once, 1 unknown"),  # 2 is no job
        ([[0, 1, 7], [3]], "0 job(s) missing, 0 rendered more than once, 1 unknown"),  # past the end
        ([[0, 0], [3]], "1 job(s) missing, 1 rendered more than once, 0 unknown"),
    ],
)
def test_shards_that_do_not_add_up_are_refused(tmp_path: Path, ranks: list[list[int]], counts: str):
    for rank, keys in enumerate(ranks):
        write_jsonl(shard_path(tmp_path, rank), [_entry(key) for key in keys])
    out = _records()
    before = copy.deepcopy(out)
    with pytest.raises(RunError) as error:
        merge_shards(4, tmp_path, out, len(ranks))
    message = str(error.value)
    assert "\n" not in message
    assert message == f"iteration 4: the render shards in {tmp_path / 'shards'} do not add up: {counts}"
    assert out == before  # refused before any record changed


def test_shards_that_add_up_with_every_render_failed(tmp_path: Path):
    for rank, keys in enumerate([[0, 1], [3], []]):  # a third process with nothing to do
        write_jsonl(shard_path(tmp_path, rank), [_entry(key) for key in keys])
    out = _records()
    assert merge_shards(4, tmp_path, out, 3) == {}
    assert [r["reason"] for r in out] == ["render:none", "render:none", "parse:not_json", "render:none"]


def test_a_missing_shard_is_refused(tmp_path: Path):
    write_jsonl(shard_path(tmp_path, 0), [_entry(key) for key in (0, 1, 3)])
    with pytest.raises(RunError, match="render shard .*render-1.jsonl is missing") as error:
        merge_shards(1, tmp_path, _records(), 2)
    assert "\n" not in str(error.value)


def test_stale_shards_of_a_run_with_more_processes_are_not_read_and_are_removed(tmp_path: Path):
    """A killed four-process run left render-0..3; a two-process render rewrites 0 and 1, reads only those,
    and the stale 2 and 3 (which would count jobs twice and name unknown ones) go with the folder."""
    write_jsonl(shard_path(tmp_path, 2), [_entry(0), _entry(0), {"key": 99, "stale": True}])
    write_jsonl(shard_path(tmp_path, 3), [{"key": 1, "stale": True}])
    alone, _ = _render_shards(tmp_path)
    out = _records()
    assert list(merge_shards(1, tmp_path, out, 2)) == [0, 1]
    assert out == alone
    with pytest.raises(RunError, match="rendered more than once, 1 unknown"):
        merge_shards(1, tmp_path, _records(), 4)  # the same files, read as four processes' shards
    remove_shards(tmp_path)
    assert not (tmp_path / "shards").exists()
    assert (tmp_path / "images").is_dir()  # only the shards go
    remove_shards(tmp_path)  # nothing left to remove: no error


@pytest.mark.parametrize("path", ["../../outside.png", "/etc/hostname"])
def test_a_shard_path_leading_out_of_the_iteration_is_refused(tmp_path: Path, path: str):
    folder = tmp_path / "iterations" / "1"
    _render_shards(folder)
    (tmp_path / "outside.png").write_bytes((folder / "images" / "1-brick-0000.png").read_bytes())
    lines = shard_path(folder, 0).read_text().splitlines()
    entry = json.loads(lines[0])
    entry["image"] = path
    shard_path(folder, 0).write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    with pytest.raises(RunError, match="lies outside") as error:
        merge_shards(1, folder, _records(), 2)
    assert "\n" not in str(error.value)
