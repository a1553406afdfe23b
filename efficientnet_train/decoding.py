"""Image bytes from outside to RGB pixels, bounded in time and memory before decoding starts.

Every image a job or the endpoint reads comes through `decode_image`, and training's header check (`check_image`,
for every file of a channel before the model is built) asks `decode_problem` the same question, so a file that
would take seconds or gigabytes to decode is refused, with the reason, wherever it arrives. What decoding costs
is known from the header for every format but one case: a progressive JPEG keeps a coefficient buffer of its full
size even when it decodes at 1/8 scale, and walks every block of it once per scan, so a small file repeating one
scan thousands of times costs a minute of one core (docs/security.md). Its scans are counted and its buffer sized
before decoding.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageChops, UnidentifiedImageError

# What an image may be inside, whatever its extension says (scrapers save PNGs as .jpg). Naming them keeps
# Pillow from guessing exotic formats from a few bytes of a file that is no image at all. (Phones'
# multi-picture JPEGs open as JPEG and become MPO.)
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
# JPEGs at least twice this on their short side decode at 1/2, 1/4 or 1/8 scale, still at least this
# large: the same picture for a model that sees at most 1024 pixels, for a fraction of the time and memory.
# Training and validation ask for less: just what their crops need (`data.decode_side`).
DECODE_MIN_SIDE = 2048
# A progressive JPEG's scans times the 8x8 blocks of its full size: each scan walks every block, so this bounds
# the decode to a second or two (docs/security.md). Encoders write 6 to 12 scans: 12 scans of an 89-megapixel
# (Pillow's limit) 4:2:0 photo are 25 million.
MAX_SCAN_BLOCKS = 30_000_000
CHECK_THREADS = 32  # header reads wait on the disk, or on S3 under FastFile: many at once
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}

# Images above Image.MAX_IMAGE_PIXELS are refused by the checks here; Pillow's own warning would only
# repeat that for each file.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may cost: `pixels` decoded (a JPEG's at the reduced scale it decodes at) and `bytes`
    allocated, as `decode_bytes` estimates them from the header (docs/security.md has the measured peaks)."""

    pixels: int
    bytes: int


# Training reads the buyer's own files, as large as Pillow's decompression-bomb limit (89 megapixels), one
# decode per loader worker at a time; the endpoint's requests come from anyone, as many at once as it has cores.
TRAINING = DecodeLimits(pixels=Image.MAX_IMAGE_PIXELS, bytes=768 << 20)
ENDPOINT = DecodeLimits(pixels=4096 * 4096, bytes=256 << 20)


class UnreadableImage(ValueError):
    """Bytes that are not a whole, reasonably sized image; the message says which of those."""


class TooCostly(Image.DecompressionBombError):
    """An image whose decode would cost more time or memory than the limits allow."""


def load_image(path: str, min_side: int = DECODE_MIN_SIDE, limits: DecodeLimits = TRAINING) -> Image.Image:
    with open(path, "rb") as f:
        try:
            return decode_image(f, min_side, limits)
        except UnreadableImage as exc:
            raise UnreadableImage(f"{path}: {exc}") from exc


