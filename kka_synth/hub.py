"""Publish a run as a Hugging Face dataset, and load a published one back.

:func:`publish` turns a run's curated hard set (or every kept candidate) into a ``datasets.DatasetDict``
with one split per category or per iteration, pushes it with ``DatasetDict.push_to_hub``, and then commits
the dataset card (:mod:`kka_synth.hub_card`, merged into the card ``push_to_hub`` wrote) and the hard-share
plot. Each split is built with ``Dataset.from_generator`` into an Arrow cache in a temporary folder, reading
one PNG file at a time, so a large run never sits in memory; the PNG bytes go into the dataset unchanged.

A dry run (``dry_run=DIR``) runs the same code with ``huggingface_hub.HfApi`` patched at its boundary to
stand for a new, empty dataset repository whose uploads are written to ``DIR/<path in repo>``: exactly the
files a push would upload, and no network access (``HF_HUB_OFFLINE`` is forced on while it runs, so a call
that slipped past the patch fails instead of reaching the Hub). :func:`load` reads such a folder back, or
loads a dataset from the Hub.

The token comes from the ``token_env`` environment variable or ``huggingface_hub.get_token()``; it is
handed to ``huggingface_hub`` only and never written or logged. A dry run does not read it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kka_synth.hub_card import PLOT_PATH, build_card, hard_share_png, iteration_stats
from kka_synth.runs import RunDir, RunError, read_candidates, read_jsonl, run_file

logger = logging.getLogger(__name__)

INCLUDE = ("curated", "all")
SPLIT_BY = ("category", "iteration")
CLASS_NAMES = ("normal", "synthetic_defect")
"""Names of ``label``'s classes; every published row is 1, a synthetic defect."""
WRITER_BATCH_SIZE = 100
"""Rows the Arrow writer buffers before writing: bounds the memory a split's images take while building."""

Progress = Callable[[str, int, int], None]
"""Called as ``progress(task, done, total)``, as the loop's progress is."""


class PublishError(ValueError):
    """A run cannot be published (or a dataset loaded) as asked; the message is one line."""


@dataclass
class PublishResult:
    """What :func:`publish` pushed (or, in a dry run, wrote)."""

    repo_id: str
    rows: dict[str, int]
    """Rows per split."""
    files: list[str]
    """Paths in the repository that were uploaded (a dry run: written under ``dry_run_dir``)."""
    dry_run_dir: Path | None
    url: str | None
    """The dataset's page on the Hub; None in a dry run."""


