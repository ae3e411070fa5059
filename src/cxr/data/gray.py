"""The grayscale stage: decode each image once, convert to 8-bit gray, resize, stream into arrays."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import signal
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr.data.dicom import Dicom, Refused, is_dicom, read_dicom
from cxr.data.sources import SPLIT_ALIASES, list_imagefolder
from cxr.data.store import META_FIELDS, save_labels_meta, write_preprocessing
from cxr.errors import CxrError
from cxr.io import atomic_paths, progress, read_csv, write_json
from cxr.params import GrayParams, OnBadImage
from cxr.privacy import SALT_ENV, SALT_FILE, pseudonym, salt

log = logging.getLogger(__name__)

# Kaggle names: person1_bacteria_1.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-0927-0001.jpeg (Roboflow keeps the stem).
_PATIENT = re.compile(r"^(person\d+)_|^((?:NORMAL\d*-)?IM-\d+)-", re.IGNORECASE)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Refused from the header, before decoding: the largest chest detectors make about 20 megapixels, and a
# 16-bit image this size takes 0.4 GB to convert.
MAX_PIXELS = 50_000_000
MIN_SIDE = 8  # px: smaller is no radiograph (PneumoniaMNIST's 28 px images are the smallest real ones)


def patient_id(name: str) -> str:
    m = _PATIENT.match(os.path.basename(name))  # not pathlib: this runs per image in the parent
    return (m.group(1) or m.group(2)) if m else ""


@dataclass
class Names:
    """What the outputs call an image and its patient: the file name and the patient its name gives (Kaggle's
    patterns), or under `strict` (tracking.privacy) their pseudonyms; a DICOM's PatientID always as a pseudonym.
    The salt is read only when a pseudonym is needed."""

    strict: bool = False
    _key: bytes | None = None

    def key(self) -> bytes:
        if self._key is None:
            self._key = salt()
        return self._key

    def name(self, name: str) -> str:
        return pseudonym(name, self.key()) if self.strict else name

    def patient(self, name: str, header_patient: str = "") -> str:
        if header_patient:
            return pseudonym(header_patient, self.key())
        found = patient_id(name)
        return pseudonym(found, self.key()) if self.strict else found


def _to_l(img: Image.Image, draft: int) -> Image.Image:
    """Any PIL mode to 8-bit gray, decoded at the smallest JPEG scale that still covers `draft` pixels."""
    if img.format == "JPEG":
        img.draft("L", (draft, draft))  # let libjpeg decode gray at 1/2..1/8 scale: far less work
    # EXIF Orientation (phones and some exports rotate this way); JPEG and PNG say at open whether they have
    # EXIF, which spares parsing it (7% of a 224 px decode)
    has_exif = "exif" in img.info or img.format not in ("JPEG", "PNG")
    if has_exif and img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_DEPTH_MODES:
        a = np.array(img, dtype=np.float32)  # a writable copy: converted in place below
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("its pixel values are not all finite numbers")
        if img.mode == "F" or lo < 0:  # no natural range: window to the one used
            a -= lo  # in place, here and below: a 50-megapixel image is 200 MB of float32 per copy
            a *= 255.0 / (hi - lo) if hi > lo else 0.0
        else:  # scale by the bit depth the data fills (12-bit detectors stored in 16 bits are common)
            depth = next((d for d in (8, 10, 12, 14, 16) if hi < 2**d), 32)
            a *= 255.0 / (2**depth - 1)
        img = Image.fromarray(np.rint(a, out=a).astype(np.uint8))
    elif img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)  # transparent = black
    return img if img.mode == "L" else img.convert("L")


def _fit(img: Image.Image, size: int, fit: str) -> np.ndarray:
    resample = Image.Resampling.LANCZOS
    if fit == "pad":
        img = ImageOps.pad(img, (size, size), resample, color=0)
    elif fit == "crop":
        img = ImageOps.fit(img, (size, size), resample)
    elif img.size != (size, size):
        img = img.resize((size, size), resample)
    return np.asarray(img, dtype=np.uint8)


def equalize(gray: np.ndarray, how: str) -> np.ndarray:
    """Contrast normalisation of a resized uint8 image, so that machines' exposure differences matter less:
    global histogram equalisation, or CLAHE (8x8 tiles, clip 2: local, and it does not amplify noise in
    flat regions as much)."""
    if how == "hist":
        return np.asarray(ImageOps.equalize(Image.fromarray(gray)))
    if how == "clahe":
        import cv2  # only here: the one user of OpenCV

        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    return gray


def pixel_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per uint8 (N, S, S) image as a model sees it: mean and std of the grey levels; sharpness (variance of the
    Laplacian); border (mean grey of the outer 1/16 frame); marker (share of near-white pixels, >= 240, in the
    four corners of side 1/6: where radiographers' letters and text sit). The shift report and the prediction
    log both describe images by these."""
    x = images.astype(np.float32)
    n, side = len(x), x.shape[1]
    lap = x[:, 1:-1, :-2] + x[:, 1:-1, 2:] + x[:, :-2, 1:-1] + x[:, 2:, 1:-1] - 4 * x[:, 1:-1, 1:-1]
    b, c = max(1, side // 16), max(1, side // 6)
    frame = np.ones((side, side), bool)
    frame[b:-b, b:-b] = False
    corners = np.zeros((side, side), bool)
    for rows in (slice(0, c), slice(-c, None)):
        for cols in (slice(0, c), slice(-c, None)):
            corners[rows, cols] = True
    return {"mean": x.reshape(n, -1).mean(1), "std": x.reshape(n, -1).std(1), "sharpness": lap.reshape(n, -1).var(1),
            "border": x[:, frame].mean(1), "marker": (x[:, corners] >= 240).mean(1)}


def to_gray(img: Image.Image, size: int, fit: str = "stretch") -> np.ndarray:
    """Any PIL mode to an 8-bit (size, size) gray array."""
    return _fit(_to_l(img, size), size, fit)


NO_HEADER = ("", "")  # (PatientID, StudyDate): what a DICOM's header says; nothing for other formats
DecodeResult = tuple[list[np.ndarray], int, int, str, str, tuple[str, str]] | str


def decode(item: tuple[Any, ...], sizes: list[int], fit: str, draft: int = 0, how: str = "none",
           max_pixels: int = MAX_PIXELS) -> DecodeResult:
    """item is (name, source[, sha256]): source a file path, encoded bytes, or a uint8 array, with its sha256
    if known (the download stage's manifest has it). Returns the gray image at each size (one decode for
    all, at the JPEG scale that covers `draft`, by default the largest size), original width, height, mode,
    the sha256 of the source bytes and a DICOM's (PatientID, StudyDate) (dicom.py); or, for an image that
    cannot be used, the reason, so that the parent decides whether to stop or to skip it. The draft scale
    changes the pixels: predict passes the stage's. `how` equalizes each resized image (see `equalize`). An
    image over `max_pixels` is refused from its header, before any pixel is decoded."""
    _, src, *known = item
    dicom: Dicom | None = None
    try:
        if isinstance(src, np.ndarray):
            digest = known[0] if known else hashlib.sha256(np.ascontiguousarray(src).tobytes()).hexdigest()
            img = Image.fromarray(src)
        else:
            data = Path(src).read_bytes() if isinstance(src, str) else src
            if not data:
                return "empty file (0 bytes)"
            digest = known[0] if known else hashlib.sha256(data).hexdigest()  # 5% of a full-size decode
            if is_dicom(data):
                dicom = read_dicom(data, max_pixels)  # refused over max_pixels by its header, before decoding
                img = Image.fromarray(dicom.pixels)
            else:
                img = Image.open(io.BytesIO(data))  # reads the header only
        w, h, mode = img.width, img.height, dicom.mode if dicom else img.mode  # before draft() makes a JPEG "L"
        if w * h > max_pixels:  # checked here, not by Pillow's warning filter: that is process-wide state
            return (f"decompression bomb: {w}x{h} px is {w * h / 1e6:.0f} megapixels, over the limit of "
                    f"{max_pixels / 1e6:g}")
        if min(w, h) < MIN_SIDE:
            return f"{w}x{h} px is too small for an X-ray (under {MIN_SIDE} px a side)"
        gray = _to_l(img, draft or max(sizes)) if dicom is None else _block_average(img, draft or max(sizes))
        header = NO_HEADER if dicom is None else (dicom.patient, dicom.study_date)
        return [equalize(_fit(gray, s, fit), how) for s in sizes], w, h, mode, digest, header
    except Refused as e:
        return str(e)
    except UnidentifiedImageError:
        return "not an image Pillow can read (unknown format)"
    except Image.DecompressionBombError as e:  # Pillow's own limit, at open: twice MAX_IMAGE_PIXELS
        return f"decompression bomb: {str(e).split(',')[0]}"
    except (OSError, SyntaxError, ValueError) as e:
        return f"corrupt or truncated ({' '.join(str(e).split())[:200]})"
    except (ImportError, NameError, AttributeError):  # this program's fault (cv2 missing for CLAHE...), not the image's
        raise
    except Exception as e:  # noqa: BLE001 - a decoder's MemoryError, OverflowError...: the image is bad, not us
        return f"cannot be decoded ({type(e).__name__}: {' '.join(str(e).split())[:200]})"


def _block_average(img: Image.Image, draft: int) -> Image.Image:
    """What libjpeg's draft does for a JPEG (_to_l), for a DICOM's gray image: average k x k blocks, k the largest
    of 8, 4, 2 that keeps both sides at least `draft`, so that a DICOM and the JPEG made of it give close prepared
    images (and a 3000 px detector image is not resized by Lanczos from its full size)."""
    scale = min(img.size) // draft
    k = next((k for k in (8, 4, 2) if scale >= k), 1)
    return img.reduce(k) if k > 1 else img


def _items_local(raw: Path, info: dict[str, Any]) -> dict[str, list[tuple[int, tuple[Any, ...]]]]:
    """Per split: (label, (name, source[, sha256])) for every image of a local source."""
    out: dict[str, list[tuple[int, tuple[Any, ...]]]] = {}
    if info["source"] == "imagefolder":
        rows = read_csv(raw / "manifest.csv")
        if info.get("privacy") == "strict":  # the manifest holds pseudonyms: find the files they stand for
            root, key = Path(info["path"]), salt()
            where = {pseudonym(rel, key): rel for _, _, f in list_imagefolder(root)
                     for rel in [f.relative_to(root).as_posix()]}
            lost = sum(r["path"] not in where for r in rows)
            if lost:
                raise CxrError(f"{lost} files of data/raw/manifest.csv are no longer in {root}, or the salt changed "
                               f"({SALT_ENV} or {SALT_FILE}); run the download stage again: dvc repro -f download")
            rows = [r | {"path": where[r["path"]]} for r in rows]
        for r in rows:
            item = (r["path"], os.path.join(info["path"], r["path"]), r["sha256"])
            out.setdefault(r["split"], []).append((int(r["label"]), item))
    else:
        with np.load(info["path"]) as z:
            for split in info["counts"]:
                images, labels = z[f"{split}_images"], z[f"{split}_labels"].reshape(-1)
                if images.ndim == 4 and images.shape[-1] == 1:
                    images = images[..., 0]
                out[split] = [(int(y), (f"{split}/{i}", images[i])) for i, y in enumerate(labels)]
    return out


def _items_hub(raw: Path) -> Iterator[tuple[str, list[tuple[int, tuple[Any, ...]]]]]:
    import datasets

    dd = datasets.load_from_disk(str(raw / "hub"))
    for name, ds in dd.items():
        split = SPLIT_ALIASES.get(name.lower())
        if split is None:
            raise CxrError(f"hub split {name!r} is not train/validation/test; set data.hub_config")
        ds = ds.cast_column("image", datasets.Image(decode=False))  # we decode the bytes ourselves, once
        names = ds["image_file_path"] if "image_file_path" in ds.column_names else [None] * len(ds)
        items = [(int(y), (n or im["path"] or f"{split}/{i}", im["bytes"]))
                 for i, (y, im, n) in enumerate(zip(ds["labels"], ds["image"], names, strict=True))]
        yield split, items


_OPEN: dict[str, int] = {}  # per process: file descriptors of the output arrays it writes rows into


def _convert(job: tuple[int, tuple[Any, ...]], paths: list[str], offsets: list[int], sizes: list[int],
             fit: str, how: str) -> tuple[int, int, str, str] | str:
    """Decode job (row, item) and write it into that row of the output array of each size, so that only
    a few bytes travel back to the parent; return (width, height, mode, sha256), or why it is unusable."""
    row, item = job
    result = decode(item, sizes, fit, how=how)
    if isinstance(result, str):
        return result
    grays, *info = result
    for path, offset, size, gray in zip(paths, offsets, sizes, grays, strict=True):
        if path not in _OPEN:
            _OPEN[path] = os.open(path, os.O_WRONLY)
        # pwrite, not a memory map: a written map page-faults for every 4 kB of a new file (2x slower here)
        os.pwrite(_OPEN[path], gray.tobytes(), offset + row * size * size)
    return tuple(info)  # type: ignore[return-value]


def _convert_split(items: list[tuple[int, tuple[Any, ...]]], split: str, out: Path, p: GrayParams,
                   on_bad: OnBadImage, pool: Any, workers: int, skipped: list[dict[str, str]],
                   names: Names) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """Fill out/<size>/<split>_images.npy; return the kept images' metadata, labels and StudyDates."""
    n, sizes = len(items), p.sizes
    paths = [str(out / str(s) / f"{split}_images.npy") for s in sizes]
    offsets = [np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, s, s)).offset  # header
               for path, s in zip(paths, sizes, strict=True)]  # written; the workers fill the rows
    work = partial(_convert, paths=paths, offsets=offsets, sizes=sizes, fit=p.fit, how=p.equalize)
    jobs = ((i, item) for i, (_, item) in enumerate(items))
    # Big chunks spare the parent per-message work (a quarter of its time at 224 px); 8 per worker or more
    # keep the workers evenly loaded to the end.
    results: Iterable = pool.imap(work, jobs, chunksize=max(1, min(64, n // (8 * workers)))) if pool \
        else map(work, jobs)
    meta, labels, kept, dates = [], [], [], []
    try:
        for i, result in enumerate(progress(results, total=n, desc=f"grayscale {split}", unit="img")):
            label, (name, *_) = items[i]
            if isinstance(result, str):
                if on_bad == "error":
                    raise CxrError(f"bad image {name}: {result}; remove or replace it, or set "
                                   "data.on_bad_image: skip")
                # "file": for the console only, never written; under strict, no decoder's words either (they
                # may quote a header's value)
                skipped.append({"split": split, "name": names.name(name), "file": name,
                                "reason": result.split(" (")[0] if names.strict else result})
                continue
            w, h, mode, digest, (patient, date) = result
            meta.append(dict(zip(META_FIELDS, (names.name(name), split, names.patient(name, patient), digest, w, h,
                                               mode, ""), strict=True)))
            labels.append(label)
            kept.append(i)
            dates.append(date)
    finally:
        for path in paths:  # this process's own files (no pool): a later run may reuse the same temporary path
            if path in _OPEN:
                os.close(_OPEN.pop(path))
    if not meta:
        raise CxrError(f"every image of split {split} is bad ({skipped[-1]['reason']}, ...); check data.path")
    if len(kept) < n:  # skipped images: rewrite without their rows (rare, so a copy is fine)
        for path in paths:
            np.save(path, np.load(path, mmap_mode="r")[kept])
    return meta, labels, dates


def study_order(dates: list[str]) -> list[str]:
    """Each StudyDate's rank among the source's dates (1 = the earliest day; "" where none, or where every study
    is of one day: no order to speak of): the order of acquisition that split.val_by acquisition holds out by,
    without a date."""
    days = {d: str(i) for i, d in enumerate(sorted(set(dates) - {""}), start=1)}
    return [days.get(d, "") for d in dates] if len(days) > 1 else [""] * len(dates)


def _check_patients(metas: list[dict[str, Any]]) -> None:
    """An export that wrote one PatientID into every file (ANONYMOUS, 0...) makes one patient of them all: every
    split by patient would fail or put everything on one side."""
    ids = [m["patient_id"] for m in metas if m["mode"].startswith("DICOM") and m["patient_id"]]
    if len(ids) >= 20 and (n := Counter(ids).most_common(1)[0][1]) > len(ids) / 2:
        log.warning("one PatientID is in %d of the %d DICOMs that have one: an anonymised export? Splits by patient "
                    "keep them together; give each patient their own id, or export without PatientID", n, len(ids))


def grayscale(raw: Path, out: Path, p: GrayParams, on_bad: OnBadImage = "error",
              report: Path | None = None) -> dict[str, Any]:
    """Convert the download stage's output `raw` into `out`/<size>/{split}_{images,labels}.npy + _meta.csv;
    return (and write to `report`) the counts and the images skipped, with reasons."""
    info = json.loads((raw / "source.json").read_text())
    splits = _items_hub(raw) if info["source"] == "hub" else _items_local(raw, info).items()
    workers = p.workers or os.cpu_count() or 1
    counts: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    # the arrays and the report appear together or not at all, the arrays first
    with atomic_paths(out, *([report] if report else [])) as (tmp, *report_tmp):
        tmp.mkdir()
        for size in p.sizes:
            (tmp / str(size)).mkdir()
            write_preprocessing(tmp / str(size), p.fit, max(p.sizes), p.equalize)
        # fork: workers inherit the loaded modules, so start-up costs milliseconds
        # Ctrl-C reaches the whole process group: workers ignore it, the parent stops the pool and cleans up
        names, converted = Names(info.get("privacy") == "strict"), {}
        with mp.get_context("fork").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) if workers > 1 \
                else contextlib.nullcontext() as pool:
            for split, items in splits:
                converted[split] = _convert_split(items, split, tmp, p, on_bad, pool, workers, skipped, names)
        _check_patients([m for meta, _, _ in converted.values() for m in meta])
        orders = iter(study_order([d for _, _, dates in converted.values() for d in dates]))
        for split, (meta, labels, _) in converted.items():
            meta = [m | {"study_order": next(orders)} for m in meta]
            for size in p.sizes:
                save_labels_meta(tmp / str(size), split, np.array(labels, dtype=np.int64), meta)
            counts[split] = len(meta)
        summary = {"source": info["source"], "sizes": p.sizes, "fit": p.fit, "equalize": p.equalize, "counts": counts,
                   "skipped": len(skipped), "skipped_images": [{k: v for k, v in s.items() if k != "file"}
                                                               for s in skipped]}
        write_json(tmp / "info.json", summary)
        for path in report_tmp:
            write_json(path, summary)
    for s in skipped:
        log.warning("skipped %s (%s): %s", s["file"], s["split"], s["reason"])
    log.info("grayscale %s px: %s", p.sizes, counts)
    return summary

