"""Publishing a run as a Hugging Face dataset: dry run, a push against a recording fake Hub, load, card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from PIL import Image

from kka_synth.config import DataConfig, RunConfig
from kka_synth.data import load_mask, load_rgb, save_mask, save_rgb
from kka_synth.hub import PublishError, load, publish
from kka_synth.hub_card import PLOT_PATH, resolve_license
from kka_synth.loop import KKALoop
from kka_synth.runs import RunDir, atomic_write_json, read_candidates, write_candidates

SECRET = "hf_publishtestsecret0123456789"
SIZE = 24
RUN_SEED = 7
# (category, label, renderer, has mask, render seed) per candidate, the same in both iterations
PLAN = [
    ("brick", "hard", "procedural", True, None),
    ("brick", "easy", "procedural", True, None),
    ("brick", "rejected", "procedural", True, None),
    ("washer", "hard", "inpaint", True, 1234),
    ("washer", "hard", "text2img", False, 99),
    ("washer", "easy", "perlin", True, None),
]


def _spec(category: str, i: int) -> dict[str, Any]:
    defect = "stain" if i % 2 else "deformation"
    return {
        "category": category,
        "defect_type": defect,
        "description": f"a small {defect} number {i}",
        "region": "center",
        "size": 0.02,
        "shape": "blob",
        "tone": "darker",
        "severity": 0.4,
    }


def _write_run(out: Path, name: str = "fake", dataset: str = "demo", curate: bool = True) -> Path:
    root = None if dataset == "demo" else str(out)
    config = RunConfig(
        out=str(out), name=name, iterations=2, seed=RUN_SEED, data=DataConfig(dataset=dataset, root=root)
    )
    run = RunDir.open(config)
    rng = np.random.default_rng(0)
    for k in (1, 2):
        folder = run.iteration_dir(k)
        rows = []
        for i, (category, label, renderer, has_mask, seed) in enumerate(PLAN):
            cid = f"{k}-{category}-{i:04d}"
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            save_rgb(folder / "images" / f"{cid}.png", image)
            mask = None
            if has_mask:
                mask_pixels = np.zeros((SIZE, SIZE), dtype=bool)
                mask_pixels[i : i + 5, 3 : 3 + k + i] = True
                save_mask(folder / "masks" / f"{cid}.png", mask_pixels)
                mask = f"masks/{cid}.png"
            kept = label != "rejected"
            rows.append(
                {
                    "id": cid,
                    "iteration": k,
                    "category": category,
                    "prompt": f"category: {category}",
                    "text": json.dumps(_spec(category, i)),
                    "spec": _spec(category, i),
                    "source_id": f"{category}/train/good/{i:03d}",
                    "renderer": renderer,
                    "image": f"images/{cid}.png",
                    "mask": mask,
                    "verdicts": {},
                    "hardness": (0.5 if label == "hard" else -2.0 - i) if kept else None,
                    "hardness_judge": 0.1 if kept else None,
                    "label": label,
                    "label_judge": "easy" if kept else None,
                    "reason": "" if kept else "filter:match_band:too_many",
                    "render_info": {} if seed is None else {"seed": seed + k},
                }
            )
        write_candidates(folder, rows)
        share = {1: 0.5, 2: 0.75}[k]
        atomic_write_json(
            folder / "stats.json",
            {
                "iteration": k,
                "kept": 5,
                "hard": 3,
                "hard_share": share,
                "hard_share_judge": share - 0.25,
                "per_category": {
                    "brick": {"kept": 2, "hard_share": 0.5, "hard_share_judge": 0.0},
                    "washer": {"kept": 3, "hard_share": 2 / 3, "hard_share_judge": 1 / 3},
                },
            },
        )
    if curate:
        KKALoop(run).curate()
    return run.path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def dry(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    folder = tmp_path_factory.mktemp("dry") / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", SECRET)
    try:
        result = publish(run_dir, "someone/kka-fake", dry_run=folder)
    finally:
        mp.undo()
    return result, folder


def _written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode off, and any HTTP request an error: what runs must not need the network."""
    import datasets
    import httpx
    from huggingface_hub import constants

    def refuse(self, request, *args, **kwargs):
        raise AssertionError(f"network access to {request.url}")

    monkeypatch.setattr(httpx.Client, "send", refuse)
    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


