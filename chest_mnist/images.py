"""Read one image file into the model's pixels: uint8, gray (or RGB for a colour dataset),
center-cropped to a square and resized to the model's size.

    pixels, note = read_image(Path("xray.dcm"), size=28, channels=1)

Pillow reads PNG, JPEG, BMP, GIF, TIFF and WebP; pydicom reads DICOM (`.dcm`, `.dicom`, or any
file with the DICM preamble, whatever its name). An EXIF orientation (a phone's or a camera's
JPEG) is applied first, so the model sees the picture upright as a viewer shows it. Hospital
exports are rarely 8-bit, and the model was trained on 8-bit MedMNIST pixels, so wider pixels
are brought to 8 bits by one rule, and the note says how:

- DICOM: Rescale Slope and Intercept (the modality LUT) first, giving the scanner's units; then
  the first window (centre/width, VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID: the
  formulas of DICOM PS3.3 C.11.2.1.2-3) to 0..255, or without a window the full range of the
  values (min..max) to 0..255. MONOCHROME1 is inverted so that bone is bright, as in
  MONOCHROME2 and in MedMNIST. One frame only; compressed pixel data needs pydicom's plugins,
  and the message names the packages to install.
- 16-bit (unsigned or signed) and 32-bit gray PNG or TIFF (Pillow modes I;16, I;16B, I, ...),
  and 32-bit float TIFF (mode F): the full range of the values (min..max) to 0..255, as they
  carry no window; a TIFF whose photometric interpretation is MinIsWhite is inverted, as
  MONOCHROME1 is (Pillow does that itself for 8 bits).
- 16-bit colour, or 16-bit gray with alpha (16 bits a channel), is refused: Pillow reads
  only the high byte of each value, which makes a picture of 12 bits nearly black.
- An alpha channel (RGBA, LA, a palette with a transparent colour) that is fully opaque is
  dropped; a transparent pixel is refused, since what lies behind it is the user's call.

An 8-bit image is used as it is, so its 16-bit copy (each value x 257) gives the same pixels
only when it spans 0..255: a wider file says nothing of the range its picture was meant to
fill, and its full range is the usual display default. The note is "" when the file was used as
it was (8-bit gray or RGB). A file that cannot be used
raises ValueError with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

DICOM_SUFFIXES = (".dcm", ".dicom")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGE_SUFFIXES = (*PILLOW_SUFFIXES, *DICOM_SUFFIXES)  # what predict looks for in a folder
# Pillow modes read as they are
READABLE_MODES = {"1": "1-bit", "L": "8-bit gray", "P": "palette", "RGB": "8-bit RGB"}
# gray modes wider than 8 bits, scaled over their full range
WIDE_MODES = {
    "I;16": "16-bit gray",
    "I;16L": "16-bit gray",
    "I;16B": "16-bit gray",
    "I;16N": "16-bit gray",
    "I": "32-bit gray",
    "F": "32-bit float gray",
}
# modes with an alpha channel, and what is left without it (premultiplied ones included)
ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "RGB"}
PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
TIFF_PHOTOMETRIC, TIFF_MIN_IS_WHITE = 262, 0  # the TIFF tag, and its value where 0 is white


def read_image(path: Path, size: int, channels: int) -> tuple[np.ndarray, str]:
    """(pixels, note): uint8 (size, size) gray, or (size, size, 3) for a colour model, the way
    medmnist.INFO describes making its images: center-crop to a square, resize (bicubic, our
    choice: INFO does not name a filter). The note says what was converted to get 8-bit pixels
    ("" when nothing was). ValueError says why a file cannot be used."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
        image, note = _read_dicom(path)
    else:
        image, note = _read_with_pillow(path)
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8), note


def is_image_file(path: Path) -> bool:
    """Whether a folder's file is one to predict: an image suffix, or DICOM's preamble whatever
    the name (hospital exports are named IM000001, or by their UID: 1.2.840.113619.2.55.1).
    Not a DICOMDIR (a disc's index of its images, which are files of their own)."""
    if not path.is_file() or path.name == "DICOMDIR":
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return _has_dicom_preamble(path)
    except OSError:  # unreadable, and named as no image: not the user's image either
        return False