def features() -> Any:
    """The published columns as ``datasets.Features``."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASS_NAMES)),
            "category": datasets.Value("string"),
            "defect_type": datasets.Value("string"),
            "description": datasets.Value("string"),
            "spec": datasets.Value("string"),
            "hardness": datasets.Value("float64"),
            "hard": datasets.Value("bool"),
            "iteration": datasets.Value("int32"),
            "renderer": datasets.Value("string"),
            "source_image": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "id": datasets.Value("string"),
        }
    )


# rows ----------------------------------------------------------------------------------------------------
@dataclass
class _Row:
    columns: dict[str, Any]
    image: Path
    mask: Path | None


def _columns(candidate: dict[str, Any], run_seed: int) -> dict[str, Any]:
    spec = candidate["spec"] or {}
    seed = candidate.get("render_info", {}).get("seed")
    return {
        "label": 1,
        "category": candidate["category"],
        "defect_type": spec.get("defect_type", ""),
        "description": spec.get("description", ""),
        "spec": json.dumps(spec),
        "hardness": candidate["hardness"],
        "hard": candidate["label"] == "hard",
        "iteration": int(candidate["iteration"]),
        "renderer": candidate["renderer"],
        "source_image": candidate["source_id"],
        "seed": int(seed) if seed is not None else run_seed,
        "id": candidate["id"],
    }


def _run_file(folder: Path, value: Any, source: str) -> Path:
    """:func:`~kka_synth.runs.run_file` with its error as a one-line PublishError."""
    try:
        return run_file(folder, value, source)
    except RunError as error:
        raise PublishError(str(error)) from None


def collect_rows(run: RunDir, include: str) -> list[_Row]:
    """The rows to publish: the curated set (from ``curated/index.jsonl``) or every kept candidate.

    Every image and mask path is checked to stay inside the run directory before anything is read.
    """
    run_seed = int((run.manifest.get("seeds") or {}).get("run", run.manifest["config"].get("seed", 0)))
    iterations = run.path / "iterations"
    cache: dict[int, dict[str, dict[str, Any]]] = {}

    def candidates(k: int) -> dict[str, dict[str, Any]]:
        if k not in cache:
            cache[k] = {r["id"]: r for r in read_candidates(iterations / str(k))}
        return cache[k]

    rows = []
    if include == "curated":
        index_path = run.curated_dir / "index.jsonl"
        if not index_path.is_file():
            raise PublishError(
                f"run {run.path.name} has no curated set (curated/index.jsonl): finish the run, or publish "
                "every kept candidate with include='all'"
            )
        for entry in read_jsonl(index_path):
            candidate = candidates(int(entry["iteration"])).get(entry["id"])
            if candidate is None:
                raise PublishError(f"curated/index.jsonl names {entry['id']}, which its iteration lacks")
            source = "curated/index.jsonl"
            mask = None if entry.get("mask") is None else _run_file(run.curated_dir, entry["mask"], source)
            image = _run_file(run.curated_dir, entry["image"], source)
            rows.append(_Row(_columns(candidate, run_seed), image, mask))
    else:
        found = (
            sorted(int(p.name) for p in iterations.iterdir() if p.name.isdigit())
            if iterations.is_dir()
            else []
        )
        for k in found:
            folder = iterations / str(k)
            if not (folder / "candidates.parquet").is_file():
                continue
            for candidate in candidates(k).values():
                if candidate["label"] in ("hard", "easy"):
                    source = f"iterations/{k}/candidates.parquet"
                    mask = None if candidate["mask"] is None else _run_file(folder, candidate["mask"], source)
                    image = _run_file(folder, candidate["image"], source)
                    rows.append(_Row(_columns(candidate, run_seed), image, mask))
    if not rows:
        what = "curated set" if include == "curated" else "set of kept candidates"
        raise PublishError(f"run {run.path.name} has an empty {what}: nothing to publish")
    missing = [path for r in rows for path in (r.image, r.mask) if path is not None and not path.is_file()]
    if missing:
        raise PublishError(
            f"{len(missing)} image or mask files of run {run.path.name} are missing, e.g. "
            f"{missing[0].relative_to(run.path)}"
        )
    return rows


def split_name(row: _Row, split_by: str) -> str:
    """The split a row goes to: its category, or ``iteration_<k>``, as a valid split name."""
    if split_by == "iteration":
        return f"iteration_{row.columns['iteration']}"
    name = re.sub(r"\W+", "_", row.columns["category"]).strip("_")
    if not name:
        raise PublishError(
            f"category {row.columns['category']!r} gives no usable split name; use split_by='iteration'"
        )
    return name


def _generate(rows: list[_Row], task: str, progress: Progress) -> Iterator[dict[str, Any]]:
    """One split's examples, reading each image and mask file as it goes (PNG bytes kept as they are)."""
    for done, row in enumerate(rows):
        mask = None if row.mask is None else {"bytes": row.mask.read_bytes(), "path": None}
        yield {**row.columns, "image": {"bytes": row.image.read_bytes(), "path": None}, "mask": mask}
        progress(task, done + 1, len(rows))


