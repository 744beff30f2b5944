"""Writes into a run directory that fail: a full disk, a spent quota, a read-only or forbidden folder.

The failures are simulated by making the low-level calls (``os.fsync``, ``os.replace``, ``mkstemp``) raise
``OSError`` with the errno a real disk gives, at the Nth call, so the tests also run as root (where chmod
cannot make a folder read-only). A real chmod test runs as an extra check when not root.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest

from kka_synth.config import RunConfig
from kka_synth.data import DataError, save_rgb
from kka_synth.runs import (
    MANIFEST,
    RunDir,
    RunError,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    inside,
    read_candidates,
    remove_stale_temps,
    run_file,
    safe_component,
    write_candidates,
    write_jsonl,
)

MESSAGES = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EDQUOT: "disk quota exceeded",
}


class FailAt:
    """A stand-in for an ``os`` function that raises ``OSError(code)`` on its ``nth`` call (1-based)."""

    def __init__(self, original, nth: int, code: int):
        self.original, self.nth, self.code, self.calls = original, nth, code, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.nth:
            raise OSError(self.code, os.strerror(self.code))
        return self.original(*args, **kwargs)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("code", sorted(MESSAGES))
@pytest.mark.parametrize("where", ["fsync", "replace", "mkstemp"])
def test_failed_write_is_one_line_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, where: str
):
    path = tmp_path / "stats.json"
    atomic_write_json(path, {"old": 1})
    target = {"fsync": os, "replace": os, "mkstemp": tempfile}[where]
    monkeypatch.setattr(target, where, FailAt(getattr(target, where), 1, code))
    with pytest.raises(RunError) as raised:
        atomic_write_json(path, {"new": 2})
    assert _one_line(raised.value) == f"cannot write {path}: {MESSAGES[code]}"
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]  # no temporary file left behind


def test_a_bug_is_not_dressed_up_as_a_disk_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "replace", FailAt(os.replace, 1, errno.EXDEV))
    with pytest.raises(OSError) as raised:
        atomic_write_text(tmp_path / "a.txt", "x")
    assert not isinstance(raised.value, RunError) and raised.value.errno == errno.EXDEV
    assert list(tmp_path.iterdir()) == []


def _run(tmp_path: Path) -> RunDir:
    return RunDir.open(RunConfig(out=str(tmp_path), name="r", iterations=2))


def _stage_writes(run: RunDir) -> None:
    """The writes of one iteration, in the loop's order: proposals, candidates, adapter, stats, manifest."""
    folder = run.iteration_dir(1)
    write_jsonl(folder / "proposals.jsonl", [{"text": f"spec {i}"} for i in range(3)])
    run.mark_done("1/propose", 0.5, proposals=3)
    rows = [{"id": "1-a-0000", "spec": None, "verdicts": {}, "label": "rejected"}]
    write_candidates(folder, rows)
    run.mark_done("1/render", 0.5, rendered=0)
    with atomic_dir(run.adapter_dir(1)) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        (tmp / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    run.mark_done("1/align", 0.5)
    atomic_write_json(folder / "stats.json", {"iteration": 1})
    run.mark_done("1/stats", 0.0)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("nth", range(1, 9))
def test_nth_write_fails_and_every_file_stays_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, nth: int
):
    run = _run(tmp_path)
    before = json.loads((run.path / MANIFEST).read_text())
    monkeypatch.setattr(os, "replace", FailAt(os.replace, nth, code))
    try:
        _stage_writes(run)
    except RunError as error:
        assert MESSAGES[code] in _one_line(error) and str(run.path) in str(error)
    else:
        pytest.fail(f"the writes made fewer than {nth} renames")
    monkeypatch.undo()
    manifest = json.loads((run.path / MANIFEST).read_text())  # valid JSON, whatever call failed
    done = [k for k, v in manifest["stages"].items() if v["status"] == "done"]
    assert set(before["stages"]) <= set(manifest["stages"])
    folder = run.iteration_dir(1)
    if "1/propose" in done:
        assert len((folder / "proposals.jsonl").read_text().splitlines()) == 3
    if "1/render" in done:
        assert [r["id"] for r in read_candidates(folder)] == ["1-a-0000"]
    if "1/align" in done:
        assert sorted(p.name for p in run.adapter_dir(1).iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
    assert not [p for p in run.path.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name]
    # space freed: resuming and writing again completes the stages
    again = RunDir.open(RunConfig(out=str(tmp_path), name="r", iterations=2), resume=True)
    _stage_writes(again)
    assert all(again.stage_done(k) for k in ("1/propose", "1/render", "1/align", "1/stats"))


def test_manifest_write_failure_leaves_the_last_good_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run = _run(tmp_path)
    run.mark_done("prepare", 1.0)
    saved = (run.path / MANIFEST).read_bytes()
    monkeypatch.setattr(os, "fsync", FailAt(os.fsync, 1, errno.EDQUOT))
    with pytest.raises(RunError, match="disk quota exceeded"):
        run.mark_done("1/propose", 1.0)
    assert (run.path / MANIFEST).read_bytes() == saved
    assert json.loads(saved)["stages"]["prepare"]["status"] == "done"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_atomic_dir_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int):
    target = tmp_path / "adapters" / "1"
    target.mkdir(parents=True)
    (target / "old").write_text("old")
    # a write inside the block fails (a library saving weights into the temporary folder)
    with pytest.raises(RunError, match=f"cannot write {target}: {MESSAGES[code]}"), atomic_dir(target) as tmp:
        (tmp / "half").write_text("half")
        raise OSError(code, os.strerror(code))
    # the swap fails
    monkeypatch.setattr(os, "replace", FailAt(os.replace, 1, code))
    with pytest.raises(RunError, match=MESSAGES[code]), atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    monkeypatch.undo()
    # creating the temporary folder fails
    monkeypatch.setattr(tempfile, "mkdtemp", FailAt(tempfile.mkdtemp, 1, code))
    with pytest.raises(RunError, match=MESSAGES[code]), atomic_dir(target):
        pass
    monkeypatch.undo()
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in target.parent.iterdir()] == ["1"]