def _has_dicom_preamble(path: Path) -> bool:
    """A DICOM file (PS3.10) starts with 128 bytes of preamble, then "DICM"."""
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _read_with_pillow(path: Path) -> tuple[Image.Image, str]:
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:  # an animated GIF, a multi-page TIFF: as a multi-frame DICOM
                raise ValueError(
                    f"an image of {frames} frames: predict reads single images; save the frame "
                    "you mean as a file of its own"
                )
            # what the file holds, before decoding (Pillow drops both from a transposed copy)
            rawmode = image.tile[0][3] if image.tile else None  # codec args: "RGB;16B", ...
            if isinstance(rawmode, tuple) and rawmode:
                rawmode = rawmode[0]
            min_is_white = getattr(image, "tag_v2", {}).get(TIFF_PHOTOMETRIC) == TIFF_MIN_IS_WHITE
            # before decoding too: Pillow's TIFF reader turns the image itself and drops the tag
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            image.load()  # decode now: a truncated file fails here, not later
            image, upright = _upright(image, orientation)
            rawmode = rawmode if isinstance(rawmode, str) else ""
            image, note = _eight_bits(image, rawmode, min_is_white)
            return image, "; ".join(filter(None, [upright, note]))
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"too large to open safely ({e}); MedMNIST's images are 28 to 224 px: give a "
            "downscaled copy"
        ) from None
    except (OSError, SyntaxError) as e:  # Pillow's truncated / damaged file errors
        raise ValueError(f"damaged or truncated image ({e})") from None


def _upright(image: Image.Image, orientation: int) -> tuple[Image.Image, str]:
    """The image turned as its file's EXIF `orientation` says (a camera's JPEG is often stored
    sideways), and the note; the image itself and "" when it is upright already."""
    if orientation not in range(2, 9):  # 1: upright; anything else is not an orientation
        return image, ""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # not turned while decoded
        image = ImageOps.exif_transpose(image)
    return image, f"turned upright (EXIF orientation {orientation})"


def _eight_bits(image: Image.Image, rawmode: str, min_is_white: bool) -> tuple[Image.Image, str]:
    """The image in one of READABLE_MODES, and what was converted to get there. `rawmode`: how
    the file stores its pixels (Pillow's codec argument, "" if unknown); `min_is_white`: a TIFF
    whose smallest value is white."""
    mode = image.mode
    if mode in ("RGB", "RGBA") and ";16" in rawmode:  # LA;16B too: Pillow makes it RGBA
        raise ValueError(
            f"16 bits a channel in {rawmode.split(';')[0]} ({rawmode}): Pillow reads only the "
            "high byte of each value; save it as 16-bit gray without alpha, or as 8 bits"
        )
    kind = f"{len(image.getbands())} channels"
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        kind = "palette with a transparent colour"
        image = image.convert("RGBA")  # the palette's transparent colour becomes an alpha
    if image.mode in ALPHA_MODES:
        alpha = np.asarray(image.getchannel("A"))
        if (alpha < 255).any():
            raise ValueError(
                f"unsupported pixel format {mode} ({kind}) with "
                f"transparent pixels (alpha below 255 in {(alpha < 255).sum()} of {alpha.size}): "
                "flatten it onto the background you mean, or save it as 8-bit gray or RGB"
            )
        return image.convert(ALPHA_MODES[image.mode]), "alpha channel dropped (fully opaque)"
    if mode in READABLE_MODES:
        return image, ""
    if mode in WIDE_MODES:
        pixels, lo, hi = _full_range(np.asarray(image))
        kind = WIDE_MODES[mode]
        if mode == "I" and rawmode.startswith("I;16"):  # Pillow widens signed 16 bits to I
            kind = "16-bit signed gray" if "S" in rawmode[4:] else "16-bit gray"
        note = f"{kind} scaled to 8 bits {_over(lo, hi)}"
        if min_is_white:  # its smallest value is white: bone bright, as in MONOCHROME2
            pixels, note = 255 - pixels, f"{note}; TIFF MinIsWhite inverted"
        return Image.fromarray(pixels, "L"), note
    bands = len(image.getbands())
    kind = f"{bands} channels" if bands > 1 else "1 channel"
    raise ValueError(
        f"unsupported pixel format {mode} ({kind}"
        + (", 16 or 32 bits per pixel" if mode.startswith(("I", "F")) else "")
        + "): save it as 8-bit gray or RGB (no alpha channel)"
    )


def _read_dicom(path: Path) -> tuple[Image.Image, str]:
    try:
        # force: a .dcm file without the preamble (an older export) is still read
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise ValueError(f"not a DICOM file pydicom can read ({e})") from None
    if ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        raise ValueError(
            "a DICOMDIR, a disc's index of its images, not an image: give the disc's folder "
            "(its image files are read, the DICOMDIR left out) or the image files"
        )
    if not any(name in ds for name in PIXEL_DATA):
        if ds.preamble is None:  # read by force for its suffix: most likely no DICOM at all
            raise ValueError("not a DICOM file pydicom can read (no DICM preamble, no pixel data)")
        raise ValueError(
            "DICOM file without pixel data (a report or other non-image object): "
            "give the image's own DICOM file"
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ValueError(
            f"DICOM with {frames} frames: predict reads single images; export the frame "
            "you mean as a file of its own"
        )
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:  # no file meta (an older export): the encoding pydicom read it in
        implicit, little_endian = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little_endian
            else ExplicitVRBigEndian
        )
    elif syntax.is_compressed:
        _check_decoder(syntax)
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)  # it logs a traceback of what we say in a line
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom's many errors of a damaged or odd file: one file's problem
        raise ValueError(f"cannot decode its DICOM pixel data ({type(e).__name__}: {e})") from None
    finally:
        pydicom_log.setLevel(level)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _dicom_gray(ds, pixels, photometric)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB; pydicom made YBR into RGB
        if pixels.dtype == np.uint8:
            return Image.fromarray(pixels, "RGB"), f"DICOM {photometric}"
        scaled, lo, hi = _full_range(pixels)
        return Image.fromarray(scaled, "RGB"), (
            f"DICOM {photometric} scaled to 8 bits {_over(lo, hi)}"
        )
    raise ValueError(
        f"DICOM photometric interpretation {photometric} is not read (MONOCHROME1, "
        "MONOCHROME2 or RGB are): export it as one of those, or as 8-bit PNG"
    )


