"""Reading and writing dataset images and masks with Pillow.

Images leave this module as RGB ``uint8`` arrays of shape (H, W, 3) and masks as ``bool`` arrays of shape
(H, W), the boundary types of kka-synth. Grayscale, palette, 1-bit, 16-bit, float and alpha images are
converted on the way in:

- 16-bit integer images (``I;16`` and ``I``) are scaled by 1/257, so 65535 maps to 255.
- 32-bit float images (``F``) are taken as [0, 1] when no value exceeds 1, otherwise as [0, 255]; both
  are clipped.
- The alpha channel is dropped: the stored colour of each pixel is kept, nothing is blended.
- Pixels stay in stored order (the EXIF orientation tag is not applied), so masks drawn on the stored
  pixels keep lining up with their images.

The optional square ``size`` does not keep the aspect ratio (as the MVTec AD and VisA benchmarks
resize). Images shrink with area averaging and grow bilinearly, and masks use nearest neighbour. Any
problem with a file raises :class:`DataError` with one line that names the file: an unreadable, truncated
or corrupt file, a mode Pillow cannot convert, an image of zero size, or one whose header declares more
than :data:`MAX_PIXELS` pixels (a decompression bomb is refused from its header, before any pixel is
decoded).
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File name endings read as images, compared case-insensitively."""

MAX_PIXELS = 89_478_485
"""Most pixels (width x height) an image may declare; larger ones are refused before decoding. It is
Pillow's own warning threshold (about 9459 x 9459, some 270 MB as RGB)."""

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
"""Failed writes reported as "cannot write <path>: <reason>" (the errno set of ``kka_synth.runs``)."""
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SINGLE_CHANNEL = ("1", "L", "F", *_SIXTEEN_BIT)


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names it."""


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose name ends in one of :data:`IMAGE_EXTENSIONS`."""
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _open(path: str | Path) -> Image.Image:
    """Open and fully decode one image file, turning every failure into a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with _opened(path) as image:
            _check_pixels(path, image.size)
            image.load()
            return image
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file can make any Pillow plugin raise anything
        raise DataError(f"cannot read image {path}: {_first_line(error)}") from None


def _opened(path: Path) -> Image.Image:
    """``Image.open`` without Pillow's decompression-bomb warning: :func:`_check_pixels` applies the limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _check_pixels(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise DataError(f"cannot read image {path}: it has zero size ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise DataError(
            f"cannot read image {path}: {width}x{height} is {width * height} pixels, more than the limit of "
            f"{MAX_PIXELS} (a corrupt header or a decompression bomb)"
        )


def _check_size(size: int | None) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise DataError(f"size must be a positive int or None, got {size!r}")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any Pillow mode; see the module docstring for the rules."""
    if image.mode in _SIXTEEN_BIT:
        gray = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.asarray(image).astype(np.float64)
        gray = np.nan_to_num(gray, nan=0.0, posinf=255.0, neginf=0.0)
        if gray.size and gray.max() <= 1.0:
            gray = gray * 255.0
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        if image.mode in ("PA", "La", "RGBa"):
            image = image.convert("RGBA")
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def _to_mask(image: Image.Image) -> np.ndarray:
    """(H, W) bool: any nonzero value (any nonzero colour channel) is True."""
    if image.mode in _SINGLE_CHANNEL:
        return np.asarray(image) != 0
    if image.mode in ("PA", "La", "RGBa"):
        image = image.convert("RGBA")
    return np.any(np.asarray(image.convert("RGB")) != 0, axis=2)


def _converted(path: str | Path, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """``convert`` of the decoded image at ``path``; a mode Pillow cannot convert is a :class:`DataError`."""
    image = _open(path)
    try:
        return convert(image)
    except (ValueError, OSError, TypeError) as error:
        raise DataError(f"cannot read image {path}: mode {image.mode} ({_first_line(error)})") from None


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Resize RGB uint8 (H, W, 3) to (size, size, 3): area averaging when shrinking, else bilinear."""
    _check_size(size)
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image.copy()
    shrink = size <= height and size <= width
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.array(Image.fromarray(image).resize((size, size), resample=resample), dtype=np.uint8)


def load_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3), or (size, size, 3) when ``size`` is given."""
    _check_size(size)
    rgb = _converted(path, _to_rgb)
    return rgb if size is None else resize_rgb(rgb, size)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (size, size)."""
    _check_size(size)
    if mask.shape == (size, size):
        return mask.copy()
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size, size), resample=Image.Resampling.NEAREST)) > 0


def mask_files(path: str | Path) -> list[Path]:
    """The mask file itself, or the sorted images of a mask folder (which must hold at least one)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = sorted((p for p in path.iterdir() if is_image_file(p)), key=lambda p: p.name)
    if not files:
        raise DataError(f"mask folder holds no images: {path}")
    return files


def load_mask(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read a mask as bool (H, W); any nonzero pixel is True.

    ``path`` may also be a folder of mask images (MVTec LOCO keeps one file per annotated region): the
    result is their union, and they must all have the same size.
    """
    _check_size(size)
    files = mask_files(path)
    mask = _converted(files[0], _to_mask)
    for other in files[1:]:
        part = _converted(other, _to_mask)
        if part.shape != mask.shape:
            raise DataError(
                f"mask size mismatch in {Path(path)}: {files[0].name} is {mask.shape[1]}x{mask.shape[0]}, "
                f"{other.name} is {part.shape[1]}x{part.shape[0]}"
            )
        mask |= part
    return mask if size is None else resize_mask(mask, size)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image from its header only, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with _opened(path) as image:
            width, height = image.size
    except Exception as error:  # noqa: BLE001 - as in _open
        raise DataError(f"cannot read image {path}: {_first_line(error)}") from None
    if width < 1 or height < 1:
        raise DataError(f"cannot read image {path}: it has zero size ({width}x{height})")
    return width, height


def _write_atomic(image: Image.Image, path: Path) -> None:
    """Save through a temporary file in the same folder, then rename, so readers never see half a file."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot save {path}: unknown image file extension {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temp, format=fmt)
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        reason = os.strerror(error.errno).lower() if error.errno in _DISK_ERRNOS else _first_line(error)
        raise DataError(f"cannot write {path}: {reason}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def save_rgb(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB uint8 (H, W, 3) array; the format follows the file extension (PNG is lossless)."""
    path = Path(path)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"cannot save {path}: expected an RGB uint8 (H, W, 3) array, got {got}")
    _write_atomic(Image.fromarray(image), path)


def save_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a bool (or integer, nonzero = True) (H, W) mask as a 0/255 uint8 PNG."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DataError(f"cannot save mask {path}: masks are saved as .png only")
    if (
        not isinstance(mask, np.ndarray)
        or mask.ndim != 2
        or not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer))
    ):
        got = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise DataError(f"cannot save mask {path}: expected a bool (H, W) array, got {got}")
    _write_atomic(Image.fromarray((mask != 0).astype(np.uint8) * 255), path)