# the dry-run hub -------------------------------------------------------------------------------------------
class DryRunHub:
    """Stands in for the Hub during a dry run: a new, empty dataset repository whose uploads land in a folder.

    :meth:`patched` replaces the ``HfApi`` methods that ``push_to_hub`` and :func:`publish` call:
    ``repo_info`` (not found until ``create_repo``), ``create_repo``, ``preupload_lfs_files`` and
    ``create_commit`` (each added file is written to ``folder/<path_in_repo>``), ``list_repo_tree`` and
    ``get_paths_info`` (empty: ``push_to_hub`` looks before its commit), ``hf_hub_download`` and
    ``list_repo_files`` (the committed files). The patch holds for the whole process while it lasts.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.sha = uuid.uuid4().hex + "0" * 8  # unique per dry run, so no cached listing is reused
        self.private: bool | None = None  # set by create_repo
        self.committed: dict[str, None] = {}

    def _write(self, addition: Any) -> None:
        target = self.folder / addition.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        with addition.as_file() as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)

    def repo_info(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        import httpx
        from huggingface_hub.errors import RepositoryNotFoundError
        from huggingface_hub.hf_api import DatasetInfo

        if self.private is None:
            response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/{repo_id}"))
            raise RepositoryNotFoundError(f"{repo_id} does not exist yet (dry run)", response=response)
        return DatasetInfo(id=repo_id, sha=self.sha, private=self.private)

    def create_repo(self, repo_id: str, *args: Any, private: bool | None = None, **kwargs: Any) -> Any:
        from huggingface_hub.hf_api import RepoUrl

        self.private = bool(private)
        return RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def preupload_lfs_files(self, repo_id: str, additions: list[Any], **kwargs: Any) -> None:
        for addition in additions:
            self._write(addition)  # push_to_hub deletes the shard's temporary file right after this
            addition._is_uploaded = True

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> Any:
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.hf_api import CommitInfo

        for operation in operations:
            if not isinstance(operation, CommitOperationAdd):  # a new repository has nothing to delete
                raise PublishError(f"dry run: unexpected commit operation {type(operation).__name__}")
            if not getattr(operation, "_is_uploaded", False):
                self._write(operation)
            self.committed[operation.path_in_repo] = None
        url = f"https://huggingface.co/datasets/{repo_id}/commit/{self.sha}"
        return CommitInfo(url, kwargs.get("commit_message", ""), "", self.sha)

    def list_repo_tree(self, repo_id: str, path_in_repo: str | None = None, **kwargs: Any) -> Any:
        from huggingface_hub.errors import EntryNotFoundError

        if self.committed:
            raise PublishError("dry run: listing a repository after a commit is not simulated")
        if path_in_repo:
            raise EntryNotFoundError(f"{path_in_repo} is not in the repository (dry run)")
        return iter([])

    def get_paths_info(self, *args: Any, **kwargs: Any) -> list[Any]:
        if self.committed:
            raise PublishError("dry run: listing a repository after a commit is not simulated")
        return []

    def hf_hub_download(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        from huggingface_hub.errors import EntryNotFoundError

        if filename not in self.committed:
            raise EntryNotFoundError(f"{filename} is not in the repository (dry run)")
        return str(self.folder / filename)

    def list_repo_files(self, *args: Any, **kwargs: Any) -> list[str]:
        return list(self.committed)

    @contextlib.contextmanager
    def patched(self) -> Iterator[DryRunHub]:
        """Patch ``HfApi`` and force offline mode while the block runs; restore both after."""
        from huggingface_hub import HfApi, constants

        names = ("repo_info", "create_repo", "preupload_lfs_files", "create_commit", "list_repo_tree")
        names += ("get_paths_info", "hf_hub_download", "list_repo_files")
        saved = {name: HfApi.__dict__[name] for name in names}
        offline = constants.HF_HUB_OFFLINE
        try:
            for name in names:
                setattr(HfApi, name, getattr(self, name))  # a bound method: the HfApi instance is not passed
            constants.HF_HUB_OFFLINE = True
            yield self
        finally:
            for name, method in saved.items():
                setattr(HfApi, name, method)
            constants.HF_HUB_OFFLINE = offline


# publish -------------------------------------------------------------------------------------------------
def _token(token_env: str) -> str:
    from huggingface_hub import get_token

    token = os.environ.get(token_env) or get_token()
    if not token:
        raise PublishError(f"no Hugging Face token: set {token_env} or run `huggingface-cli login`")
    return token


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"invalid repo id {repo_id!r}: {str(error).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise PublishError(f"repo id {repo_id!r} must be namespace/name, e.g. your-user/{repo_id}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _silent(task: str, done: int, total: int) -> None:
    return None


def publish(
    run_dir: str | Path,
    repo_id: str | None,
    *,
    private: bool = False,
    include: str = "curated",
    split_by: str = "category",
    token_env: str = "HF_TOKEN",
    dry_run: str | Path | None = None,
    license: str | None = None,
    progress: Progress | None = None,
) -> PublishResult:
    """Publish the run at ``run_dir`` as the dataset ``repo_id`` (or write what would be pushed to a folder).

    Args:
        run_dir: a run directory written by the loop.
        repo_id: ``namespace/name`` on the Hub; may be None in a dry run (``local/<run name>``).
        private: create the repository private (a new repository only, as ``push_to_hub`` does).
        include: "curated" (the curated hard set) or "all" (every kept candidate, hard and easy).
        split_by: "category" (split ``brick``) or "iteration" (split ``iteration_1``).
        token_env: environment variable holding the token (else the one ``huggingface-cli login`` saved).
        dry_run: an empty or missing folder: write the files a push would upload there, offline.
        license: the dataset's licence id; None takes the source dataset's (``other`` for folders).
        progress: called as ``progress(task, done, total)``.

    Raises:
        PublishError: bad arguments, a run that cannot be published, no token, or a failed push.
    """
    if include not in INCLUDE:
        raise PublishError(f"include must be one of {', '.join(INCLUDE)}, got {include!r}")
    if split_by not in SPLIT_BY:
        raise PublishError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    try:
        run = RunDir.load(run_dir)
    except RunError as error:
        raise PublishError(str(error)) from None
    folder = None if dry_run is None else Path(dry_run)
    if folder is None and repo_id is None:
        raise PublishError("repo_id is required to publish (or pass dry_run=DIR to write the files locally)")
    repo_id = repo_id or f"local/{run.manifest['config']['name']}"
    _check_repo_id(repo_id)
    if folder is not None and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PublishError(f"dry-run folder {folder} must be empty or not exist yet")
    token = None
    if folder is None:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise PublishError("HF_HUB_OFFLINE is set: unset it to publish, or pass dry_run=DIR")
        token = _token(token_env)

    rows = collect_rows(run, include)
    splits: dict[str, list[_Row]] = {}
    for row in rows:
        splits.setdefault(split_name(row, split_by), []).append(row)
    if split_by == "category":
        names = {r.columns["category"]: split_name(r, "category") for r in rows}
        if len(set(names.values())) < len(names):
            raise PublishError(f"categories {sorted(names)} give clashing split names; split by iteration")
    counts = {name: len(split) for name, split in splits.items()}
    stats = iteration_stats(run)

    def card(base: str) -> dict[str, bytes]:
        text = build_card(
            run,
            counts,
            repo_id=repo_id,
            include=include,
            split_by=split_by,
            license=license,
            has_masks=any(r.mask is not None for r in rows),
            base=base,
        )
        return {"README.md": text.encode("utf-8"), **({PLOT_PATH: hard_share_png(stats)} if stats else {})}

    made_folder = folder is not None and not folder.exists()
    try:
        with contextlib.ExitStack() as stack:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                stack.enter_context(DryRunHub(folder).patched())
            files = _push(splits, repo_id, token, private, card, progress or _silent)
    except BaseException:
        if made_folder:
            shutil.rmtree(folder, ignore_errors=True)  # a failed dry run leaves no half-written folder
        raise
    logger.info("published %d rows in %d splits to %s", len(rows), len(counts), folder or repo_id)
    return PublishResult(
        repo_id=repo_id,
        rows=counts,
        files=sorted(files),
        dry_run_dir=folder,
        url=None if folder is not None else f"https://huggingface.co/datasets/{repo_id}",
    )


def _push(
    splits: dict[str, list[_Row]],
    repo_id: str,
    token: str | None,
    private: bool,
    card: Callable[[str], dict[str, bytes]],
    progress: Progress,
) -> list[str]:
    """Build each split's Arrow dataset, push them, then commit ``card(the README push_to_hub wrote)``.

    Returns the repository's files after the push.
    """
    import datasets
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="kka-publish-") as cache:
        dataset = datasets.DatasetDict(
            {
                name: datasets.Dataset.from_generator(
                    _generate,
                    features=features(),
                    cache_dir=cache,
                    gen_kwargs={"rows": rows, "task": f"publishing: {name}", "progress": progress},
                    fingerprint=f"kka-publish-{uuid.uuid4().hex}",  # no hashing of the rows, no reuse
                    writer_batch_size=WRITER_BATCH_SIZE,
                    split=datasets.NamedSplit(name),
                )
                for name, rows in splits.items()
            }
        )
        api = HfApi(token=token)
        try:
            progress("publishing: uploading", 0, 2)
            pushed = dataset.push_to_hub(
                repo_id,
                private=private,
                token=token,
                embed_external_files=False,  # the PNG bytes are in the table already
                commit_message="Upload the kka-synth dataset",
            )
            progress("publishing: uploading", 1, 2)
            readme = api.hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=pushed.oid)
            uploads = card(Path(readme).read_text(encoding="utf-8"))
            api.create_commit(
                repo_id,
                operations=[CommitOperationAdd(path, content) for path, content in uploads.items()],
                commit_message="Add the kka-synth dataset card",
                repo_type="dataset",
            )
            files = [p for p in api.list_repo_files(repo_id, repo_type="dataset") if p != ".gitattributes"]
            progress("publishing: uploading", 2, 2)
        except HfHubHTTPError as error:
            raise PublishError(f"pushing to {repo_id} failed: {_first_line(error)}") from None
        finally:
            del dataset  # let go of the Arrow files before their folder goes
    return files


# load ----------------------------------------------------------------------------------------------------
def load(repo_or_dir: str | Path, split: str | None = None, *, cache_dir: str | Path | None = None) -> Any:
    """A published dataset: a dry-run folder (parquet shards and README) or a Hub id (``load_dataset``).

    Returns a ``datasets.DatasetDict``, or one ``datasets.Dataset`` when ``split`` is given.
    """
    import datasets

    path = Path(repo_or_dir)
    if path.is_dir():
        if not any(path.glob("data/*.parquet")):
            raise PublishError(f"{path} holds no published dataset (no data/*.parquet)")
        source = str(path)
    elif path.exists():
        raise PublishError(f"{path} is a file; give a dry-run folder or a Hub id namespace/name")
    elif path.is_absolute() or str(repo_or_dir).startswith((".", "~")):
        raise PublishError(f"no folder {path}; give a dry-run folder or a Hub id namespace/name")
    else:
        source = str(repo_or_dir)
        _check_repo_id(source)
    try:
        return datasets.load_dataset(
            source, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except (ValueError, FileNotFoundError, ConnectionError) as error:
        raise PublishError(f"cannot load {source}: {_first_line(error)}") from None


__all__ = [
    "CLASS_NAMES",
    "INCLUDE",
    "SPLIT_BY",
    "DryRunHub",
    "PublishError",
    "PublishResult",
    "build_card",
    "collect_rows",
    "features",
    "load",
    "publish",
]