class RecordingHub:
    """A fake Hub for a real (non-dry) push: an existing empty repository that keeps what is uploaded."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.files: dict[str, bytes] = {}
        self.commits: list[list[str]] = []
        self.tokens: set[str | None] = set()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from huggingface_hub.errors import EntryNotFoundError
        from huggingface_hub.hf_api import CommitInfo, DatasetInfo

        hub = self

        def repo_info(api, repo_id, *args, **kwargs):
            hub.tokens.add(api.token)
            return DatasetInfo(id=repo_id, sha="c" * 40, private=False)

        def preupload_lfs_files(api, repo_id, additions, **kwargs):
            for addition in additions:
                with addition.as_file() as handle:
                    hub.files[addition.path_in_repo] = handle.read()
                addition._is_uploaded = True

        def create_commit(api, repo_id, operations, **kwargs):
            hub.tokens.add(api.token)
            for op in operations:
                assert isinstance(op, CommitOperationAdd), op
                if not getattr(op, "_is_uploaded", False):
                    with op.as_file() as handle:
                        hub.files[op.path_in_repo] = handle.read()
            hub.commits.append([op.path_in_repo for op in operations])
            return CommitInfo(
                f"https://huggingface.co/datasets/{repo_id}/commit/{'d' * 40}", "", "", "d" * 40
            )

        def list_repo_tree(api, repo_id, path_in_repo=None, **kwargs):
            if path_in_repo:
                raise EntryNotFoundError(path_in_repo)
            return iter([])

        def hf_hub_download(api, repo_id, filename, **kwargs):
            path = hub.tmp / filename
            path.write_bytes(hub.files[filename])
            return str(path)

        fakes = {
            "repo_info": repo_info,
            "preupload_lfs_files": preupload_lfs_files,
            "create_commit": create_commit,
            "list_repo_tree": list_repo_tree,
            "get_paths_info": lambda api, *args, **kwargs: [],
            "hf_hub_download": hf_hub_download,
            "list_repo_files": lambda api, *args, **kwargs: [".gitattributes", *hub.files],
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(HfApi, name, fake)


# dry run ---------------------------------------------------------------------------------------------------
def test_dry_run_writes_shards_card_and_plot(dry):
    result, folder = dry
    assert result.rows == {"brick": 2, "washer": 4}  # one hard brick and two hard washers per iteration
    assert result.repo_id == "someone/kka-fake" and result.url is None and result.dry_run_dir == folder
    expected = sorted(
        [PLOT_PATH, "README.md", "data/brick-00000-of-00001.parquet", "data/washer-00000-of-00001.parquet"]
    )
    assert _written(folder) == expected == result.files
    with Image.open(folder / PLOT_PATH) as plot:
        assert plot.format == "PNG" and plot.size[0] > 200


def test_dry_run_needs_no_network(run_dir: Path, tmp_path: Path, no_network):
    result = publish(run_dir, None, dry_run=tmp_path / "out", split_by="iteration")
    assert result.repo_id == "local/fake"
    assert result.rows == {"iteration_1": 3, "iteration_2": 3}
    assert "local/fake" in (tmp_path / "out" / "README.md").read_text()


def test_push_uploads_what_the_dry_run_wrote(
    run_dir: Path, dry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network
):
    _, folder = dry
    hub = RecordingHub(tmp_path)
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    result = publish(run_dir, "someone/kka-fake", private=True)
    assert result.url == "https://huggingface.co/datasets/someone/kka-fake" and result.dry_run_dir is None
    assert hub.tokens == {SECRET}  # the token reaches the Hub client and nothing else
    assert sorted(hub.files) == _written(folder) == result.files
    # first the shards and the card datasets writes, then our card and the plot
    assert hub.commits[0] == [
        "data/brick-00000-of-00001.parquet",
        "data/washer-00000-of-00001.parquet",
        "README.md",
    ]
    assert hub.commits[1] == ["README.md", PLOT_PATH]
    for path, content in hub.files.items():
        assert content == (folder / path).read_bytes(), path
        assert SECRET.encode() not in content


def test_token_is_written_nowhere(dry, run_dir: Path):
    _, folder = dry
    for root in (folder, run_dir):
        for path in root.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_real_push_without_a_token_is_one_line_error(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, no_network
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PublishError, match=r"set HF_TOKEN or run `huggingface-cli login`") as error:
        publish(run_dir, "someone/kka-fake")
    assert "\n" not in str(error.value)


# the card --------------------------------------------------------------------------------------------------
def test_card_has_metadata_provenance_and_the_curve(dry, run_dir: Path):
    from huggingface_hub import DatasetCard

    _, folder = dry
    text = (folder / "README.md").read_text()
    card = DatasetCard(text)
    data = card.data.to_dict()
    assert data["license"] == "cc0-1.0"
    assert data["tags"] == ["synthetic", "anomaly-detection", "kka-synth"]
    assert set(data["task_categories"]) == {"image-classification", "image-segmentation"}
    # what push_to_hub wrote is kept: the splits and their files
    assert [s["split"] for s in data["configs"][0]["data_files"]] == ["brick", "washer"]
    assert {s["name"]: s["num_examples"] for s in data["dataset_info"]["splits"]} == {"brick": 2, "washer": 4}
    body = card.text
    assert "synthetic" in body.split("\n\n")[1].lower()  # said first, right under the title
    assert f"]({PLOT_PATH})" in body
    assert "| 1 | 5 | 3 | 0.50 | 0.25 | 0.50 / 0.00 | 0.67 / 0.33 |" in body
    assert "| 2 | 5 | 3 | 0.75 | 0.50 | 0.50 / 0.00 | 0.67 / 0.33 |" in body
    for fact in ("**kka-synth**", "OpenCV SIFT", "deepsad-cnn", "**seeds**: run 7", "torch", "`cc0-1.0`"):
        assert fact in body, fact
    assert "<details>" in body and "\nseed: 7\n" in body  # the full config, collapsed
    assert str(run_dir.parent) not in text  # local paths are cut to their last component
    assert "inherit" in body


def test_license_by_dataset():
    assert resolve_license("mvtec_ad", None)[0] == "cc-by-nc-sa-4.0"
    assert resolve_license("mvtec_loco", None)[0] == "cc-by-nc-sa-4.0"
    assert resolve_license("visa", None)[0] == "cc-by-4.0"
    assert "perlin renderer" in resolve_license("demo", None, ["procedural", "perlin"])[1]
    assert "perlin renderer" not in resolve_license("demo", None, ["procedural"])[1]
    chosen, words = resolve_license("folder", None)
    assert chosen == "other" and "--license" in words
    chosen, words = resolve_license("folder", "mit")
    assert chosen == "mit" and "`mit`" in words


def test_folder_run_publishes_as_other(tmp_path: Path):
    from huggingface_hub import DatasetCard

    from kka_synth.hub import build_card

    run = RunDir.load(_write_run(tmp_path, name="own", dataset="folder"))
    card = DatasetCard(build_card(run, {"brick": 2}, repo_id="me/own"))
    assert card.data.license == "other"
    assert "cannot know the licence" in card.text and "<local>/" in card.text


# load ------------------------------------------------------------------------------------------------------
def test_load_round_trip(dry, run_dir: Path, tmp_path: Path):
    _, folder = dry
    loaded = load(folder, cache_dir=tmp_path)
    assert sorted(loaded) == ["brick", "washer"]
    assert loaded["washer"].column_names == [
        "image", "mask", "label", "category", "defect_type", "description", "spec", "hardness", "hard",
        "iteration", "renderer", "source_image", "seed", "id",
    ]  # fmt: skip
    by_id = {r["id"]: (k, r) for k in (1, 2) for r in read_candidates(run_dir / "iterations" / str(k))}
    seen = []
    for split, dataset in loaded.items():
        for row in dataset:
            k, candidate = by_id[row["id"]]
            folder_k = run_dir / "iterations" / str(k)
            seen.append(row["id"])
            assert row["category"] == split and candidate["label"] == "hard" and row["hard"]
            assert row["label"] == 1 and row["iteration"] == k
            assert np.array_equal(
                np.asarray(row["image"].convert("RGB")), load_rgb(folder_k / candidate["image"])
            )
            if candidate["mask"] is None:
                assert row["mask"] is None and row["renderer"] == "text2img"
            else:
                assert np.array_equal(np.asarray(row["mask"]) > 0, load_mask(folder_k / candidate["mask"]))
            assert json.loads(row["spec"]) == candidate["spec"]
            assert row["defect_type"] == candidate["spec"]["defect_type"]
            expected_seed = {"inpaint": 1234 + k, "text2img": 99 + k}.get(row["renderer"], RUN_SEED)
            assert row["seed"] == expected_seed
    assert len(seen) == len(set(seen)) == 6
    one = load(folder, split="brick", cache_dir=tmp_path)
    assert one.num_rows == 2 and one.features["label"].names == ["normal", "synthetic_defect"]


def test_include_all_keeps_hard_and_easy(run_dir: Path, tmp_path: Path):
    result = publish(run_dir, None, dry_run=tmp_path / "out", include="all", split_by="iteration")
    assert result.rows == {"iteration_1": 5, "iteration_2": 5}
    loaded = load(tmp_path / "out", cache_dir=tmp_path / "cache")
    for k in (1, 2):
        rows = loaded[f"iteration_{k}"]
        labels = {r["id"]: r["label"] for r in read_candidates(run_dir / "iterations" / str(k))}
        assert sorted(rows["id"]) == sorted(i for i, label in labels.items() if label != "rejected")
        assert rows["hard"] == [labels[i] == "hard" for i in rows["id"]]
        assert set(rows["label"]) == {1}


# bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": "everything"}, "include must be one of curated, all"),
        ({"split_by": "defect"}, "split_by must be one of category, iteration"),
        ({"repo_id": "bad name/x"}, "invalid repo id 'bad name/x'"),
        ({"repo_id": "a/b/c"}, "invalid repo id 'a/b/c'"),
        ({"repo_id": "noslash"}, "must be namespace/name"),
    ],
)
def test_bad_arguments(run_dir: Path, tmp_path: Path, kwargs: dict[str, Any], message: str):
    arguments = {"repo_id": None, "dry_run": tmp_path / "out", **kwargs}
    with pytest.raises(PublishError, match=message) as error:
        publish(run_dir, **arguments)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_runs_and_folders(run_dir: Path, tmp_path: Path):
    with pytest.raises(PublishError, match="not a run directory"):
        publish(tmp_path / "missing", None, dry_run=tmp_path / "out")
    uncurated = _write_run(tmp_path / "runs", name="uncurated", curate=False)
    with pytest.raises(PublishError, match="has no curated set") as error:
        publish(uncurated, None, dry_run=tmp_path / "out")
    assert "\n" not in str(error.value)
    with pytest.raises(PublishError, match="repo_id is required"):
        publish(run_dir, None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(PublishError, match="must be empty"):
        publish(run_dir, None, dry_run=tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(PublishError, match="no published dataset"):
        load(tmp_path / "full")
    with pytest.raises(PublishError, match="no folder"):
        load(tmp_path / "nowhere")


def test_load_of_a_hub_id_is_load_dataset(monkeypatch: pytest.MonkeyPatch):
    import datasets

    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or "ds"
    )
    assert load("someone/kka-fake", split="brick") == "ds"
    assert calls == [(("someone/kka-fake",), {"split": "brick", "cache_dir": None})]
    with pytest.raises(PublishError, match="invalid repo id"):
        load("not a repo")


def test_missing_image_files_are_named(tmp_path: Path):
    run = _write_run(tmp_path / "runs", name="holes")
    (run / "iterations" / "2" / "images" / "2-washer-0005.png").unlink()
    with pytest.raises(
        PublishError, match=r"1 image or mask files .* e\.g\. iterations/2/images/2-washer-0005"
    ):
        publish(run, None, dry_run=tmp_path / "out", include="all")


def test_failed_dry_run_leaves_no_folder(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import HfApi, constants

    before = {name: HfApi.__dict__[name] for name in ("create_commit", "repo_info")}
    offline = constants.HF_HUB_OFFLINE

    def broken(stats):
        raise RuntimeError("plot failed")

    monkeypatch.setattr("kka_synth.hub.hard_share_png", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        publish(run_dir, None, dry_run=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the Hub client is itself again
    assert {name: HfApi.__dict__[name] for name in before} == before
    assert constants.HF_HUB_OFFLINE == offline


def _tamper_index(run: Path, key: str, value: str) -> None:
    """Set ``key`` of the first row of the run's curated/index.jsonl to ``value``."""
    index = run / "curated" / "index.jsonl"
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    rows[0][key] = value
    index.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _tamper_candidates(run: Path, key: str, value: str) -> None:
    """Set ``key`` of every kept candidate of iteration 1 to ``value``."""
    folder = run / "iterations" / "1"
    rows = read_candidates(folder)
    for row in rows:
        if row["label"] != "rejected":
            row[key] = value
    write_candidates(folder, rows)


