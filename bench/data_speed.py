"""Speed of the grayscale stage on real X-rays, against the floor and against report A's way, in one run:

1. pillow:       plain Pillow decode of each file at full size, in one process (the per-core floor);
2. pillow_pool:  the same on every core (a multiprocessing pool): what the hardware allows in parallel;
3. pydicom:      for the DICOM sets, which Pillow cannot read, their floor: `dcmread(path).pixel_array`, one core;
4. pydicom_pool: the same on every core;
5. ours:         the grayscale stage (`cxr.data.gray.grayscale`) to `--size` px, on every core;
6. report A:     a `datasets` map(batch_size=32) to float tensors, `rgb_to_grayscale`, divide by 255 (JPEG only).

on these sets (the derived ones are built in a temp dir first, from the shared data):

    chest_xray_fullres_sample  220 full-resolution Kaggle JPEGs (gray and RGB)
    hub_like_640               8 crops of each of them as 640x640 RGB JPEGs (the hub dataset's format)
    chest_xray_224             the 224 px Kaggle set, 5840 RGB JPEGs
    dicom_fullres              the full-resolution sample as a detector exports it: 12-bit MONOCHROME2 DICOM
                               (gray x 16, window 2048/4096), uncompressed (Explicit VR Little Endian)
    dicom_fullres_j2k          the same, JPEG 2000 lossless (building it takes about 0.3 s an image)
    dicom_224                  the 224 px set as 8-bit MONOCHROME2 DICOM, uncompressed

then our stage on each DICOM set against the JPEG set it was made of (same pictures), and a table of where
the time goes per image on one core.

    python bench/data_speed.py                              # every set, 224 px, best of 3 runs
    python bench/data_speed.py --sets chest_xray_224 --size 128 --repeat 1
    python bench/data_speed.py --sets chest_xray_fullres_sample,dicom_fullres,dicom_fullres_j2k,chest_xray_224,dicom_224

Each run is a fresh process, so its peak memory is its own: the proportional set size (PSS) of the
process and its workers, sampled every 50 ms (PSS counts pages shared by forked workers once).
"""

from __future__ import annotations

import argparse
import atexit
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from PIL import Image  # every method reads with Pillow; imported here, not in the floor's timed loop

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported

