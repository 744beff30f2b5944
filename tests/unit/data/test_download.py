"""MVTec AD download against a local HTTP server: resume, checksum, safe extraction, the licence notice."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fake_http import serve

from kka_synth.data import download as dl
from kka_synth.data import load_samples, save_mask, save_rgb
from kka_synth.data.download import (
    MVTEC_AD_NOTICE,
    DownloadError,
    download_file,
    download_mvtec_ad,
    ensure_mvtec_ad,
)

ARCHIVE = "/mvtec_anomaly_detection.tar.xz"


def _fake_mvtec(tmp: Path) -> Path:
    """One category in MVTec AD layout with noisy (barely compressible) 32x32 PNGs."""
    rng = np.random.default_rng(0)
    base = tmp / "src" / "bottle"
    for i in range(3):
        save_rgb(base / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    save_rgb(base / "test" / "good" / "000.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for i in range(2):
        save_rgb(base / "test" / "broken" / f"{i:03d}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        mask = np.zeros((32, 32), dtype=bool)
        mask[4:9, 4:9] = True
        save_mask(base / "ground_truth" / "broken" / f"{i:03d}_mask.png", mask)
    (tmp / "src" / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    return tmp / "src"


def _tar_xz(source: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=path.name)
        for info, data in extra:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def archive(tmp_path: Path) -> bytes:
    return _tar_xz(_fake_mvtec(tmp_path))


@pytest.fixture(autouse=True)
def _fresh_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "_notice_logged", False)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download_extracts_a_loadable_dataset(
    tmp_path: Path, archive: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "mvtec"
    seen: list[tuple[str, int, int]] = []
    with serve({ARCHIVE: archive}) as server, caplog.at_level(logging.WARNING, logger=dl.__name__):
        result = download_mvtec_ad(
            root,
            url=server.url(ARCHIVE),
            checksum=_sha(archive),
            progress=lambda task, done, total: seen.append((task, done, total)),
        )
    assert result.categories == ["bottle"] and result.notice == MVTEC_AD_NOTICE
    assert server.requests == [(ARCHIVE, None)]
    samples = load_samples("mvtec_ad", root)
    assert [(s.split, s.label) for s in samples].count(("train", 0)) == 3
    assert sum(s.label for s in samples) == 2 and all(s.mask_path is not None for s in samples if s.label)
    assert (root / "license.txt").read_text() == "CC BY-NC-SA 4.0\n"
    assert sorted(p.name for p in root.iterdir()) == ["bottle", "license.txt"]  # no archive, no temp folder
    downloads = [s for s in seen if s[0] == "downloading MVTec AD"]
    assert downloads[-1] == ("downloading MVTec AD", len(archive), len(archive))
    assert [r.message for r in caplog.records] == [MVTEC_AD_NOTICE]


def test_dropped_connection_resumes_with_a_range_request(tmp_path: Path, archive: bytes) -> None:
    half = len(archive) // 2
    dest = tmp_path / "a.tar.xz"
    with serve({ARCHIVE: archive}) as server:
        server.drop_after = half
        with pytest.raises(DownloadError, match="dropped.*call again to resume") as error:
            download_file(server.url(ARCHIVE), dest, _sha(archive), retries=0)
        assert "\n" not in str(error.value)
        part = tmp_path / "a.tar.xz.part"
        assert part.stat().st_size == half and not dest.exists()
        download_file(server.url(ARCHIVE), dest, _sha(archive), retries=0)
    assert server.requests == [(ARCHIVE, None), (ARCHIVE, f"bytes={half}-")]
    assert dest.read_bytes() == archive and not part.exists()


def test_resume_within_one_call(tmp_path: Path, archive: bytes) -> None:
    root = tmp_path / "mvtec"
    with serve({ARCHIVE: archive}) as server:
        server.drop_after = 1000
        result = download_mvtec_ad(
            root, ["bottle"], url=server.url(ARCHIVE), checksum=_sha(archive), retries=1
        )
    assert server.requests == [(ARCHIVE, None), (ARCHIVE, "bytes=1000-")]
    assert result.categories == ["bottle"]
    assert len(list((root / "bottle" / "train" / "good").iterdir())) == 3


def test_wrong_checksum_removes_the_file(tmp_path: Path, archive: bytes) -> None:
    root = tmp_path / "mvtec"
    with serve({ARCHIVE: archive}) as server, pytest.raises(DownloadError) as error:
        download_mvtec_ad(root, url=server.url(ARCHIVE), checksum="0" * 64)
    message = str(error.value)
    assert "checksum mismatch" in message and _sha(archive) in message and "\n" not in message
    assert list(root.iterdir()) == []  # neither the bad file nor anything extracted


def test_failing_mirror_falls_through_to_the_next(tmp_path: Path, archive: bytes) -> None:
    dest = tmp_path / "a.tar.xz"
    with serve({ARCHIVE: archive}) as server:
        download_file(
            [server.url("/gone.tar.xz"), server.url(ARCHIVE)], dest, hashlib.md5(archive).hexdigest()
        )
    assert [path for path, _ in server.requests] == ["/gone.tar.xz", ARCHIVE]
    assert dest.read_bytes() == archive
    with serve({}) as server, pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url(ARCHIVE), tmp_path / "b", _sha(archive))


@pytest.mark.parametrize(
    "name, kind",
    [("../evil", tarfile.REGTYPE), ("/abs/evil", tarfile.REGTYPE), ("bottle/link", tarfile.SYMTYPE)],
)
def test_unsafe_members_refuse_the_archive(tmp_path: Path, name: str, kind: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    data = None
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    else:
        data = b"pwned"
        info.size = len(data)
    evil = _tar_xz(_fake_mvtec(tmp_path), [(info, data)])
    root = tmp_path / "deep" / "mvtec"
    with serve({ARCHIVE: evil}) as server, pytest.raises(DownloadError, match="refusing archive member"):
        download_mvtec_ad(root, url=server.url(ARCHIVE), checksum=_sha(evil))
    assert not (tmp_path / "deep" / "evil").exists() and not (root / "bottle").exists()
    assert list(root.iterdir()) == []  # the temporary folder and the archive are gone too


def test_ensure_downloads_only_when_needed(tmp_path: Path, archive: bytes) -> None:
    root = tmp_path / "mvtec"
    with serve({ARCHIVE: archive}) as server:
        kwargs = {"url": server.url(ARCHIVE), "checksum": _sha(archive)}
        first = ensure_mvtec_ad(root, ["bottle"], **kwargs)
        again = ensure_mvtec_ad(root, ["bottle"], **kwargs)
        assert first is not None and first.categories == ["bottle"] and again is None
        with pytest.raises(DownloadError, match="no category 'screw'"):
            ensure_mvtec_ad(root, ["screw"], **kwargs)  # MVTec AD's own entries only: download again
        other = tmp_path / "mine"
        (other / "notes").mkdir(parents=True)
        assert ensure_mvtec_ad(other, ["bottle"], **kwargs) is None  # not an MVTec folder: left alone
    assert len(server.requests) == 2
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    (by_hand / "mvtec_anomaly_detection.tar.xz").write_bytes(archive)
    result = ensure_mvtec_ad(by_hand, ["bottle"], url="http://127.0.0.1:9/unused", checksum=_sha(archive))
    assert result is not None and result.archive == by_hand / "mvtec_anomaly_detection.tar.xz"
    assert (by_hand / "bottle" / "train" / "good" / "000.png").is_file()  # extracted, nothing fetched
    with pytest.raises(DownloadError, match="unknown MVTec AD category 'kitten'"):
        ensure_mvtec_ad(root, ["kitten"])
    with pytest.raises(DownloadError, match="checksum must be"):
        download_file("http://127.0.0.1:9/x", tmp_path / "x", "abc")