def test_image_writes_fail_with_the_same_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import numpy as np

    path = tmp_path / "images" / "a.png"
    monkeypatch.setattr(os, "replace", FailAt(os.replace, 1, errno.ENOSPC))
    with pytest.raises(DataError) as raised:
        save_rgb(path, np.zeros((4, 4, 3), np.uint8))
    assert _one_line(raised.value) == f"cannot write {path}: no space left on device"
    assert list(path.parent.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_for_real(tmp_path: Path):
    folder = tmp_path / "iterations"
    folder.mkdir()
    atomic_write_json(folder / "stats.json", {"old": 1})
    folder.chmod(0o555)
    try:
        with pytest.raises(RunError, match="permission denied"):
            atomic_write_json(folder / "stats.json", {"new": 1})
        with pytest.raises(RunError, match="permission denied"):
            atomic_write_json(folder / "sub" / "x.json", {"new": 1})
        assert json.loads((folder / "stats.json").read_text()) == {"old": 1}
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_removes_what_killed_writers_left(tmp_path: Path):
    run = _run(tmp_path)
    images = run.iteration_dir(1) / "images"
    images.mkdir(parents=True)
    (images / "1-a-0000.png").write_bytes(b"png")
    stale = [
        images / ".1-a-0001.png.4242.tmp",
        run.iteration_dir(1) / ".candidates.parquet.abc123.tmp",
        run.path / "adapters" / ".1.partial-x1y2" / "adapter_model.safetensors",
        run.path / ".curated.old-z9" / "index.jsonl",
    ]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    RunDir.open(RunConfig(out=str(tmp_path), name="r", iterations=2), resume=True)
    assert sorted(_files(run.path)) == ["iterations/1/images/1-a-0000.png", MANIFEST]
    assert sorted(p.name for p in (run.path / "adapters").iterdir()) == []
    assert remove_stale_temps(run.path) == 0


def test_resume_of_a_corrupt_manifest_is_a_run_error(tmp_path: Path):
    run = _run(tmp_path)
    (run.path / MANIFEST).write_text('{"config": {')
    with pytest.raises(RunError, match="cannot read"):
        RunDir.open(RunConfig(out=str(tmp_path), name="r"), resume=True)
    (run.path / MANIFEST).write_text("[]")
    with pytest.raises(RunError, match="not a kka-synth manifest"):
        RunDir.load(run.path)


# ------------------------------------------------------------------------------------- path containment
@pytest.mark.parametrize(
    "name", ["bottle", "broken_large", "1-bottle-0007.png", "crème", "a b", "..a", "é" * 127]
)
def test_safe_component_accepts_plain_names(name: str):
    assert safe_component(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a/b",
        "../x",
        "/etc",
        "a\\b",
        "a\x00b",
        "line\nbreak",
        "tab\t",
        "\x7f",
        "\udcff",
        "é" * 128,
    ],
)
def test_safe_component_refuses(name: str):
    with pytest.raises(RunError) as raised:
        safe_component(name)
    _one_line(raised.value)


def test_safe_component_refuses_non_strings():
    with pytest.raises(RunError, match="must be a string"):
        safe_component(None)  # type: ignore[arg-type]


def test_inside_keeps_paths_under_the_root(tmp_path: Path):
    root = tmp_path / "run"
    (root / "curated").mkdir(parents=True)
    assert inside(root, Path("curated/bottle/a.png")) == (root / "curated/bottle/a.png").resolve()
    assert inside(root, root / "x" / ".." / "y") == (root / "y").resolve()
    for bad in (Path("../escape"), Path("curated/../../escape"), tmp_path / "elsewhere", Path("/etc/passwd")):
        with pytest.raises(RunError, match="outside") as raised:
            inside(root, bad)
        _one_line(raised.value)
    (root / "curated" / "link").symlink_to(tmp_path)
    with pytest.raises(RunError, match="outside"):
        inside(root, Path("curated/link/x.png"))


def test_run_file_of_a_run_given_by_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A run opened as ``runs/demo`` from its parent (as the CLI and the examples do): the path a run file
    holds is taken relative to its folder once, not with the run's own path prefixed twice."""
    folder = tmp_path / "runs" / "demo" / "curated"
    (folder / "washer").mkdir(parents=True)
    (folder / "washer" / "a.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    relative = Path("runs", "demo", "curated")
    path = run_file(relative, "washer/a.png", "curated/index.jsonl")
    assert path == relative / "washer" / "a.png" and path.is_file()
    for bad in ("../../elsewhere.png", "/etc/passwd", "washer/../../x.png"):
        with pytest.raises(RunError, match="^curated/index.jsonl: refusing to use .*outside") as raised:
            run_file(relative, bad, "curated/index.jsonl")
        _one_line(raised.value)
