"""Speed of the grayscale stage on real X-rays, against the floor and against report A's way, in one run:

1. pillow:   plain Pillow decode of each file at full size, in one process (the per-core floor);
2. ours:     the grayscale stage (`cxr.data.gray.grayscale`) to `--size` px, on every core;
3. report A: a `datasets` map(batch_size=32) to float tensors, `rgb_to_grayscale`, divide by 255.

    python bench/data_speed.py                              # both shared sets, 224 px
    python bench/data_speed.py --sets chest_xray_224 --size 128

Each method runs in a fresh process, so its peak memory is its own: the proportional set size (PSS) of
the process and its workers, sampled every 50 ms (PSS counts pages shared by forked workers once).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported

SHARED = Path(os.environ.get("CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
METHODS = ("pillow", "ours", "report_a")


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


def _files(name: str) -> list[tuple[Path, int]]:
    with (SHARED / name / "MANIFEST.csv").open() as f:
        return [(SHARED / name / r["path"], int(r["label"] == "PNEUMONIA")) for r in csv.DictReader(f)]


def run_one(method: str, name: str, size: int) -> dict[str, float]:
    """Time one method on one set in this process; the imports and, for ours, the download stage's
    manifest are outside the timed block."""
    files = _files(name)
    if method == "pillow":
        from PIL import Image

        def work() -> None:
            for path, _ in files:
                with Image.open(path) as img:
                    img.load()
    elif method == "ours":
        from cxr.data.gray import grayscale
        from cxr.data.sources import download
        from cxr.params import DataParams, GrayParams

        tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
        download(DataParams(source="imagefolder", path=str(SHARED / name)), tmp / "raw")

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="chest_xray_fullres_sample,chest_xray_224")
    parser.add_argument("--size", type=int, default=224, help="our stage's output size (gray.image_size)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.size)))
        return
    cores = os.cpu_count() or 1
    print(f"{cores} cores; our stage to {args.size} px on every core; peak memory = PSS of the process tree\n")
    print("| set | method | images | seconds | images/s | peak MB | vs report A |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        if not (SHARED / name).is_dir():
            sys.exit(f"{SHARED / name} is absent: put the shared data there or set CXR_SHARED_DATA")
        rows = {}
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--one", method, name, "--size", str(args.size)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{method} on {name} failed:\n{out.stderr[-2000:]}")
            rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        base = rows["report_a"]["images"] / rows["report_a"]["seconds"]
        for method, r in rows.items():
            rate = r["images"] / r["seconds"]
            print(f"| {name} | {method} | {r['images']} | {r['seconds']:.2f} | {rate:.0f} | {r['peak_mb']:.0f} | "
                  f"{rate / base:.1f}x |")
        floor = rows["pillow"]["images"] / rows["pillow"]["seconds"] * cores
        ours = rows["ours"]["images"] / rows["ours"]["seconds"]
        print(f"| {name} | targets | | | | | ours / report A {ours / base:.1f}x (>= 5); ours / (pillow x {cores} "
              f"cores) {ours / floor:.2f} (>= 1) |")


if __name__ == "__main__":
    main()