SHARED = Path(os.environ.get("CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# set: (the JPEG set its pictures come from, bits stored, JPEG 2000 lossless rather than uncompressed)
DICOM_SETS = {"dicom_fullres": ("chest_xray_fullres_sample", 12, False),
              "dicom_fullres_j2k": ("chest_xray_fullres_sample", 12, True),
              "dicom_224": ("chest_xray_224", 8, False)}
SETS = ("chest_xray_fullres_sample", "hub_like_640", "chest_xray_224", *DICOM_SETS)
METHODS = {"pillow": "Pillow full decode, 1 core (the floor)", "pillow_pool": "Pillow full decode, every core",
           "pydicom": "pydicom full decode, 1 core (the floor)", "pydicom_pool": "pydicom full decode, every core",
           "ours": "**ours**, every core", "report_a": "report A's way"}
CORES = os.cpu_count() or 1


def _tree_pss_kb(pid: int) -> int:
    """PSS of `pid` and its descendants, from /proc (Linux)."""
    total = 0
    try:
        total += next(int(line.split()[1]) for line in open(f"/proc/{pid}/smaps_rollup") if line.startswith("Pss:"))
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += sum(_tree_pss_kb(int(c)) for c in (task / "children").read_text().split())
    except (OSError, StopIteration):
        pass  # the process ended meanwhile
    return total


class PeakMemory:
    """Samples the PSS of this process tree in a thread while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, _tree_pss_kb(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _files(root: Path) -> list[tuple[Path, int]]:
    with (root / "MANIFEST.csv").open() as f:
        return [(root / r["path"], int(r["label"] == "PNEUMONIA")) for r in csv.DictReader(f)]


def _decode_file(path: Path) -> None:
    with Image.open(path) as img:
        img.load()


def _read_dicom_file(path: Path) -> None:
    import pydicom  # already imported by the caller, outside the timed block

    pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is the point


def _write_manifest(out: Path, rows: list[dict[str, str]]) -> Path:
    with (out / "MANIFEST.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def hub_like(out: Path, crops: int = 8) -> Path:
    """The default source's format, built from the full-resolution sample: `crops` crops of each image
    (90% of each side, placed across the image), each stretched to 640x640 and saved as an RGB JPEG, as
    Roboflow exported `keremberke/chest-xray-classification` (its quality setting is unknown: 90 here)."""
    rows = []
    for path, label in _files(SHARED / "chest_xray_fullres_sample"):
        cls = "PNEUMONIA" if label else "NORMAL"
        (out / "train" / cls).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img = img.convert("RGB")
        w, h = img.size
        for k in range(crops):
            x, y = int(w * 0.1 * k / crops), int(h * 0.1 * ((k * 3) % crops) / crops)
            name = f"train/{cls}/{path.stem}_{k}.jpeg"
            img.crop((x, y, x + int(w * 0.9), y + int(h * 0.9))).resize((640, 640), Image.Resampling.BICUBIC) \
                .save(out / name, quality=90)
            rows.append({"path": name, "label": cls})
    return _write_manifest(out, rows)


def dicom_like(out: Path, source: str, bits: int, j2k: bool) -> Path:
    """Each image of the JPEG set `source` as a detector export: gray, `bits`-bit MONOCHROME2 (value = gray x
    2^(bits-8)) in a minimal DX For Presentation DICOM, uncompressed or JPEG 2000 lossless (pylibjpeg-openjpeg's
    encoder); same folders and stems as `source`, suffix .dcm, PatientID the Kaggle patient of the file name."""
    import numpy as np
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    from cxr.data.gray import patient_id

    rows = []
    for path, label in _files(SHARED / source):
        name = path.relative_to(SHARED / source).with_suffix(".dcm")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"), dtype=np.uint16 if bits > 8 else np.uint8) << (bits - 8)
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
        meta.MediaStorageSOPInstanceUID = uid.generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "DX", patient_id(path.name) or path.stem
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = pixels.itemsize * 8, bits, bits - 1, 0
        if bits > 8:  # a detector's export says how to show its bits: here their whole range
            ds.WindowCenter, ds.WindowWidth = 2 ** (bits - 1), 2**bits
        ds.PixelData = pixels.tobytes()
        if j2k:
            ds.compress(uid.JPEG2000Lossless)
        ds.save_as(out / name, enforce_file_format=True)
        rows.append({"path": name.as_posix(), "label": "PNEUMONIA" if label else "NORMAL"})
    return _write_manifest(out, rows)


def run_one(method: str, root: Path, size: int) -> dict[str, float]:
    """Time one method on one set in this process; the imports and, for ours, the download stage's
    manifest are outside the timed block."""
    files = _files(root)
    if method == "pillow":
        def work() -> None:
            for path, _ in files:
                _decode_file(path)
    elif method == "pillow_pool":
        import multiprocessing as mp

        def work() -> None:
            with mp.get_context("fork").Pool() as pool:
                pool.map(_decode_file, [path for path, _ in files], chunksize=max(1, len(files) // (8 * CORES)))
    elif method in ("pydicom", "pydicom_pool"):
        import multiprocessing as mp

        import pydicom  # noqa: F401 - imported here, not in the timed loop

        def work() -> None:
            if method == "pydicom":
                for path, _ in files:
                    _read_dicom_file(path)
            else:
                with mp.get_context("fork").Pool() as pool:
                    pool.map(_read_dicom_file, [path for path, _ in files],
                             chunksize=max(1, len(files) // (8 * CORES)))
    elif method == "ours":
        from cxr.data.gray import grayscale
        from cxr.data.sources import download
        from cxr.params import DataParams, GrayParams
        from cxr.privacy import SALT_ENV

        # a DICOM's PatientID is hashed with the salt: a throwaway one, so that the benchmark neither makes nor
        # reads the project's secret
        os.environ.setdefault(SALT_ENV, "cxr-bench, not a secret")
        tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # after the timing: 290 MB at 224 px
        download(DataParams(source="imagefolder", path=str(root)), tmp / "raw")

        def work() -> None:
            grayscale(tmp / "raw", tmp / "gray", GrayParams(image_size=size, workers=0))
    else:
        import datasets
        from torchvision.transforms.functional import pil_to_tensor, rgb_to_grayscale

        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_dict({"image": [str(p) for p, _ in files], "labels": [y for _, y in files]})
        ds = ds.cast_column("image", datasets.Image())

        def prep(batch: dict) -> dict:
            return {"pixels": [rgb_to_grayscale(pil_to_tensor(im.convert("RGB")).float()) / 255
                               for im in batch["image"]]}

        def work() -> None:
            out = ds.map(prep, batched=True, batch_size=32, remove_columns=["image"])
            out.set_format("torch")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        work()
        seconds = time.perf_counter() - t0
    return {"images": len(files), "seconds": seconds, "peak_mb": mem.peak_kb / 1024}


def per_image_ms(root: Path, size: int) -> dict[str, float]:
    """Single-core ms per image, best of 3 passes over the files' bytes: where the stage's time goes."""
    from cxr.data.gray import decode

    datas = [path.read_bytes() for path, _ in _files(root)]
    if root.name in DICOM_SETS:  # Pillow cannot read them: pydicom's decode is the floor
        import pydicom

        steps = {"full decode (floor)": lambda d: pydicom.dcmread(io.BytesIO(d)).pixel_array,
                 "ours: `decode()`": lambda d: decode(("", d, ""), [size], "stretch")}
        return _best_ms(steps, datas)

    def draft(data: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        img.draft("L", (size, size))
        img.load()
        return img

    def resized(data: bytes, f: Image.Resampling) -> Image.Image:
        return draft(data).convert("L").resize((size, size), f)

    R = Image.Resampling
    steps = {"full decode (floor)": lambda d: Image.open(io.BytesIO(d)).load(), "gray draft decode": draft,
             **{f"+ {f.name.lower()} resize": partial(resized, f=f) for f in (R.LANCZOS, R.BICUBIC, R.BILINEAR)},
             "ours: `decode()`": lambda d: decode(("", d, ""), [size], "stretch")}
    return _best_ms(steps, datas)


def _best_ms(steps: dict[str, Callable[[bytes], object]], datas: list[bytes]) -> dict[str, float]:
    out = {}
    for step, fn in steps.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for d in datas:
                fn(d)
            best = min(best, time.perf_counter() - t0)
        out[step] = best / len(datas) * 1e3
    return out


def _best(method: str, root: Path, size: int, repeat: int) -> dict[str, float]:
    """The fastest of `repeat` runs, each in a fresh process (so its peak memory is its own)."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--one", method, str(root), "--size", str(size)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{method} on {root.name} failed:\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    return best | {"peak_mb": max(r["peak_mb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--size", type=int, default=224, help="our stage's output size (gray.image_size)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method and set; the fastest counts")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]), args.size)))
        return
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: put the shared data there or set CXR_SHARED_DATA")
    print(f"{CORES} cores; our stage to {args.size} px on every core; best of {args.repeat} runs; "
          "peak memory = PSS of the process tree\n")
    header = "| set | method | images | seconds | images/s | peak MB | vs report A |"
    lines, breakdown, ours = [header, "|---|---|---|---|---|---|---|"], {}, {}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-sets-") as tmp:
        for name in args.sets.split(","):
            if name == "hub_like_640":
                root = hub_like(Path(tmp) / name)
            elif name in DICOM_SETS:
                root = dicom_like(Path(tmp) / name, *DICOM_SETS[name])
            else:
                root = SHARED / name
            dicom = name in DICOM_SETS
            floor, pool = ("pydicom", "pydicom_pool") if dicom else ("pillow", "pillow_pool")
            rows = {m: _best(m, root, args.size, args.repeat) for m in (floor, pool, "ours", "report_a")
                    if not (dicom and m == "report_a")}  # report A reads with Pillow
            rate = {m: r["images"] / r["seconds"] for m, r in rows.items()}
            for m in METHODS:
                if m in rows:
                    r, vs_a = rows[m], f"{rate[m] / rate['report_a']:.1f}x" if "report_a" in rate else "n/a"
                    lines.append(f"| {name} | {METHODS[m]} | {r['images']} | {r['seconds']:.2f} | {rate[m]:.0f} | "
                                 f"{r['peak_mb']:.0f} | {vs_a} |")
                elif dicom:  # Pillow's methods on a DICOM set; a JPEG set leaves pydicom's out
                    lines.append(f"| {name} | {METHODS[m]} | n/a | n/a | n/a | n/a | n/a |")
            vs_a = "" if dicom else f"ours / report A {rate['ours'] / rate['report_a']:.1f}x (>= 5); "
            lines.append(f"| {name} | targets | | | | | {vs_a}"
                         f"ours / (1-core decode x {CORES}) {rate['ours'] / (rate[floor] * CORES):.2f} (>= 1); "
                         f"ours / decode on every core {rate['ours'] / rate[pool]:.2f} |")
            ours[name] = rate["ours"]
            breakdown[name] = per_image_ms(root, args.size)
    print("\n".join(lines))
    pairs = [(name, DICOM_SETS[name][0]) for name in ours if name in DICOM_SETS]
    if pairs:
        print(f"\nDICOM against JPEG, same pictures: our stage to {args.size} px on every core\n")
        print("| DICOM set | images/s | JPEG set | images/s | DICOM / JPEG |\n|---|---|---|---|---|")
        for name, jpeg in pairs:
            if jpeg in ours:
                print(f"| {name} | {ours[name]:.0f} | {jpeg} | {ours[jpeg]:.0f} | {ours[name] / ours[jpeg]:.2f}x |")
            else:
                print(f"| {name} | {ours[name]:.0f} | {jpeg} | not run: add it to --sets | |")
    steps = list(max(breakdown.values(), key=len))  # a DICOM set has only the floor and ours
    print(f"\nWhere the time goes: ms per image on one core (best of 3), to {args.size} px\n")
    print("| set | " + " | ".join(steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for name, ms in breakdown.items():
        print(f"| {name} | " + " | ".join(f"{ms[s]:.2f}" if s in ms else "n/a" for s in steps) + " |")


if __name__ == "__main__":
    main()
