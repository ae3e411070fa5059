"""Bad input, built here from real X-rays: odd and broken image files, broken sources, a single-class split.
Each must end in one clear line or a documented conversion, and leave no output behind."""

import http.server
import io
import json
import re
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, make_imagefolder, manifest, shared
from cxr import params
from cxr.data.gray import grayscale, to_gray
from cxr.data.sources import download, scan_imagefolder
from cxr.data.split import split
from cxr.data.store import load_split
from cxr.errors import CxrError
from cxr.evaluation.variant import evaluate_variant
from cxr.params import DataParams, GrayParams, SplitParams
from cxr.training.variant import train_variant


def _xray() -> Image.Image:
    """A real, non-square full-resolution X-ray, shrunk to keep the test quick."""
    row = max(manifest("chest_xray_fullres_sample"), key=lambda r: int(r["width"]) / int(r["height"]))
    img = Image.open(shared("chest_xray_fullres_sample") / row["path"]).convert("L")
    return img.resize((img.width // 4, img.height // 4))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(side: int = 10_000) -> bytes:
    """A valid all-black gray PNG of side x side px (100 M px: over Pillow's 89 M limit) in about 100 kB."""
    z, row = zlib.compressobj(9), b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _catalogue(img: Image.Image) -> dict[str, tuple[bytes, str | None]]:
    """File name -> (bytes, None if it must be converted, else the reason it must be refused)."""
    jpeg = _encode(img, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    palette = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return {
        "truncated.jpeg": (jpeg[: len(jpeg) // 3], r"corrupt or truncated \(image file is truncated"),
        "empty.jpeg": (b"", r"empty file \(0 bytes\)"),
        "text.jpeg": (b"patient,label\n1,PNEUMONIA\n", r"not an image Pillow can read \(unknown format\)"),
        "tiny.png": (_encode(Image.new("L", (1, 1), 128), "PNG"), r"1x1 px is too small for an X-ray"),
        "bomb.png": (_bomb(), r"decompression bomb: 10000x10000 px is 100 megapixels, over the limit of 50"),
        "png_named.jpeg": (_encode(img, "PNG"), None),
        "cmyk.jpeg": (_encode(img.convert("CMYK"), "JPEG", quality=95), None),
        "gray16.png": (_encode(Image.fromarray(np.asarray(img).astype(np.uint16) * 257), "PNG"), None),
        "rgba.png": (_encode(img.convert("RGBA"), "PNG"), None),
        "palette.png": (_encode(palette, "PNG"), None),
        "exif_rotated.jpeg": (_encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif), None),
    }


@pytest.fixture(scope="module")
def catalogue() -> tuple[Image.Image, dict[str, tuple[bytes, str | None]]]:
    """The real X-ray and every file built from it, once per module (the bomb takes 0.3 s to compress)."""
    img = _xray()
    return img, _catalogue(img)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, catalogue):
    """A Kaggle-style folder of 4 real images per class and split, plus every odd and broken file."""
    folder = make_imagefolder(tmp_path_factory.mktemp("bad"), per_class=4, with_duplicates=False)
    for name, (data, _) in catalogue[1].items():
        (folder / "train" / "normal" / name).write_bytes(data)
    return folder


def test_odd_images_are_converted_and_broken_ones_skipped_with_their_reason(bad_folder, catalogue, tmp_path):
    img, cases = catalogue
    download(DataParams(source="imagefolder", path=str(bad_folder)), tmp_path / "raw")
    report = grayscale(tmp_path / "raw", tmp_path / "gray", GrayParams(image_size=64, workers=2), "skip",
                       tmp_path / "grayscale.json")
    refused = {s["name"].split("/")[-1]: s["reason"] for s in report["skipped_images"]}
    assert set(refused) == {n for n, (_, why) in cases.items() if why}
    for name, reason in refused.items():
        assert re.match(cases[name][1], reason), (name, reason)
    assert report["skipped"] == 5 and report["counts"]["train"] == 8 + 6
    assert (tmp_path / "grayscale.json").exists()

    train = load_split(tmp_path / "gray" / "64", "train")
    assert len(train.labels) == len(train.meta) == train.images.shape[0] == 14
    reference = to_gray(img, 64).astype(float)
    for i, m in enumerate(train.meta):
        name = m["name"].split("/")[-1]
        if name in cases:  # every decodable odd file gives the same picture, upright
            assert np.abs(train.images[i] - reference).mean() < 4, (name, m["mode"])
    modes = {m["name"].split("/")[-1]: m["mode"] for m in train.meta}
    assert modes["cmyk.jpeg"] == "CMYK" and modes["palette.png"] == "P" and modes["gray16.png"].startswith("I")
    sideways = to_gray(img.transpose(Image.Transpose.ROTATE_90), 64).astype(float)
    assert np.abs(sideways - reference).mean() > 20  # so the EXIF case above really was turned upright


@pytest.mark.parametrize("name", ["truncated.jpeg", "empty.jpeg", "text.jpeg", "tiny.png", "bomb.png"])
def test_a_broken_image_stops_the_stage_with_one_line_and_no_output(bad_folder, catalogue, tmp_path, name):
    reason = catalogue[1][name][1]
    folder = tmp_path / "src"
    (folder / "train" / "NORMAL").mkdir(parents=True)
    (folder / "train" / "PNEUMONIA").mkdir(parents=True)
    (folder / "train" / "NORMAL" / name).symlink_to(bad_folder / "train" / "normal" / name)
    for real in sorted((bad_folder / "train" / "Pneumonia").iterdir())[:2]:
        (folder / "train" / "PNEUMONIA" / real.name).symlink_to(real)
    download(DataParams(source="imagefolder", path=str(folder)), tmp_path / "raw")
    with pytest.raises(CxrError) as e:
        grayscale(tmp_path / "raw", tmp_path / "gray", GrayParams(image_size=32, workers=1), "error",
                  tmp_path / "grayscale.json")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"bad image train/NORMAL/{name}: ")
    assert re.search(reason, message) and message.endswith("or set data.on_bad_image: skip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]  # no gray/, no report, no temp


def test_source_folder_errors_name_the_folder_and_the_fix(tmp_path):
    folder = make_imagefolder(tmp_path / "src", per_class=2, splits=("train",), with_duplicates=False)
    (folder / "train" / "normal.bak").mkdir()  # a class folder name that is no class
    with pytest.raises(CxrError, match=r"normal.bak: unknown class folder; expected NORMAL or PNEUMONIA"):
        scan_imagefolder(folder)
    (folder / "train" / "normal.bak").rmdir()
    (folder / "val" / "NORMAL").mkdir(parents=True)  # an empty class folder: a copy that failed
    with pytest.raises(CxrError, match=r"val/NORMAL: empty class folder .*fill it or remove it"):
        download(DataParams(source="imagefolder", path=str(folder)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and not list(tmp_path.glob(".raw*"))


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("change, message", [
    ({"val_labels": None}, r"x.npz: has val_images but no val_labels; save both"),
    ({"val_labels": np.zeros((5, 1), np.uint8)}, r"val_images has 20 images but val_labels has shape \(5, 1\)"),
    ({"val_images": np.zeros((20, 28, 28), np.float32)}, r"val_images are float32, not uint8"),
    ({"val_images": np.zeros((20, 784), np.uint8)}, r"val_images has shape \(20, 784\); expected \(N, H, W\)"),
    ({"val_labels": np.full((20, 1), 2, np.uint8)}, r"val_labels holds \[2\]; expected 0 \(NORMAL\) or 1"),
])
def test_npz_with_missing_or_mismatched_arrays(tmp_path, change, message):
    with np.load(shared("pneumoniamnist") / "pneumoniamnist_28.npz") as z:
        arrays = {f"{s}_{k}": z[f"{s}_{k}"][:20] for s in ("train", "val", "test") for k in ("images", "labels")}
    arrays = {k: v for k, v in {**arrays, **change}.items() if v is not None}
    with pytest.raises(CxrError, match=message):
        download(DataParams(source="npz", path=str(_npz(tmp_path / "x.npz", **arrays))), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_missing_splits_are_carved_and_a_missing_train_split_is_refused(tmp_path):
    with np.load(shared("pneumoniamnist") / "pneumoniamnist_28.npz") as z:
        train = {"train_images": z["train_images"][:4000:10], "train_labels": z["train_labels"][:4000:10]}
        test = {"test_images": z["test_images"][:50], "test_labels": z["test_labels"][:50]}
    for name, arrays in (("train_only", train), ("test_only", test)):
        download(DataParams(source="npz", path=str(_npz(tmp_path / f"{name}.npz", **arrays))), tmp_path / name / "raw")
        grayscale(tmp_path / name / "raw", tmp_path / name / "gray", GrayParams(image_size=28, workers=1))
    report = split(tmp_path / "train_only" / "gray", tmp_path / "train_only" / "split", SplitParams(), seed=0)
    assert report["carved"] == ["test", "val"]
    assert sum(sum(c.values()) for c in report["counts"].values()) == 400
    with pytest.raises(CxrError, match=r"the source has no train split \(it has test\); a source needs train/"):
        split(tmp_path / "test_only" / "gray", tmp_path / "test_only" / "split", SplitParams(), seed=0)
    assert not (tmp_path / "test_only" / "split").exists()


@pytest.fixture
def fake_hub(monkeypatch):
    """A local HTTP server that answers as huggingface.co does for a dataset that does not exist."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()


def test_a_hub_id_that_does_not_exist_is_named_with_the_fix(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # A fresh process: huggingface_hub reads HF_ENDPOINT once, when it is first imported (an earlier test may have).
    code = ("import sys; from pathlib import Path; from cxr.data.sources import download; from cxr.errors import "
            "CxrError; from cxr.params import DataParams\ntry:\n    download(DataParams(source='hub', "
            "hub_repo='nobody/no-such-xrays'), Path('raw'))\nexcept CxrError as e:\n    sys.exit(str(e))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 1 and re.search(
        r"data.hub_repo 'nobody/no-such-xrays' \(config 'full', revision 'refs/convert/parquet'\) is not on the "
        r"hub, or is private or gated .*check the id, or log in with `hf auth login`", res.stderr), res.stderr
    assert not (tmp_path / "raw").exists() and not list(tmp_path.glob(".raw*"))


def test_a_single_class_split(tmp_path):
    """A val split of one class is refused before training; a test split of one class is evaluated, with the
    scores that need both classes null and said so."""
    folder = make_imagefolder(tmp_path / "src", per_class=40, with_duplicates=False)
    for f in (folder / "test" / "normal").iterdir():
        f.unlink()
    (folder / "test" / "normal").rmdir()
    download(DataParams(source="imagefolder", path=str(folder)), tmp_path / "raw")
    grayscale(tmp_path / "raw", tmp_path / "gray", GrayParams(image_size=32, workers=2))
    report = split(tmp_path / "gray", tmp_path / "split", SplitParams(), seed=0)
    assert report["counts"]["test"] == {"NORMAL": 0, "PNEUMONIA": 40}

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update({"epochs": 1})
    raw["gray"]["image_size"] = 32
    p = params.parse(raw)
    train_variant(p, "linear", tmp_path / "split", tmp_path / "m", tmp_path / "r", tmp_path / "ck")
    metrics = evaluate_variant(p, "linear", tmp_path / "split", tmp_path / "m", tmp_path / "r")
    assert metrics["test"]["auroc"] is None and metrics["test"]["average_precision"] is None
    assert metrics["test"]["recall"] > 0 and metrics["val"]["auroc"] is not None
    headline = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert headline["test"]["auroc"] is None and headline["test"]["recall"] == metrics["test"]["recall"]

    (folder / "val" / "PNEUMONIA").mkdir(parents=True)  # a val split of PNEUMONIA only
    for f in sorted((folder / "train" / "Pneumonia").iterdir())[:10]:
        f.rename(folder / "val" / "PNEUMONIA" / f.name)
    download(DataParams(source="imagefolder", path=str(folder)), tmp_path / "raw")
    grayscale(tmp_path / "raw", tmp_path / "gray", GrayParams(image_size=32, workers=2))
    with pytest.raises(CxrError, match=r"the val split has no NORMAL images .*add them to the source's val/ folder, "
                                       r"or remove that folder so that val is carved from train"):
        split(tmp_path / "gray", tmp_path / "split2", SplitParams(), seed=0)
    assert not (tmp_path / "split2").exists()


def test_predict_names_missing_paths_and_empty_globs_before_it_loads_any_model(tmp_path):
    """A typo fails at once, in one line, without the model (the store here has none: loading it would fail
    with another message)."""
    (tmp_path / "scans").mkdir()
    res = subprocess.run([sys.executable, "-m", "cxr", "predict", str(tmp_path / "missing.png"),
                          str(tmp_path / "scans" / "*.png")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1 and not res.stdout
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.png'}: no such file; "
                                               f"{tmp_path / 'scans' / '*.png'}: no file matches this pattern"]
