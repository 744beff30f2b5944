"""Downloading MVTec AD: a resumable, checksummed download and a tar extraction that refuses unsafe members.

MVTec AD (Bergmann et al., "MVTec AD — A Comprehensive Real-World Dataset for Unsupervised Anomaly
Detection", CVPR 2019) is published by MVTec Software GmbH as one archive, ``mvtec_anomaly_detection.tar.xz``
(5,264,982,680 bytes, SHA-256 :data:`MVTEC_AD_SHA256`, the value anomalib checks too), served from
mydrive.ch share links that MVTec changes from time to time; :data:`MVTEC_AD_URLS` lists the known ones,
tried in order. The archive holds one folder per category in the MVTec AD layout, plus the licence and a
readme at its top level.

The dataset is licensed under CC BY-NC-SA 4.0, not under kka-synth's licence: :data:`MVTEC_AD_NOTICE` is
logged at WARNING once per process when it is downloaded, and returned.

:func:`download_file` streams into ``<dest>.part``, resumes a partial file with an HTTP ``Range`` request
(after a dropped connection, in the same call up to ``retries`` times, or in a later call), checks the
checksum and only then renames the file into place; a file with the wrong checksum is removed.
:func:`extract_tar` writes only regular files and folders whose names stay inside the destination: a member
that is absolute, climbs out with ``..``, or is a link, device or FIFO fails the whole extraction, which
happens in a hidden temporary folder and leaves nothing behind. Two processes must not download into the
same root at once.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""Called as ``progress(task, done, total)`` (bytes; total 0 when unknown), like the loop's progress."""

MVTEC_AD_URLS = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/download/420938113-1629960298/"
    "mvtec_anomaly_detection.tar.xz",
    "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
    "mvtec_anomaly_detection.tar.xz",
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
    "mvtec_anomaly_detection.tar.xz",
)
"""Known download links of the official archive, tried in order (MVTec rotates its share links)."""
MVTEC_AD_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_AD_SIZE = 5_264_982_680
"""Bytes of the official archive (shown as the progress total before the server says)."""
MVTEC_AD_ARCHIVE = "mvtec_anomaly_detection.tar.xz"
MVTEC_AD_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
MVTEC_AD_NOTICE = (
    "MVTec AD is licensed by MVTec Software GmbH under CC BY-NC-SA 4.0 (non-commercial use only, "
    "https://creativecommons.org/licenses/by-nc-sa/4.0/); by downloading or using it you accept that licence"
)
_TOP_LEVEL_FILES = ("license.txt", "readme.txt")
_CHUNK = 1 << 20
_TEMP_PREFIX = ".kka-extract-"
_notice_logged = False


class DownloadError(ValueError):
    """A download or extraction failed; the message is one line naming the URL or member."""


@dataclass
class MVTecDownload:
    """What :func:`download_mvtec_ad` did: the root, the category folders it added, the licence notice."""

    root: Path
    categories: list[str]
    notice: str = MVTEC_AD_NOTICE
    archive: Path | None = None
    """The kept archive (``keep_archive=True``), else None."""
    skipped: list[str] = field(default_factory=list)
    """Categories left alone because their folder already existed."""


def _silent(task: str, done: int, total: int) -> None:
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _hash_kind(checksum: str) -> str:
    """The hash name, sha256 or md5, from the length of a hex digest."""
    kinds = {64: "sha256", 32: "md5"}
    if not re.fullmatch(r"[0-9a-fA-F]+", checksum or "") or len(checksum) not in kinds:
        raise DownloadError(f"checksum must be a sha256 (64 hex digits) or md5 (32) digest, got {checksum!r}")
    return kinds[len(checksum)]