@pytest.mark.parametrize(
    ("include", "tamper", "key", "value"),
    [
        ("curated", _tamper_index, "image", "../../../secret.png"),
        ("curated", _tamper_index, "mask", "/SECRET"),
        ("all", _tamper_candidates, "image", "../../../../secret.png"),
        ("all", _tamper_candidates, "mask", "images/link.png"),  # a link that points out of the run
    ],
)
def test_paths_leading_out_of_the_run_are_refused(tmp_path: Path, include: str, tamper, key: str, value: str):
    """A run file edited to name a file outside the run directory stops the publish in one line, before
    any file is read or any folder made."""
    secret = tmp_path / "secret.png"
    save_rgb(secret, np.zeros((SIZE, SIZE, 3), dtype=np.uint8))  # readable: only the check stops it
    run = _write_run(tmp_path / "runs", name="tampered")
    (run / "iterations" / "1" / "images" / "link.png").symlink_to(secret)
    tamper(run, key, value.replace("/SECRET", str(secret)))
    with pytest.raises(PublishError, match="lies outside") as error:
        publish(run, None, dry_run=tmp_path / "out", include=include)
    message = str(error.value)
    assert "\n" not in message and ("curated/index.jsonl" in message or "candidates.parquet" in message)
    assert not (tmp_path / "out").exists()
