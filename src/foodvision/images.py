"""Photos in, pixels out, without torch: the decoding every stage shares, and the eval transform in
numpy for runtimes without the training stack (ONNX Runtime in `foodvision.serve`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from foodvision.spec import MAX_PIXELS


class ImageTooLarge(ValueError):
    pass


class UnsupportedFormat(ValueError):
    pass


READABLE = "JPEG, PNG, WebP, HEIC, AVIF, GIF, BMP, TIFF"
# Formats people send that no plugin here reads: named, so the user knows what to convert.
KNOWN_OTHERS = ((b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"%PDF", "PDF"),
                (b"<svg", "SVG"), (b"<?xml", "SVG or another XML file"), (b"PK\x03\x04", "a zip archive"))


@functools.cache
def _heif_opener() -> None:
    """HEIC/HEIF (iPhone photos) through pillow-heif, registered with Pillow once, on first use."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def _identify(fp: IO[bytes]) -> str:
    """Why Pillow could not open it, naming the format when it is one people commonly send."""
    fp.seek(0)
    head = fp.read(16)
    name = next((n for magic, n in KNOWN_OTHERS if head.startswith(magic)), None)
    return f"{name} is not supported: convert it to one of {READABLE}" if name else \
        f"not an image this can read ({READABLE})"


# A user's photo (the predict stage and command, foodvision-serve): up to a 50-megapixel camera's. A few
# bytes of WebP or PNG can declare 164 megapixels (3 GB decoded); the header is refused before decoding.
PHOTO_MAX_PIXELS = 50_000_000
# Longer side over shorter side: panoramas pass; a 1 x 100,000 PNG (470 bytes) would need 26 GB once its
# short side is resized to the transform's size.
MAX_ASPECT = 20


def open_rgb(path: Path | IO[bytes], min_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any image Pillow opens (RGBA, L, P, CMYK, EXIF-rotated phone photo) as upright RGB.

    With `min_size`, JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) that keeps both sides at
    least `min_size`: a 12-megapixel phone photo decodes 8x smaller, before the transform resizes it.
    Images over `max_pixels`, or longer than MAX_ASPECT times their width, are refused from the header,
    before any pixel is decoded: the memory one image can cost is bounded.
    """
    try:
        opened = Image.open(path)
    except Image.UnidentifiedImageError:
        if isinstance(path, (str, Path)):
            with open(path, "rb") as f:
                raise UnsupportedFormat(_identify(f)) from None
        raise UnsupportedFormat(_identify(path)) from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"its header claims over the {MAX_PIXELS:,}-pixel limit (a decompression bomb?); "
                            "not decoded") from None
    with opened as im:
        if im.width * im.height > max_pixels:
            raise ImageTooLarge(f"{im.width} x {im.height} pixels is over the {max_pixels:,}-pixel limit "
                                "(a decompression bomb?); not decoded")
        if max(im.size) > MAX_ASPECT * max(1, min(im.size)):
            raise ImageTooLarge(f"{im.width} x {im.height} pixels is longer than {MAX_ASPECT}:1, not a photo; "
                                "not decoded")
        if min_size:
            im.draft("RGB", (min_size, min_size))
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            im = _to_8bit(im)
        if im.mode == "P" and "transparency" not in im.info:
            return im.convert("RGB")
        if im.mode in ("P", "LA", "PA", "RGBA"):  # transparency goes onto white, not black
            im = im if im.mode == "RGBA" else im.convert("RGBA")
            flat = Image.new("RGB", im.size, (255, 255, 255))
            flat.paste(im, mask=im)  # composited in place: 7 bytes a pixel in all, not 15 (two RGBA copies)
            return flat
        return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float grayscale to 8-bit L; Pillow's own convert would clip everything above 255."""
    pixels = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and pixels.max() > 255):
        pixels = pixels / 257.0
    elif im.mode == "F" and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8), "L")


PHOTO_MIN_SIZE = 600  # predict's plot needs this much; every eval transform here resizes to less


def open_photo(path: Path | IO[bytes], transform: dict[str, Any]) -> Image.Image:
    """A user's photo, decoded alike by `predict` (stage and command) and `foodvision-serve`, so all three
    give the same probabilities: a reduced-scale decode alters pixels, so the scale must not differ."""
    _heif_opener()  # photos only: a dataset's images are the formats ImageFolder takes, HEIC is not one
    return open_rgb(path, max(PHOTO_MIN_SIZE, transform["resize_size"]), PHOTO_MAX_PIXELS)


def eval_array(image: Image.Image, transform: dict[str, Any]) -> np.ndarray:
    """The weights' eval transform (transform.json) as torchvision applies it to a PIL image: shorter
    side resized with Pillow, centre crop, scaled to [0, 1], normalised; a 3 x crop x crop float32 array,
    the same bytes as torchvision's preset (a test holds them together on real photos). Every stage and
    the server use this one: it takes less time per image than torchvision's, which counts where decoding
    shares the CPU with the backbone (docs/scale.md has the figures)."""
    size, crop = transform["resize_size"], transform["crop_size"]
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    long = int(size * long / short)
    resized = image.resize((size, long) if w <= h else (long, size), RESAMPLE[transform["interpolation"]])
    left, top = int(round((resized.width - crop) / 2.0)), int(round((resized.height - crop) / 2.0))
    pixels = np.asarray(resized.crop((left, top, left + crop, top + crop)))
    lut = _normalised(tuple(transform["mean"]), tuple(transform["std"]))
    out = np.empty((3, crop, crop), np.float32)
    for c in range(3):  # one gather per channel: the HWC -> CHW transpose and the arithmetic in one pass
        np.take(lut[c], pixels[:, :, c], out=out[c])
    return out


@functools.cache
def _normalised(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Each channel's 256 byte values after torchvision's arithmetic, in its order and in float32
    (value / 255, minus mean, over std): looking a pixel up gives the bytes computing it would."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    return (values[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
            "lanczos": Image.Resampling.LANCZOS}  # torchvision's InterpolationMode values that Pillow has
