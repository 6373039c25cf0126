"""Read any image the project meets into an 8-bit PIL image ("L" or "RGB").

Sources: a path (JPEG/PNG/TIFF/..., or DICOM), a PIL image, or a numpy array.
Medical images come as 16-bit PNGs, RGBA screenshots and DICOM files with
Hounsfield units; everything is mapped to 8 bits here so that encoders and the
feature cache see one kind of input.

Decisions (why):
- High bit depths are stretched min..max to 0..255: 12-bit data stored in 16
  bits would look black if divided by 65535.
- Alpha is composited over black, the background of radiology images.
- DICOM: modality rescale (slope/intercept) first, then the file's own window
  (first WindowCenter/WindowWidth) or min..max, then MONOCHROME1 is inverted so
  that bright always means dense. Multi-frame files give their middle frame,
  the most representative slice of a volume.
- A photograph's EXIF orientation is applied, whether it comes as a path, bytes
  or an opened PIL image: a phone picture of a film reads upright every way in.
- Decoding is bounded before it starts: the pixel count is read from the file's
  header and a file above `max_pixels` (default 50 Mpx, or $MEDVQA_MAX_IMAGE_PIXELS)
  is refused; a large JPEG asked for at `max_side` decodes at reduced size (PIL's
  draft mode, 1/2 to 1/8 scale) instead of being decoded whole and then shrunk.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]
MAX_PIXELS = 50_000_000  # the default bound on a file's width x height; $MEDVQA_MAX_IMAGE_PIXELS overrides it


def max_pixels() -> int:
    """The pixel-count bound in force: $MEDVQA_MAX_IMAGE_PIXELS if set, else MAX_PIXELS."""
    value = os.environ.get("MEDVQA_MAX_IMAGE_PIXELS")
    try:
        return int(value) if value else MAX_PIXELS
    except ValueError:
        raise ValueError(f"MEDVQA_MAX_IMAGE_PIXELS={value!r}: expected a whole number of pixels") from None


def check_pixels(width: int, height: int, path: Path) -> None:
    limit = max_pixels()
    if width * height > limit:
        raise ValueError(f"{path}: image is {width}x{height} ({width * height / 1e6:.0f} Mpx), above the limit of "
                         f"{limit / 1e6:.0f} Mpx (set MEDVQA_MAX_IMAGE_PIXELS to allow more)")

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset zlib-compressed


def load_image(src: ImageSource, max_side: int | None = None) -> Image.Image:
    """Return `src` as an 8-bit PIL image in mode "L" (gray) or "RGB".

    `max_side` says how large the caller needs it: a JPEG much larger than that
    decodes at reduced size (at least `max_side` on its long side). Raises
    FileNotFoundError for a missing path and ValueError, naming the file, for a
    directory, a file that is not a readable image, or one above the pixel limit.
    """
    if isinstance(src, Image.Image):  # Image.open(path) reads as the path does: turned upright by its EXIF tag
        return to_8bit(ImageOps.exif_transpose(src))
    if isinstance(src, np.ndarray):
        return array_to_image(src)
    if isinstance(src, (str, os.PathLike)):
        return _load_path(Path(src), max_side)
    raise TypeError(f"cannot read an image from {type(src).__name__}; pass a path, PIL image or numpy array")


def _load_path(path: Path, max_side: int | None = None) -> Image.Image:
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if is_dicom(path):
        return load_dicom(path)
    return _decode(path, path, max_side)


def decode_image(data: bytes, name: str) -> Image.Image:
    """An image file's bytes (a tar shard's member) as `load_image` gives the same file from disk: the same
    decode, frame and orientation, so features of a shard member equal those of its source file. Raises
    ValueError naming `name` when the bytes are not a readable image (DICOM is not read from bytes)."""
    import io

    return _decode(io.BytesIO(data), Path(name), None)


def _decode(source, path: Path, max_side: int | None) -> Image.Image:
    try:
        with Image.open(source) as img:
            check_pixels(*img.size, path)  # from the header: nothing is decoded yet
            width, height = img.size
            if max_side and img.format == "JPEG" and max(width, height) >= 2 * max_side:
                scale = max_side / max(width, height)
                img.draft("RGB" if img.mode not in ("L", "RGB") else img.mode,
                          (max(1, round(width * scale)), max(1, round(height * scale))))
            img.load()  # decode now, so a truncated file fails here, not later
            if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":  # a stack of slices: the middle one
                img.seek(img.n_frames // 2)  # (a camera's MPO JPEG: frame 0 is the photograph, the rest previews)
                check_pixels(*img.size, path)  # a frame's size is its own: the first may be 1x1, the middle huge
            return to_8bit(ImageOps.exif_transpose(img))  # photographed figures may carry a rotation
    except Image.DecompressionBombError as e:  # PIL's own bound (~179 Mpx), under a raised MEDVQA_MAX_IMAGE_PIXELS
        raise ValueError(f"{path}: image too large for PIL to decode ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def is_dicom(path: Path) -> bool:
    """DICOM by suffix or by the "DICM" magic after the 128-byte preamble."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def to_8bit(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to "L" or "RGB" without losing contrast."""
    if img.mode in ("L", "RGB"):
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return array_to_image(np.asarray(img))
    if img.mode in ("1", "P", "PA", "LA", "RGBA", "La", "RGBa"):
        has_alpha = img.mode in ("PA", "LA", "RGBA", "La", "RGBa") or "transparency" in img.info
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, rgba)
        gray = img.mode in ("1", "L", "LA", "La")
        return img.convert("L" if gray else "RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def array_to_image(arr: np.ndarray) -> Image.Image:
    """numpy (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}, any dtype -> 8-bit PIL."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first -> channel-last
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got shape {arr.shape}")
    arr8 = _scale_to_uint8(arr)
    img = Image.fromarray(arr8)  # (H, W) -> "L", (H, W, 3) -> "RGB", (H, W, 4) -> "RGBA"
    return to_8bit(img) if img.mode == "RGBA" else img


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    x = arr.astype(np.float64)
    if not np.isfinite(x).all():
        finite = x[np.isfinite(x)]
        if finite.size == 0:
            raise ValueError("image array has no finite values")
        x = np.nan_to_num(x, nan=finite.min(), posinf=finite.max(), neginf=finite.min())
    if np.issubdtype(arr.dtype, np.floating) and x.min() >= 0.0 and x.max() <= 1.0:
        return np.round(x * 255.0).astype(np.uint8)  # already a [0, 1] image
    return window_to_uint8(x, x.min(), x.max())


def window_to_uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..255, clipping outside (a flat image gives 0)."""
    if high <= low:
        return np.zeros(x.shape, dtype=np.uint8)
    y = (np.asarray(x, dtype=np.float64) - low) / (high - low)
    return np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_dicom(path: Path) -> Image.Image:
    """Read a DICOM file (needs pydicom) into an 8-bit PIL image."""
    try:
        import pydicom
    except ImportError as e:
        raise ImportError(f"{path}: reading DICOM needs pydicom (pip install pydicom)") from e
    _refuse_deflated_dicom(pydicom, path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for bad files
        raise ValueError(f"{path}: not a readable DICOM image ({e})") from e
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)  # colour: three values a pixel
    one_frame = _frame_decoder() if frames > 1 else None
    # What is decoded is held to the limit: the middle frame alone where pydicom (3+) decodes one, else every frame.
    check_pixels(int(ds.get("Columns", 0) or 0),
                 int(ds.get("Rows", 0) or 0) * (1 if one_frame else frames) * samples, path)
    try:
        pixels = one_frame(ds, index=frames // 2) if one_frame else ds.pixel_array
    except Exception as e:  # pydicom raises many types for bad files
        raise ValueError(f"{path}: not a readable DICOM image ({e})") from e
    if frames > 1:
        pixels = pixels if one_frame else pixels[frames // 2]
        logger.debug("%s: %d frames, using the middle one", path, frames)
    if samples > 1:  # colour DICOM (pydicom already converts YBR to RGB)
        return array_to_image(pixels)
    return Image.fromarray(dicom_gray_to_uint8(ds, pixels))


def _frame_decoder():
    """pydicom 3's `pixel_array(ds, index=i)`, which decodes frame i alone; None with pydicom 2 (all frames)."""
    try:
        from pydicom.pixels import pixel_array
    except ImportError:
        return None
    return pixel_array


def _refuse_deflated_dicom(pydicom, path: Path) -> None:
    """A deflated DICOM is inflated whole, in memory, before any size can be checked: a few MB of zeros uploaded to
    the demo would become gigabytes. Such files are refused (rare in practice; re-save them uncompressed)."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # no file meta (a bare dataset): dcmread decides, and cannot inflate without one
        return
    if str(meta.get("TransferSyntaxUID", "")) == DEFLATED_DICOM:
        raise ValueError(f"{path}: a deflated DICOM (transfer syntax {DEFLATED_DICOM}) is not read: its size is "
                         "unknown until it is inflated whole; save it uncompressed (or JPEG/RLE) first")


def dicom_gray_to_uint8(ds, pixels: np.ndarray) -> np.ndarray:
    """Rescale slope/intercept, window to 8 bits, invert MONOCHROME1."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = pixels.astype(np.float64) * slope + intercept
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        out = window_to_uint8(values, center - width / 2.0, center + width / 2.0)
    else:
        out = window_to_uint8(values, values.min(), values.max())
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1 stores dense as dark
    return out


def _first(value) -> float | None:
    """WindowCenter/Width may be one value or several (the first is the default)."""
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None
