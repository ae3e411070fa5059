"""DICOM in, patient data never out: DICOMs built from real X-rays prepare to the array of the JPEG they came
from (MONOCHROME1, windows, 12 bits, compressed syntaxes); pydicom's own odd files are refused in one line or
read; and the pipeline, run by DVC on a DICOM folder under tracking.privacy: strict, writes none of the names,
ids and dates planted in the headers and file names, anywhere, MLflow included."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import make_project, manifest, project_env, sh, shared
from cxr.data.dicom import is_dicom
from cxr.data.gray import decode, grayscale, patient_id
from cxr.data.sources import download
from cxr.data.store import load_split, size_dir
from cxr.params import DataParams, GrayParams
from cxr.privacy import pseudonym
from dicoms import KINDS, PLANTED, dataset, encode, monochrome1

SIZES = [224, 64]


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def _prepared(source: str | bytes) -> tuple[list[np.ndarray], str]:
    result = decode(("", source), SIZES, "stretch")
    assert not isinstance(result, str), result
    return result[0], result[3]


@pytest.fixture(scope="module")
def jpegs() -> list[Path]:
    root = shared("chest_xray_224")
    return [root / r["path"] for r in manifest("chest_xray_224") if r["split"] == "test"][::150][:4]


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_dicom_prepares_to_the_array_of_the_jpeg_it_came_from(jpegs, kind):
    """Within one grey level at every size the JPEG is decoded whole for; the decode says how it read the file
    (which window)."""
    for jpeg in jpegs:
        want, _ = _prepared(str(jpeg))
        got, mode = _prepared(KINDS[kind](_gray(jpeg)))
        assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(got, want, strict=True)), (kind, jpeg.name)
    assert mode.startswith("DICOM MONOCHROME")
    assert ("window 1 of 2" in mode) == ("MONOCHROME1" in kind or "2000" in kind)
    # Where libjpeg decodes the JPEG at a draft scale (here 1/2: 64 px from 224), a DICOM, which has no DCT to
    # scale, is averaged in 2x2 blocks instead: close, not equal (docs/pipeline.md)
    diffs = [np.abs(decode(("", str(j)), [64], "stretch", 64)[0][0].astype(int) -
                    decode(("", KINDS[kind](_gray(j))), [64], "stretch", 64)[0][0]) for j in jpegs]
    assert max(d.max() for d in diffs) <= 4 and np.mean([d.mean() for d in diffs]) < 0.3


def test_a_monochrome1_or_a_12_bit_file_read_the_naive_way_is_far_off(jpegs):
    """What the round trip guards against: MONOCHROME1 taken as MONOCHROME2 is a negative, and 12-bit data scaled
    by its 16-bit container is almost black."""
    gray = _gray(jpegs[0])
    want = _prepared(str(jpegs[0]))[0][0].astype(int)
    negative = monochrome1(gray)
    negative.PhotometricInterpretation = "MONOCHROME2"
    assert np.abs(_prepared(encode(negative))[0][0] - want).mean() > 60
    ds = pydicom.dcmread(io.BytesIO(KINDS["MONOCHROME2 12-bit, no window"](gray)))
    naive = ds.pixel_array / 65535 * 255
    assert naive.max() < 16 and np.abs(_prepared(encode(ds))[0][0] - want).max() <= 1


def test_a_full_resolution_jpeg_in_a_dicom_prepares_as_the_jpeg_file():
    """The JPEG baseline transfer syntax (a JPEG inside the DICOM, decoded by pylibjpeg at full size, then averaged
    down as libjpeg's draft scaling does) against Pillow reading the same JPEG file with its draft scaling: two
    decoders of one picture, within 3 grey levels and 0.2 on average."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    files = [f for f in sorted(shared("chest_xray_fullres_sample").rglob("*.jpeg")) if Image.open(f).mode == "L"]
    for jpeg in files[::40][:3]:
        ds = dataset(_gray(jpeg))
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([jpeg.read_bytes()])
        ds["PixelData"].VR = "OB"
        for got, want in zip(_prepared(encode(ds))[0], _prepared(str(jpeg))[0], strict=True):
            diff = np.abs(got.astype(int) - want)
            assert diff.max() <= 3 and diff.mean() < 0.2, (jpeg.name, diff.max(), diff.mean())


# pydicom's test file: what the decode must say of it (a refusal's words), or "image" where it is one
PYDICOM_FILES = {
    "MR_truncated.dcm": "corrupt or truncated pixel data",
    "rtplan_truncated.dcm": "a DICOM without pixel data (RT Plan Storage)",
    "test-SR.dcm": "a DICOM without pixel data (Comprehensive SR Storage): not an image",
    "rtplan.dcm": "a DICOM without pixel data (RT Plan Storage): not an image",
    "rtdose.dcm": "a multi-frame DICOM (15 frames): export one image per file",
    "SC_rgb_rle.dcm": "a colour DICOM (RGB): a radiograph is one grey channel",
    "examples_palette.dcm": "a colour DICOM (PALETTE COLOR)",
    "MR_small_bigendian.dcm": "image",
    "MR_small_jpeg_ls_lossless.dcm": "image",
    "JPGExtended.dcm": "image",
}


@pytest.mark.parametrize("name", list(PYDICOM_FILES))
def test_pydicom_test_files_are_refused_in_one_line_or_read(name):
    result = decode(("", get_testdata_file(name)), [64], "stretch")
    if PYDICOM_FILES[name] == "image":
        assert not isinstance(result, str), result
        if "MR_small" in name:  # the same pixels as the little-endian, uncompressed file
            assert np.array_equal(result[0][0], _prepared(get_testdata_file("MR_small.dcm"))[0][1])
    else:
        assert isinstance(result, str) and result.startswith(PYDICOM_FILES[name]) and "\n" not in result, result


def test_an_unsupported_syntax_and_padding():
    """A transfer syntax no plugin decodes is refused by name; pixel padding is black, whatever the window."""
    ds = dataset(np.zeros((16, 16), np.uint8))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # a video's
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
    result = decode(("", encode(ds)), [16], "stretch")
    assert isinstance(result, str) and result.startswith("transfer syntax MPEG2 Main Profile / Main Level cannot be "
                                                         "decoded here"), result
    stored = np.full((32, 32), 200, np.uint16)
    stored[:, :8] = 4095
    padded = dataset(stored, bits=12, PixelPaddingValue=4095, WindowCenter=200, WindowWidth=100)
    got = decode(("", encode(padded)), [32], "stretch")[0][0]
    assert (got[:, :7] == 0).all() and (got[:, 9:] > 100).all()


def test_windows_and_luts_that_trip_naive_readers():
    """A negative rescale slope under a window (the window still maps low values dark), a VOI LUT of 4096
    8-bit entries (above 255 an 8-bit index wraps), a 16-bit-declared VOI LUT holding 12-bit values (not almost
    black), and padding in a MONOCHROME1 image (black, not inverted to white)."""
    from pydicom.dataset import Dataset

    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (16, 1))  # 0 ... 4080 along each row
    flipped = dataset(ramp, bits=12, RescaleSlope=-1, RescaleIntercept=4095, WindowCenter=2048, WindowWidth=4096)
    got = decode(("", encode(flipped)), [256], "stretch")[0][0][0]
    assert got[0] > 250 and got[-1] < 5  # stored 0 is the rescaled 4095: the brightest
    for bits, entries in ((8, np.arange(4096) // 16), (16, np.arange(4096))):
        lut = Dataset()
        lut.LUTDescriptor = [4096, 0, bits]
        lut.add_new("LUTData", "US", entries.tolist())  # US or OW: named, as a writer must
        ds = dataset(ramp, bits=12)
        ds.VOILUTSequence = [lut]
        got = decode(("", encode(ds)), [256], "stretch")
        assert not isinstance(got, str) and "VOI LUT 1 of 1" in got[3], got
        assert np.abs(got[0][0][0].astype(int) - np.arange(256)).max() <= 1  # the ramp, whole and in order
    padded = ramp.copy()
    padded[:, :32] = 0
    m1 = dataset(padded, "MONOCHROME1", 12, PixelPaddingValue=0)
    got = decode(("", encode(m1)), [256], "stretch")[0][0]
    assert (got[:, :32] == 0).all() and got[0, 40] > 200 and got[0, -1] < 5


# --- The pipeline on a DICOM folder, under tracking.privacy: strict --------------------------------------------

def _mrn(patient: str) -> str:
    return f"MRN-{int(hashlib.sha256(patient.encode()).hexdigest()[:12], 16) % 10**8:08d}"  # one per Kaggle patient


def _dicom_folder(dest: Path) -> dict[str, set[str]]:
    """{train,test}/{NORMAL,PNEUMONIA}/ of DICOMs of every kind made from real 224 px X-rays (named by the
    patient's record number, or by a UID, with and without a suffix), a truncated DICOM and a report among them;
    what was planted: the header values and the record numbers."""
    picked: dict[tuple[str, str], int] = {}
    mrns, dates = set(), set()
    root = shared("chest_xray_224")
    for i, r in enumerate(manifest("chest_xray_224")):
        key = (r["split"], r["label"])
        if picked.get(key, 0) >= (24 if r["split"] == "train" else 10):
            continue
        picked[key] = picked.get(key, 0) + 1
        mrn = _mrn(patient_id(r["path"]))
        study = (date(2017, 1, 2) + timedelta(days=37 * (picked[key] % 5))).strftime("%Y%m%d")  # 5 study days
        mrns.add(mrn)
        dates.add(study)
        kind = list(KINDS)[i % len(KINDS)]
        name = (f"{mrn}_{i}.dcm", f"1.2.826.0.1.3680043.10.{i}", f"{mrn}_{i}")[i % 3]
        path = dest / r["split"] / r["label"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(KINDS[kind](_gray(root / r["path"]), patient=mrn, StudyDate=study))
    broken = KINDS["RLE Lossless"](_gray(root / r["path"]), patient="MRN-31415926")
    (dest / "train" / "NORMAL" / "MRN-31415926_cut.dcm").write_bytes(broken[: len(broken) // 2])
    (dest / "train" / "NORMAL" / "MRN-27182818_report.dcm").write_bytes(Path(get_testdata_file("test-SR.dcm"))
                                                                        .read_bytes())
    return {"header": {v for k, v in PLANTED.items() if k != "StudyDate"} | dates,
            "record numbers": mrns | {"MRN-31415926", "MRN-27182818"}}


def _leaks(root: Path, planted: set[str]) -> dict[str, list[str]]:
    """Which planted values each file under root holds (as a word: not inside a longer run of letters and
    digits, where a hash's hex digits could spell a date by chance), in any case."""
    words = re.compile(rb"(?<![0-9A-Za-z])(" + b"|".join(re.escape(v.encode()) for v in planted) + rb")(?![0-9A-Za-z])",
                       re.IGNORECASE)
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and ".git" not in path.relative_to(root).parts:
            hits = {m.group(1).decode() for m in words.finditer(path.read_bytes())}
            if hits:
                found[str(path.relative_to(root))] = sorted(hits)
    return found


@pytest.fixture(scope="module")
def strict_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, set[str]]]:
    folder = tmp_path_factory.mktemp("pacs") / "export"
    planted = _dicom_folder(folder)
    repo = make_project(tmp_path_factory.mktemp("dicom") / "repo", {"lin": {"arch": "linear", "epochs": 3}},
                        data={"source": "imagefolder", "path": str(folder), "on_bad_image": "skip"},
                        gray={"image_size": 32, "extra_sizes": []},
                        split={"val_by": "acquisition", "val_fraction": 0.2},
                        tracking={"privacy": "strict"})
    sh(repo, "dvc", "repro")
    return repo, folder, planted


def test_the_pipeline_on_a_dicom_folder_under_strict_writes_no_name_id_or_date(strict_run):
    """Every file the pipeline wrote (outputs, DVC's cache, MLflow's database and artifacts) is searched for the
    header values and record numbers: none is there. Patients come from PatientID (pseudonyms, one per record
    number), validation is the earliest studies by StudyDate, the two bad files are skipped and listed under
    pseudonyms, and no X-ray's pixels went to MLflow."""
    repo, folder, planted = strict_run
    assert (repo / "mlruns").is_dir() and (repo / ".dvc" / "cache").is_dir()
    assert _leaks(repo, planted["header"] | planted["record numbers"]) == {}
    train = load_split(size_dir(repo / "data" / "gray", 32), "train")
    assert {m["mode"].split(",")[0] for m in train.meta} == {"DICOM MONOCHROME1 12-bit", "DICOM MONOCHROME2 8-bit",
                                                            "DICOM MONOCHROME2 12-bit"}
    # each image's name is its path's pseudonym, its patient its PatientID's, with the project's salt
    key = (repo / ".cxr-salt").read_bytes().strip()
    by_name = {pseudonym(f.relative_to(folder).as_posix(), key): pydicom.dcmread(f).PatientID
               for f in folder.rglob("*") if f.is_file() and "_cut" not in f.name}
    assert all(m["patient_id"] == pseudonym(by_name[m["name"]], key) for m in train.meta)
    assert len({m["patient_id"] for m in train.meta}) == len({by_name[m["name"]] for m in train.meta}) > 10
    skipped = json.loads((repo / "reports" / "grayscale.json").read_text())["skipped_images"]
    assert sorted(s["reason"].split(" (")[0].split(":")[0] for s in skipped) == ["a DICOM without pixel data",
                                                                                  "truncated DICOM"]
    validation = json.loads((repo / "reports" / "split.json").read_text())["validation"]
    assert validation["by"] == "acquisition" and {b["series"] for b in validation["blocks"]} == {"study"}
    assert all(b["numbers"][0] == 1 for b in validation["blocks"])  # the earliest study days
    artifacts = {p.name for p in (repo / "mlruns").rglob("*") if p.is_file()}
    assert "error_gallery.json" in artifacts and "error_gallery.jpg" not in artifacts
    assert (repo / "reports" / "lin" / "gallery.jpg").stat().st_size > 0  # on this machine only
    example = next((repo / "mlruns").rglob("serving_input_example.json"))
    test_images = load_split(size_dir(repo / "data" / "split", 32), "test").images
    for b64 in re.findall(r'"([A-Za-z0-9+/=]{200,})"', example.read_text()):
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
        assert not any(np.abs(shown.astype(int) - t).mean() < 20 for t in test_images)


def test_public_mode_keeps_file_names_but_never_a_header_value(strict_run, tmp_path, monkeypatch):
    """The search finds what public mode writes (the record numbers in the file names), so its empty answer
    above means something; the header's values stay out all the same, PatientID as a pseudonym."""
    _, folder, planted = strict_run
    monkeypatch.setenv("CXR_SALT", "a test's own salt, not the checkout's")
    download(DataParams(source="imagefolder", path=str(folder)), tmp_path / "raw")
    grayscale(tmp_path / "raw", tmp_path / "gray", GrayParams(image_size=32, workers=1), "skip")
    leaks = _leaks(tmp_path, planted["header"] | planted["record numbers"])
    assert "raw/manifest.csv" in leaks and "gray/32/train_meta.csv" in leaks
    assert not set().union(*leaks.values()) & planted["header"]
    ids = {m["patient_id"] for m in load_split(size_dir(tmp_path / "gray", 32), "train").meta}
    assert not ids & planted["record numbers"] and all(re.fullmatch(r"[0-9a-f]{16}", p) for p in ids)


def test_cxr_shift_reads_a_dicom_folder_with_labels_and_pseudonymous_patients(strict_run, monkeypatch):
    from cxr.shift import load_set

    _, folder, planted = strict_run
    monkeypatch.setenv("CXR_SALT", "a test's own salt, not the checkout's")
    s = load_set(str(folder / "test"), 32)
    assert len(s.images) == 20 and sorted(np.bincount(s.labels).tolist()) == [10, 10]
    assert not set(s.patients.tolist()) & planted["record numbers"] and len(set(s.patients.tolist())) > 5


def test_predict_and_explain_answer_a_dicom_as_its_jpeg(strict_run, jpegs, tmp_path):
    """`cxr predict` on a JPEG and on DICOMs of each kind made of it (one named by a UID) gives the same
    probability within 1e-3; `cxr explain` draws a .dcm. (The served model: test_serving sends it one.)"""
    repo, _, _ = strict_run
    uri = json.loads((repo / "reports" / "lin" / "evaluation.json").read_text())["mlflow"]["model_uri"]
    files = [jpegs[1]]
    for i, kind in enumerate(KINDS):
        (path := tmp_path / (f"kind{i}.dcm" if i else "1.2.840.10008.99")).write_bytes(KINDS[kind](_gray(jpegs[1])))
        files.append(path)
    assert is_dicom(files[1].read_bytes()[:132])
    env = project_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"}
    out = subprocess.run([sys.executable, "-m", "cxr", "predict", "--json", "--model", uri, *map(str, files)],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    p = [json.loads(line)["p_pneumonia"] for line in out.stdout.splitlines()]
    assert len(p) == len(files) and max(abs(x - p[0]) for x in p) < 1e-3, p
    out = subprocess.run([sys.executable, "-m", "cxr", "explain", "--model", uri, "--out", str(tmp_path / "maps"),
                          str(files[2])], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and len(list((tmp_path / "maps").glob("*.png"))) == 1, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm", "MR_small_bigendian.dcm", "examples_overlay.dcm",
                                  "J2K_pixelrep_mismatch.dcm", "MR_small_padded.dcm"])
def test_the_table_of_shades_is_the_shading_of_every_pixel(name):
    """Integer images are shaded once per possible value and then indexed (dicom._display): the same image as
    shading each pixel, for signed, unsigned, big-endian, windowed and padded data."""
    from cxr.data import dicom

    ds = pydicom.dcmread(get_testdata_file(name))
    stored = ds.pixel_array
    fast, how = dicom._display(ds, stored, ds.PhotometricInterpretation)
    assert np.array_equal(fast, dicom._shade(ds, stored, ds.PhotometricInterpretation)[0]) and how.startswith("DICOM")
