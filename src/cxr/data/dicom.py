"""DICOM in: one grey radiograph from a DICOM file's bytes, displayed as a radiologist's viewer would (modality
LUT, then the first VOI LUT or window, MONOCHROME1 inverted, padding black), and the two header values the
pipeline uses: PatientID (to keep a patient's images on one side of a split; hashed by the caller, never kept
in clear) and StudyDate (the order of acquisition). Nothing else is read from the header."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset

# pydicom, and the plugins that decode the compressed transfer syntaxes: JPEG baseline, extended and lossless and
# JPEG-LS (libjpeg), JPEG 2000 (openjpeg), RLE (rle). Pinned in pyproject.toml and with every logged model.
DICOM_PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle")
_PREAMBLE = 128  # DICOM Part 10: a 128-byte preamble, then "DICM"


class Refused(Exception):
    """A DICOM that is not one grey image, or cannot be decoded here: the message is the one-line reason."""


@dataclass(frozen=True)
class Dicom:
    pixels: np.ndarray  # uint8 (rows, columns): what a viewer shows, white = dense
    mode: str  # how it was read, e.g. "DICOM MONOCHROME1 12-bit, window 1 of 2"
    patient: str  # PatientID (0010,0020) as written, "" when absent
    study_date: str  # StudyDate (0008,0020) YYYYMMDD, "" when absent or malformed


def is_dicom(head: bytes) -> bool:
    """A DICOM Part 10 file (what PACS exports write), whatever its name: "DICM" after the preamble."""
    return head[_PREAMBLE:_PREAMBLE + 4] == b"DICM"


def _natural_range(ds: Dataset) -> tuple[float, float]:
    """The range of values after the modality LUT, what is shown when there is no window: the stored bits',
    not the container's (12-bit data in 16 bits is not scaled by 65535)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    bits = int(ds.BitsStored)
    lo, hi = (0.0, 2.0**bits - 1) if ds.PixelRepresentation == 0 else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def _views(ds: Dataset, keyword: str) -> int:
    elem = ds[keyword]
    return int(elem.VM) if keyword != "VOILUTSequence" else len(elem.value)


def _brief(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def _decodable(syntax: object) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return syntax is None or get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):  # no decoder for this syntax at all
        return False