def decode_image(source: bytes | BinaryIO, min_side: int = DECODE_MIN_SIDE,
                 limits: DecodeLimits = TRAINING) -> Image.Image:
    """An RGB image from encoded bytes or a binary file, upright as its EXIF says, fully decoded; a JPEG
    twice `min_side` or more on its short side at the reduced scale that keeps it at least that large
    (JPEG decodes at 1/2, 1/4 or 1/8 scale several times faster).

    Transparent pixels are shown on white, as a viewer shows them; 16-bit images are scaled to 8 bits;
    animations give their first frame. Only IMAGE_FORMATS. Refuses what would cost more than `limits`
    (decompression bombs, progressive JPEGs with thousands of scans) and files cut short, instead of
    returning half an image.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            problem = decode_problem(image, source, min_side, limits)
            if problem:
                raise TooCostly(problem)
            image.load()  # decodes every pixel: a truncated file fails here, not later
            orientation = _orientation(image)
            rgb = _to_rgb(image)
        # The decoded image is closed (freed) before the upright copy is made: two RGB copies at most.
        return rgb.transpose(orientation) if orientation is not None else rgb
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"the image is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImage("the data is not an image in a format this model takes "
                              "(JPEG, PNG, GIF, BMP, WebP or TIFF)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports a cut-short or corrupt file as OSError ("image file is truncated"), SyntaxError
        # or EOFError depending on the format.
        raise UnreadableImage(f"the image is truncated or corrupt ({exc})") from exc


def decode_problem(image: Image.Image, source: BinaryIO, min_side: int = DECODE_MIN_SIDE,
                   limits: DecodeLimits = TRAINING) -> str | None:
    """Why decoding `image` (opened, not yet loaded, from `source`) would cost more than `limits`, or None.
    Sets a JPEG's reduced decode scale (draft) on the way: what it costs depends on it. Reads `source` to
    its end for a progressive JPEG, whose scans are only known there, and leaves its position as it was."""
    full_width, full_height = image.size
    if Image.MAX_IMAGE_PIXELS and full_width * full_height > Image.MAX_IMAGE_PIXELS:
        return (f"{full_width}x{full_height} pixels, more than the {Image.MAX_IMAGE_PIXELS:,} an image may have; "
                f"not decoded (a decompression bomb, or far more than the model needs)")
    jpeg = image.format in ("JPEG", "MPO")
    if jpeg and min(image.size) >= 2 * min_side:
        image.draft("RGB", (min_side, min_side))
    if image.width * image.height > limits.pixels:
        return (f"it is {image.width}x{image.height} pixels{' decoded' if jpeg else ''}, more than the "
                f"{limits.pixels:,} accepted here; the model sees a few hundred pixels a side, so send it resized "
                f"(or as a JPEG, which decodes at a reduced scale)")
    progressive = jpeg and bool(image.info.get("progressive"))
    blocks = _coefficient_blocks(image, full_width, full_height) if progressive else 0
    if progressive:
        scans = _scans(source)
        if scans * blocks > MAX_SCAN_BLOCKS:
            return (f"a progressive JPEG of {scans:,} scans over {full_width}x{full_height} pixels; decoding walks "
                    f"the whole image once a scan ({scans * blocks:,} blocks, more than the {MAX_SCAN_BLOCKS:,} "
                    f"accepted), which takes far longer than any photo: save it again as a baseline JPEG")
    needed = decode_bytes(image, blocks)
    if needed > limits.bytes:
        return (f"decoding this {full_width}x{full_height} {image.format} ({image.mode}"
                f"{', progressive' if progressive else ''}) would take about "
                f"{needed / 2**20:,.0f} MB of memory, more than the {limits.bytes / 2**20:,.0f} MB one image may "
                f"use here: send it smaller, or as a baseline JPEG")
    return None


def decode_bytes(image: Image.Image, coefficient_blocks: int = 0) -> int:
    """What decoding `image` (opened, its draft set) into an upright RGB image allocates at its peak: the decoded
    pixels as Pillow stores them, the conversions `_to_rgb` makes, the upright copy, a WebP decoder's own canvas,
    and a progressive JPEG's full-size coefficient buffer (`coefficient_blocks` of 64 coefficients, 2 bytes each)."""
    pixels = image.width * image.height
    stored = 1 if image.mode in ("1", "L", "P") else 2 if image.mode.startswith("I;16") else 4
    if _transparent(image):
        converting = (0 if image.mode == "RGBA" else 4) + 4 + 2  # RGBA, RGB, the alpha band and its inverse
    elif _deep(image):
        converting = 4 + 1 + 4  # float32 grey, 8-bit grey, RGB
    else:
        converting = 0 if image.mode == "RGB" else 4
    decoder = 8 if image.format == "WEBP" else 0  # libwebp's canvas, and the copy Pillow takes of it
    upright = 4
    return pixels * max(stored + converting + decoder, 4 + upright) + 128 * coefficient_blocks


def _coefficient_blocks(image: Image.Image, width: int, height: int) -> int:
    """The 8x8 blocks of a JPEG at its full size, over its components (each subsampled as its header says)."""
    layers = getattr(image, "layer", None) or [(None, 1, 1, None)] * len(image.getbands())
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    return sum(math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
               for _, h, v, _ in layers)


def _scans(source: BinaryIO) -> int:
    """Start-of-scan markers in a JPEG. A 0xFF byte inside entropy-coded data is always followed by 0x00 or a
    restart marker, so FF DA there is a scan; one inside a metadata segment (an EXIF thumbnail's) counts too,
    which only errs towards refusing."""
    position = source.tell()
    try:
        source.seek(0)
        count, tail = 0, b""
        while chunk := source.read(1 << 20):
            count += (tail + chunk).count(b"\xff\xda")
            tail = chunk[-1:] if chunk[-1:] == b"\xff" else b""
        return count
    finally:
        source.seek(position)