def file_digest(path: Path, kind: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(kind)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _Interrupted(Exception):
    """The connection dropped mid-way; the ``.part`` file holds what arrived."""


def _fetch(url: str, part: Path, timeout: float, progress: Progress, task: str, size_hint: int) -> None:
    """Append ``url``'s bytes to ``part`` (resuming from its size); raise _Interrupted on a dropped link."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "kka-synth"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            logger.debug("%s: nothing left to fetch after %d bytes", url, have)
            return  # the part file is complete; the checksum decides
        raise DownloadError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise _Interrupted(f"cannot reach {url}: {_first_line(reason)}") from None
    with response:
        resumed = have > 0 and response.status == 206
        if have and not resumed:
            logger.info("%s does not resume; starting the download over", url)
            have = 0
        if resumed:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != have:
                found = response.headers.get("Content-Range")
                raise DownloadError(f"cannot resume {url}: unexpected Content-Range {found!r}")
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        total = have + expected if expected is not None else size_hint
        received = 0
        with open(part, "ab" if resumed else "wb") as handle:
            try:
                while True:
                    block = response.read(_CHUNK)
                    if not block:
                        break
                    handle.write(block)
                    received += len(block)
                    progress(task, have + received, total)
            except (OSError, http.client.HTTPException) as error:
                raise _Interrupted(f"connection to {url} dropped: {_first_line(error)}") from None
        if expected is not None and received < expected:
            raise _Interrupted(f"connection to {url} dropped after {have + received} of {total} bytes")


def _fetch_any(
    urls: list[str], part: Path, timeout: float, retries: int, progress: Progress, task: str, size_hint: int
) -> str | None:
    """Fill ``part`` from the first URL that delivers, resuming up to ``retries`` times per URL.

    Returns None on success, else the last failure in one line.
    """
    error = "no URL given"
    for url in urls:
        for attempt in range(retries + 1):
            try:
                _fetch(url, part, timeout, progress, task, size_hint)
                return None
            except _Interrupted as interrupted:
                error = str(interrupted)
                if attempt < retries:
                    logger.warning("%s; resuming (%d of %d)", error, attempt + 1, retries)
            except DownloadError as failed:  # an HTTP error status: try the next URL
                error = str(failed)
                break
    return error


def download_file(
    urls: str | Sequence[str],
    dest: str | Path,
    checksum: str,
    progress: Progress | None = None,
    task: str = "downloading",
    size_hint: int = 0,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download ``dest`` from the first of ``urls`` that answers, resumably, and verify its checksum.

    Args:
        urls: One URL or several mirrors of the same file, tried in order when one fails to answer.
        dest: The final file; the download goes to ``<dest>.part``, renamed only once verified.
        checksum: Hex sha256 (64 digits) or md5 (32 digits) of the file.
        progress: Called as ``progress(task, bytes_done, bytes_total)``.
        size_hint: Total shown before the server names a length (0: unknown).
        timeout: Seconds a connection may stay silent.
        retries: Resumes after a dropped connection within this call.

    Returns:
        ``dest``. A ``dest`` already there with the right checksum is not fetched again.

    Raises:
        DownloadError: every URL failed, the connection dropped more than ``retries`` times (the ``.part``
            file stays, so a later call resumes), or the checksum is wrong (the file is removed).
    """
    kind = _hash_kind(checksum)
    progress = progress or _silent
    dest = Path(dest)
    candidates = [urls] if isinstance(urls, str) else list(urls)
    if not candidates:
        raise DownloadError(f"no URL given for {dest.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and file_digest(dest, kind) == checksum.lower():
        return dest
    part = dest.with_name(dest.name + ".part")
    error = _fetch_any(candidates, part, timeout, retries, progress, task, size_hint)
    if error is not None:
        keep = " (the partial file is kept; call again to resume)" if part.exists() else ""
        raise DownloadError(f"{error}{keep}")
    got = file_digest(part, kind)
    if got != checksum.lower():
        part.unlink()
        raise DownloadError(
            f"checksum mismatch for {dest.name}: expected {kind} {checksum.lower()}, got {got}; "
            "the downloaded file was removed"
        )
    os.replace(part, dest)
    return dest


def _member_parts(name: str) -> tuple[str, ...]:
    """The path components of a tar member name, or a DownloadError when it would leave the destination."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name or "\0" in name:
        raise DownloadError(f"refusing archive member {name!r}: not a plain relative path")
    parts = tuple(part for part in PurePosixPath(name).parts if part != ".")
    if ".." in parts:
        raise DownloadError(f"refusing archive member {name!r}: it climbs out of the destination with '..'")
    return parts


def _check_member(member: tarfile.TarInfo) -> tuple[str, ...]:
    parts = _member_parts(member.name)
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "device or special file"
        raise DownloadError(f"refusing archive member {member.name!r}: it is a {kind}")
    return parts


def extract_tar(
    archive: str | Path,
    dest: str | Path,
    top_level: Sequence[str] | None = None,
    progress: Progress | None = None,
    task: str = "extracting",
) -> list[str]:
    """Extract a (compressed) tar archive into ``dest``, safely.

    Only regular files and folders are written, each to a path computed here from its checked name; any
    absolute or ``..`` member, link, device or FIFO refuses the whole archive. The members go to a hidden
    temporary folder inside ``dest`` first, and each top-level entry is then renamed into ``dest``; an entry
    that already exists in ``dest`` is left as it is.

    Args:
        archive: The tar file (plain, gz, bz2 or xz).
        dest: The destination folder, created when missing.
        top_level: When given, only top-level folders with these names (and top-level files) are extracted.
        progress: Called as ``progress(task, compressed_bytes_read, archive_bytes)``.

    Returns:
        The sorted top-level names moved into ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    progress = progress or _silent
    wanted = None if top_level is None else set(top_level)
    dest.mkdir(parents=True, exist_ok=True)
    total = archive.stat().st_size
    temp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=dest))
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in tar:
                parts = _check_member(member)
                if not parts or (wanted is not None and parts[0] not in wanted and len(parts) > 1):
                    continue
                target = temp.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have data
                    raise DownloadError(f"cannot read archive member {member.name!r}")
                with source, open(target, "wb") as handle:
                    shutil.copyfileobj(source, handle, _CHUNK)
                progress(task, raw.tell(), total)
        moved = []
        for entry in sorted(temp.iterdir(), key=lambda p: p.name):
            final = dest / entry.name
            if final.exists():
                logger.info("%s already exists; keeping it", final)
                continue
            os.replace(entry, final)
            moved.append(entry.name)
        progress(task, total, total)
        return moved
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DownloadError(f"cannot extract {archive.name}: {_first_line(error)}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _notice() -> str:
    global _notice_logged
    if not _notice_logged:
        logger.warning(MVTEC_AD_NOTICE)
        _notice_logged = True
    return MVTEC_AD_NOTICE


def _check_categories(categories: Sequence[str] | None) -> list[str] | None:
    if not categories:
        return None
    unknown = [name for name in categories if name not in MVTEC_AD_CATEGORIES]
    if unknown:
        raise DownloadError(
            f"unknown MVTec AD category {unknown[0]!r} (known: {', '.join(MVTEC_AD_CATEGORIES)})"
        )
    return list(dict.fromkeys(categories))


def download_mvtec_ad(
    root: str | Path,
    categories: Sequence[str] | None = None,
    url: str | Sequence[str] = MVTEC_AD_URLS,
    progress: Progress | None = None,
    checksum: str = MVTEC_AD_SHA256,
    keep_archive: bool = False,
    timeout: float = 60.0,
    retries: int = 3,
) -> MVTecDownload:
    """Download the MVTec AD archive into ``root`` and extract ``categories`` (every one when None or empty).

    The archive is fetched to ``root/.mvtec_anomaly_detection.tar.xz`` (resumable, see :func:`download_file`),
    verified against ``checksum``, extracted with :func:`extract_tar` and removed unless ``keep_archive``
    (then it stays as ``root/mvtec_anomaly_detection.tar.xz``). An archive already at that visible name
    (downloaded by hand) is verified and extracted without fetching anything, and kept. Category folders
    already in ``root`` are kept as they are. The licence notice is logged at WARNING once per process and
    returned in the result.

    Raises:
        DownloadError: an unknown category, a failed download, a checksum mismatch, an unsafe archive, or an
            archive that lacks a requested category.
    """
    if retries < 0:
        raise DownloadError(f"retries must be >= 0, got {retries}")
    chosen = _check_categories(categories)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    notice = _notice()
    placed = root / MVTEC_AD_ARCHIVE  # put there by the user, or kept by an earlier call
    archive = placed if placed.is_file() else root / f".{MVTEC_AD_ARCHIVE}"
    size_hint = MVTEC_AD_SIZE if checksum == MVTEC_AD_SHA256 else 0
    logger.info("downloading MVTec AD into %s", root)
    download_file(url, archive, checksum, progress, "downloading MVTec AD", size_hint, timeout, retries)
    try:
        moved = extract_tar(archive, root, top_level=chosen, progress=progress, task="extracting MVTec AD")
    except DownloadError:
        archive.unlink(missing_ok=True)
        raise
    missing = [name for name in chosen or () if not (root / name).is_dir()]
    if missing:
        raise DownloadError(f"the MVTec AD archive holds no category {missing[0]!r}")
    kept = placed if archive == placed else None
    if keep_archive and kept is None:
        kept = placed
        os.replace(archive, kept)
    elif kept is None:
        archive.unlink(missing_ok=True)
    added = [name for name in moved if (root / name).is_dir()]
    skipped = [name for name in chosen or () if name not in added]
    logger.info("MVTec AD: extracted %s into %s", ", ".join(added) or "nothing new", root)
    return MVTecDownload(root=root, categories=added, notice=notice, archive=kept, skipped=skipped)


def _is_ours(entry: Path) -> bool:
    """True for what an MVTec AD root holds: category folders, the licence and readme, hidden files."""
    if entry.name.startswith("."):
        return True
    if entry.is_dir():
        return entry.name in MVTEC_AD_CATEGORIES
    return entry.name.lower() in _TOP_LEVEL_FILES or entry.name == MVTEC_AD_ARCHIVE


def ensure_mvtec_ad(
    root: str | Path,
    categories: Sequence[str] | None = None,
    progress: Progress | None = None,
    **download: Any,
) -> MVTecDownload | None:
    """Download MVTec AD into ``root`` only when it is needed; None when nothing was done.

    It is needed when a requested category (all 15 when None or empty) has no folder in ``root`` and
    ``root`` is missing, empty, or holds nothing but MVTec AD's own entries (an earlier partial download).
    Every category of the archive that ``root`` lacks is then extracted, not only the requested ones, so one
    download serves later runs. A ``root`` that holds anything else is left alone (the loader then says
    what is missing). ``download`` goes to :func:`download_mvtec_ad` (``url``, ``checksum``, ...).
    """
    chosen = _check_categories(categories) or list(MVTEC_AD_CATEGORIES)
    root = Path(root).expanduser()
    if all((root / name).is_dir() for name in chosen):
        return None
    if root.exists() and not root.is_dir():
        raise DownloadError(f"MVTec AD root {root} is a file, not a folder")
    if root.is_dir() and not all(_is_ours(entry) for entry in root.iterdir()):
        logger.info("%s holds other files; not downloading MVTec AD into it", root)
        return None
    result = download_mvtec_ad(root, None, progress=progress, **download)
    missing = [name for name in chosen if not (root / name).is_dir()]
    if missing:
        raise DownloadError(f"the MVTec AD archive holds no category {missing[0]!r}")
    return result