def read_dicom(data: bytes, max_pixels: int) -> Dicom:
    """`data` (a DICOM file's bytes) as one 8-bit grey image; Refused with the reason when it is not one."""
    import pydicom  # only for DICOM input
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE  # a malformed value is not printed: it may be a name
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a broken header
        raise Refused(f"unreadable DICOM header ({_brief(e)})") from e
    if not len(ds):  # pydicom stops at the end of the file and keeps nothing of an element it could not finish
        raise Refused("truncated DICOM: not one data element could be read")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        what = getattr(ds.get("SOPClassUID"), "name", "") or "no image"
        if "Image Storage" in what:
            raise Refused(f"truncated DICOM: a {what} object without its pixel data")
        raise Refused(f"a DICOM without pixel data ({what}): not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise Refused(f"a multi-frame DICOM ({frames} frames): export one image per file")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if not photometric:
        raise Refused("a DICOM without PhotometricInterpretation (0028,0004): grey or colour, white or black air, "
                      "cannot be told")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise Refused(f"a colour DICOM ({photometric}): a radiograph is one grey channel (MONOCHROME1 or "
                      "MONOCHROME2)")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > max_pixels:
        raise Refused(f"decompression bomb: {cols}x{rows} px is {rows * cols / 1e6:.0f} megapixels, over the limit of "
                      f"{max_pixels / 1e6:g}")
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if not _decodable(syntax):
        raise Refused(f"transfer syntax {getattr(syntax, 'name', syntax)} cannot be decoded here (no decoder for it)")
    try:
        stored = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - a decoder's error: the data, not the syntax
        raise Refused(f"corrupt or truncated pixel data ({_brief(e)})") from e
    try:
        return Dicom(*_display(ds, stored, photometric),
                     patient=str(ds.get("PatientID", "") or "").strip(), study_date=_date(ds.get("StudyDate", "")))
    except Refused:
        raise
    except Exception as e:  # noqa: BLE001 - an inconsistent LUT or window
        raise Refused(f"its LUT or window cannot be applied ({_brief(e)})") from e


def _display(ds: Dataset, stored: np.ndarray, photometric: str) -> tuple[np.ndarray, str]:
    """What a viewer shows of the stored values. Every step is a function of the stored value alone, so integer
    data (all radiographs) is shaded once per possible value, a table of at most 65536, which the image then
    indexes: several times faster at full size than shading each pixel, and no float copy of the image."""
    if stored.ndim != 2:
        raise Refused(f"pixel data of shape {stored.shape}: not one grey image")
    if stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2:  # 32-bit or float data: pixel by pixel
        return _shade(ds, stored, photometric)
    if stored.dtype.kind == "u":
        lut, how = _shade(ds, np.arange(int(stored.max()) + 1, dtype=np.int64), photometric)
        return lut[stored], how
    half = 1 << (8 * stored.dtype.itemsize - 1)  # signed: offset binary (the sign bit flipped) indexes from 0
    lut, how = _shade(ds, np.arange(-half, half, dtype=np.int64), photometric)
    return lut[stored.view(stored.dtype.str.replace("i", "u")) ^ half], how  # .str keeps a big-endian order


def _shade(ds: Dataset, stored: np.ndarray, photometric: str) -> tuple[np.ndarray, str]:
    """Stored values to 8-bit grey: modality LUT, the first VOI LUT or window (to 0-1), MONOCHROME1 inverted,
    padding black."""
    from pydicom.pixels import apply_modality_lut

    padding = None
    if "PixelPaddingValue" in ds:
        ends = [int(ds.PixelPaddingValue), int(ds.get("PixelPaddingRangeLimit", ds.PixelPaddingValue))]
        padding = (stored >= min(ends)) & (stored <= max(ends))
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if ds.get("VOILUTSequence"):
        unit, how = _voi_lut(ds, values), f"VOI LUT 1 of {_views(ds, 'VOILUTSequence')}"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        unit, how = _window(ds, values), f"window 1 of {_views(ds, 'WindowCenter')}"
    else:
        lo, hi = _natural_range(ds)
        unit, how = (values - lo) / (hi - lo) if hi > lo else values * 0.0, "no window: the stored bits' range"
    gray = np.clip(unit, 0.0, 1.0) * 255.0
    if photometric == "MONOCHROME1":  # white = air: inverted, so that dense is white as in every other image
        gray = 255.0 - gray
    if padding is not None:
        gray[padding] = 0.0  # outside the detector: black, as the stage's padding is
    bits = int(ds.get("BitsStored", 8))
    return np.rint(gray).astype(np.uint8), f"DICOM {photometric} {bits}-bit, {how}"


def _first(ds: Dataset, keyword: str) -> float:
    elem = ds[keyword]
    return float(elem.value[0] if elem.VM > 1 else elem.value)


def _window(ds: Dataset, x: np.ndarray) -> np.ndarray:
    """The first window, as PS3.3 C.11.2.1.2 defines it, to 0 (below) ... 1 (above), whatever the sign of the
    rescale slope (pydicom's apply_windowing maps to a range that a negative slope turns over)."""
    c, w = _first(ds, "WindowCenter"), _first(ds, "WindowWidth")
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return (x - c) / w + 0.5
    if w < 1:
        raise Refused(f"Window Width {w:g} is below 1, which a LINEAR window cannot have")
    return (x - (c - 0.5)) / (w - 1) + 0.5 if w > 1 else (x > c - 0.5).astype(np.float64)


def _voi_lut(ds: Dataset, x: np.ndarray) -> np.ndarray:
    """The first VOI LUT, to 0-1 by the bits its entries use (a table declared 16-bit that holds 12-bit values is
    common). Indexed here: pydicom 3.0's apply_voi indexes an 8-bit table in 8 bits, wrapping above 255."""
    item = ds.VOILUTSequence[0]
    first = int(item.LUTDescriptor[1])
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        table = np.frombuffer(data, dtype="<u2" if ds.original_encoding[1] is not False else ">u2")
    else:
        table = np.atleast_1d(np.asarray(data))
    table = table.astype(np.float64)
    top = 2.0 ** int(table.max()).bit_length() - 1 if table.max() > 0 else 1.0
    return table[np.clip(np.rint(x) - first, 0, len(table) - 1).astype(np.intp)] / top


def _date(value: object) -> str:
    text = str(value or "").strip()
    return text if len(text) == 8 and text.isdigit() else ""