def _transparent(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _deep(image: Image.Image) -> bool:
    return image.mode in ("I", "F") or image.mode.startswith("I;16")


def _orientation(image: Image.Image) -> Image.Transpose | None:
    try:
        return _ORIENTATION.get(image.getexif().get(ExifTags.Base.Orientation, 1))  # phones rotate in EXIF
    except Exception:  # noqa: BLE001 - a garbled EXIF block should not cost the picture
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if _deep(image):
        return _eight_bit(image).convert("RGB")
    if _transparent(image):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        # White pasted through the inverted alpha band is alpha compositing over white, in place in one RGB
        # image (Image.alpha_composite makes three full-size RGBA copies).
        rgb = rgba.convert("RGB")
        rgb.paste((255, 255, 255), mask=ImageChops.invert(rgba.getchannel("A")))
        return rgb
    return image.convert("RGB")


def _eight_bit(image: Image.Image) -> Image.Image:
    """Grey levels of a 16-bit or 32-bit image on 0..255; convert("RGB") would clip them to white. In float32:
    float64 copies of a large 16-bit image cost 8 bytes a pixel twice over."""
    pixels = np.asarray(image).astype(np.float32)
    peak = pixels.max() if pixels.size else 0
    if image.mode == "F" and peak <= 1.0:
        pixels *= 255  # floats from 0 to 1
    elif image.mode.startswith("I;16") or peak > 255:
        pixels /= 257  # 16 bits: 65535 -> 255
    np.rint(pixels, out=pixels)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))


class Unusable:
    """Why a file can't be used as an image, as the log and args.yml count them."""

    EMPTY = "empty"
    UNREADABLE = "cannot be read"
    UNSUPPORTED = "unsupported format"
    CORRUPT = "truncated or corrupt"
    TOO_LARGE = "too large"


# ---- header checks: before the first epoch, every file of a channel ------------------------------------------


def check_images(paths: list[str]) -> list[tuple[str, str] | None]:
    """`check_image` of each path, many at once: 100,000 files take seconds, not minutes."""
    chunks = [paths[start:start + 256] for start in range(0, len(paths), 256)]
    if len(chunks) <= 1:
        return [check_image(path) for path in paths]
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        return [problem for chunk in pool.map(lambda chunk: [check_image(p) for p in chunk], chunks)
                for problem in chunk]


def check_image(path: str) -> tuple[str, str] | None:
    """Why a file can't be used as a training image, or None: from its header and last bytes alone; only a
    file whose end looks cut short is decoded, to tell a truncated file from one with bytes after its end."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a named pipe would wait for a writer forever
            return Unusable.UNREADABLE, "not a regular file (a named pipe, socket or device)"
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return Unusable.EMPTY, "0 bytes"
            head = f.read(16)
            f.seek(0)
            problem, image_format = _header_problem(f, head)
            if problem or _ends_completely(f, size, image_format, head):
                return problem
    except OSError as exc:  # a broken link, no permission, an I/O error of a network file system
        return Unusable.UNREADABLE, exc.strerror or str(exc)
    try:
        load_image(path)
    except (UnreadableImage, OSError) as exc:
        return Unusable.CORRUPT, str(exc.__cause__ or exc)
    except Exception as exc:  # noqa: BLE001 - a decoder tripping over odd bytes: the file is the problem
        return Unusable.CORRUPT, f"{type(exc).__name__}: {exc}"
    return None


def _header_problem(f: BinaryIO, head: bytes) -> tuple[tuple[str, str] | None, str]:
    try:
        with Image.open(f, formats=IMAGE_FORMATS) as image:
            image_format = image.format
            too_costly = decode_problem(image, f)  # what decoding would cost, as decode_image will judge it
    except UnidentifiedImageError:
        return (Unusable.UNSUPPORTED, _what_else(head)), ""
    except Image.DecompressionBombError:
        return (Unusable.TOO_LARGE, f"more than twice the {Image.MAX_IMAGE_PIXELS} pixels an image may have; not "
                                f"decoded (a decompression bomb?)"), ""
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins report bad headers in many types
        return (Unusable.CORRUPT, f"bad header: {type(exc).__name__}: {exc}"), ""
    if too_costly:
        return (Unusable.TOO_LARGE, too_costly), ""
    return None, image_format


def _what_else(head: bytes) -> str:
    if head[4:8] == b"ftyp":
        return "HEIC/HEIF or AVIF data (phone photos): convert it to JPEG"
    if head.lstrip().startswith(b"<"):
        return "an HTML or XML page, not an image (a failed download?)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    return "the data is not JPEG, PNG, GIF, BMP, WebP or TIFF"


def _ends_completely(f: BinaryIO, size: int, image_format: str, head: bytes) -> bool:
    """Whether the file ends with its format's end marker; formats without one pass here, and a file cut
    short is then found when training decodes it."""
    f.seek(max(0, size - 64))
    tail = f.read()
    if image_format in ("JPEG", "MPO"):
        return b"\xff\xd9" in tail
    if image_format == "PNG":
        return b"IEND" in tail
    if image_format == "GIF":
        return tail.rstrip(b"\0").endswith(b";")
    if image_format == "WEBP":
        return size >= int.from_bytes(head[4:8], "little") + 8
    return True