def _check_decoder(syntax: pydicom.uid.UID) -> None:
    """A readable refusal, before pydicom's own, when no plugin for the compression is here."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ValueError(
            f"DICOM pixel data compressed as {syntax.name} ({syntax}), which pydicom cannot "
            "decode: export it uncompressed"
        ) from None
    if not decoder.is_available:
        raise ValueError(
            f"DICOM pixel data compressed as {syntax.name}, which pydicom decodes only with a "
            f"plugin: install one ({'; '.join(decoder.missing_dependencies)}), e.g. "
            "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
        )


def _dicom_gray(
    ds: pydicom.Dataset, pixels: np.ndarray, photometric: str
) -> tuple[Image.Image, str]:
    """Modality LUT, then the first window or the full range, to 0..255; MONOCHROME1 inverted."""
    notes = [
        f"DICOM {photometric} inverted" if photometric == "MONOCHROME1" else f"DICOM {photometric}"
    ]
    values = apply_modality_lut(pixels, ds)
    if ds.get("ModalityLUTSequence"):  # the same tests as apply_modality_lut's
        notes.append("modality LUT applied")
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        if (slope, intercept) != (1.0, 0.0):
            notes.append(f"rescale slope {_number(slope)} intercept {_number(intercept)}")
    centres, widths = _values(ds.get("WindowCenter")), _values(ds.get("WindowWidth"))
    if centres and widths:
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        scaled = _window(values, centres[0], widths[0], function)
        notes.append(
            f"window {_number(centres[0])}/{_number(widths[0])}"
            + ("" if function == "LINEAR" else f" {function}")
            + (f" (the first of {len(centres)})" if len(centres) > 1 else "")
        )
    else:
        scaled, lo, hi = _full_range(values)
        notes.append(f"no window: scaled to 8 bits {_over(lo, hi)}")
    if photometric == "MONOCHROME1":  # its smallest value is white: bone bright, as in MONOCHROME2
        scaled = 255 - scaled
    return Image.fromarray(scaled, "L"), "; ".join(notes)


def _values(element) -> list[float]:
    """A DS element of one or more values (Window Center / Width) as floats; [] if absent."""
    if element is None or element == "":
        return []
    if isinstance(element, MultiValue | list | tuple):
        return [float(v) for v in element]
    return [float(element)]


def _window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2-3: the window of the VOI LUT function, to 0..255."""
    x = values.astype(np.float64)
    if function == "SIGMOID":
        if width <= 0:  # 0 divides by zero (NaN at the centre); below 0 inverts the image
            raise ValueError(f"DICOM Window Width {width} must be above 0 for SIGMOID")
        y = 255 / (1 + np.exp(-4 * (x - centre) / width))
    elif function in ("LINEAR", "LINEAR_EXACT"):
        if function == "LINEAR":  # the standard's half-pixel offsets of integer-valued input
            if width < 1:
                raise ValueError(f"DICOM Window Width {width} must be at least 1 for LINEAR")
            centre, width = centre - 0.5, width - 1
        elif width <= 0:
            raise ValueError(f"DICOM Window Width {width} must be above 0 for LINEAR_EXACT")
        y = np.clip(((x - centre) / width + 0.5) * 255, 0, 255) if width else (x > centre) * 255.0
    else:
        raise ValueError(
            f"DICOM VOI LUT Function {function} is not one of LINEAR, LINEAR_EXACT, SIGMOID"
        )
    return np.rint(y).astype(np.uint8)


def _full_range(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(uint8 pixels, min, max): min to 0 and max to 255, linearly; a blank image is black."""
    x = values.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("pixel values that are NaN or infinite: save it without them")
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.zeros(x.shape, np.uint8), lo, hi
    return np.rint((x - lo) * 255 / (hi - lo)).astype(np.uint8), lo, hi


def _over(lo: float, hi: float) -> str:
    """How the full range went to 8 bits, for the note (a blank image has no range)."""
    if lo == hi:
        return f"(every pixel is {_number(lo)}: made black)"
    return f"over its full range {_number(lo)}..{_number(hi)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
