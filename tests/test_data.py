"""download, grayscale and split on real X-rays, on images of every mode, and on bad input."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import manifest, shared
from cxr.data.gray import decode, equalize, grayscale, patient_id, to_gray
from cxr.data.sources import check_npz, download, offline_hint, scan_imagefolder
from cxr.data.split import first_fold, split
from cxr.data.store import load_split
from cxr.errors import CxrError
from cxr.params import DataParams, GrayParams, SplitParams
from fakehub import SHA, FakeHub


def prepare(tmp: Path, source: str, path: Path, size: int = 32, workers: int = 2) -> Path:
    download(DataParams(source=source, path=str(path)), tmp / "raw")
    grayscale(tmp / "raw", tmp / "gray", GrayParams(image_size=size, workers=workers))
    return tmp / "gray"


def test_imagefolder_scan_is_case_insensitive_and_hashes_match_the_manifest(small_folder):
    rows = scan_imagefolder(small_folder)
    by_name = {Path(r["path"]).name: r["sha256"] for r in manifest("chest_xray_224")}
    assert {r["split"] for r in rows} == {"train", "test"}
    assert {r["label"] for r in rows} == {0, 1}
    assert all(by_name[Path(r["path"]).name] == r["sha256"] for r in rows)


def test_imagefolder_errors(tmp_path):
    (tmp_path / "train" / "COVID").mkdir(parents=True)
    with pytest.raises(CxrError, match="unknown class folder; expected NORMAL or PNEUMONIA"):
        scan_imagefolder(tmp_path)
    with pytest.raises(CxrError, match="is not a folder"):
        scan_imagefolder(tmp_path / "nope")
    (tmp_path / "train" / "COVID").rmdir()
    with pytest.raises(CxrError, match="no images under"):
        download(DataParams(source="imagefolder", path=str(tmp_path)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and not list(tmp_path.glob(".raw*"))


def test_hub_unreachable_fails_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once
    t0 = time.perf_counter()
    with pytest.raises(CxrError, match="cannot reach the Hugging Face hub.*make quick DATA=/abs/path"):
        download(DataParams(source="hub"), tmp_path / "raw")  # no GPU here: the CPU profile is suggested
    assert time.perf_counter() - t0 < 10
    assert list(tmp_path.iterdir()) == []
    assert "cxr run -S data.source=imagefolder -S data.path=" in offline_hint(cuda=True)  # a GPU: the full run


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "1", "CMYK"])
def test_every_mode_becomes_8bit_gray(mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base).astype(np.uint16) * 16).astype(np.uint16))  # 12-bit data
    else:
        img = base.convert(mode)
    out = to_gray(img, 24)
    assert out.shape == (24, 24) and out.dtype == np.uint8
    if mode in ("L", "RGB", "P", "I;16"):  # I;16: scaled by its 12-bit depth, not by 65535
        assert abs(int(out.mean()) - int(to_gray(base, 24).mean())) <= 3


def test_transparent_pixels_become_black():
    img = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    assert to_gray(img, 10).max() == 0


@pytest.mark.parametrize("fit", ["stretch", "pad", "crop"])
def test_fit_modes_on_a_wide_real_image(fit):
    row = max(manifest("chest_xray_fullres_sample"), key=lambda r: int(r["width"]) / int(r["height"]))
    img = Image.open(shared("chest_xray_fullres_sample") / row["path"])
    out = to_gray(img, 64, fit)
    assert out.shape == (64, 64)
    if fit == "pad":
        assert out[0].max() == 0 and out[32].max() > 0  # letterbox bars on top, image in the middle


def test_patient_ids_from_kaggle_names():
    assert patient_id("person1_bacteria_1.jpeg") == "person1"
    assert patient_id("train/PNEUMONIA/person1159_virus_1944_jpeg.rf.ab12.jpg") == "person1159"
    assert patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_id("NORMAL2-IM-0927-0001-0002.jpeg") == "NORMAL2-IM-0927"
    assert patient_id("12.png") == ""


def test_fullres_sample_mixed_sizes_and_modes(tmp_path):
    gray = prepare(tmp_path, "imagefolder", shared("chest_xray_fullres_sample"), size=64)
    data = load_split(gray / "64", "train")
    assert data.images.shape == (220, 64, 64) and data.images.dtype == np.uint8
    assert {m["mode"] for m in data.meta} == {"L", "RGB"}
    assert int(min(int(m["width"]) for m in data.meta)) >= 399
    assert np.bincount(data.labels).tolist() == [100, 120]
    assert 30 < data.images.mean() < 220 and data.images.std() > 20  # real X-ray content, not blank


def test_npz_pneumoniamnist(tmp_path):
    path = shared("pneumoniamnist") / "pneumoniamnist_28.npz"
    assert check_npz(path) == {"train": 4708, "val": 524, "test": 624}
    gray = prepare(tmp_path, "npz", path, size=28, workers=1)
    with np.load(path) as z:
        assert np.array_equal(load_split(gray / "28", "val").images, z["val_images"])  # same size: untouched
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(CxrError, match="no {train,val,test}_images arrays"):
        check_npz(tmp_path / "bad.npz")


def test_the_hub_source_end_to_end_from_a_local_hub(tmp_path):
    """The default source, offline: a parquet export in the hub dataset's layout ({config}/{split}/0000.parquet)
    and schema, built here from real X-rays and served by a local hub at HF_ENDPOINT; the download stage's own
    code fetches it (in a fresh process, since huggingface_hub reads HF_ENDPOINT at import), then grayscale."""
    import datasets

    rows = [r for r in manifest("chest_xray_224") if r["split"] == "test"][::40]
    features = datasets.Features({"image_file_path": datasets.Value("string"), "image": datasets.Image(),
                                  "labels": datasets.ClassLabel(names=["NORMAL", "PNEUMONIA"])})
    root, export = shared("chest_xray_224"), tmp_path / "export"
    for name, part in (("train", rows[:8]), ("validation", rows[8:12]), ("test", rows[12:])):
        (export / "full" / name).mkdir(parents=True)
        datasets.Dataset.from_dict({  # Roboflow's names, as in the hub dataset
            "image_file_path": [f"/x/{Path(r['path']).stem}_jpeg.rf.0.jpg" for r in part],
            "image": [str(root / r["path"]) for r in part],
            "labels": [int(r["label"] == "PNEUMONIA") for r in part]}, features=features,
        ).to_parquet(str(export / "full" / name / "0000.parquet"))
    raw = tmp_path / "raw"
    with FakeHub(export, "keremberke/chest-xray-classification", "refs/convert/parquet") as hub:
        code = ("import sys; from pathlib import Path; from cxr.data.sources import download; "
                "from cxr.params import DataParams; print(download(DataParams(source='hub'), Path(sys.argv[1])))")
        res = subprocess.run([sys.executable, "-c", code, str(raw)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
        assert res.returncode == 0, res.stderr[-3000:]
    assert {f"GET /datasets/keremberke/chest-xray-classification/resolve/{SHA}/full/{s}/0000.parquet"
            for s in ("train", "validation", "test")} <= set(hub.log)
    source = json.loads((raw / "source.json").read_text())
    assert source["counts"] == {"train": 8, "validation": 4, "test": len(rows) - 12}
    counts = grayscale(raw, tmp_path / "gray", GrayParams(image_size=32, workers=1))["counts"]
    assert counts == {"train": 8, "val": 4, "test": len(rows) - 12}
    meta = load_split(tmp_path / "gray" / "32", "train").meta
    by_name = {Path(r["path"]).stem: r for r in rows}
    assert all(m["sha256"] == by_name[m["name"].split("/")[-1].split("_jpeg")[0]]["sha256"] for m in meta)
    assert all(m["patient_id"] for m in meta)


@pytest.fixture(scope="module")
def gray224(tmp_path_factory):
    """The whole real 224 px set (5840 images) at 32 px."""
    return prepare(tmp_path_factory.mktemp("g224"), "imagefolder", shared("chest_xray_224"), size=32)


def test_split_carves_val_by_patient_and_finds_the_real_duplicates(gray224, tmp_path):
    report = split(gray224, tmp_path / "s", SplitParams(val_fraction=0.1), seed=1)
    assert report["carved"] == ["val"]
    dup = report["duplicates"]
    assert sum(dup["within_split_extra_copies"].values()) + sum(dup["across_splits"].values()) == 32
    assert "train-val" not in dup["patient_ids_across_splits"]  # grouped: no patient on both sides
    train, val = load_split(tmp_path / "s" / "32", "train"), load_split(tmp_path / "s" / "32", "val")
    assert len(val.labels) + len(train.labels) == 5216 and 0.08 < len(val.labels) / 5216 < 0.12
    assert abs(val.labels.mean() - train.labels.mean()) < 0.03  # stratified
    assert not {m["patient_id"] for m in train.meta} & {m["patient_id"] for m in val.meta}
    again = split(gray224, tmp_path / "s2", SplitParams(val_fraction=0.1), seed=1)
    assert again == report and np.array_equal(load_split(tmp_path / "s2" / "32", "val").images, val.images)


def test_the_carved_fold_is_scikit_learns_stratified_group_fold_on_the_real_patients(seed=42):
    """The split stage draws scikit-learn's first StratifiedGroupKFold fold without importing it: the same images,
    on Kaggle's real patient groups (10% and 15% folds) and on a three-class set with many one-image groups."""
    from sklearn.model_selection import StratifiedGroupKFold

    rows = [r for r in manifest("chest_xray_224") if r["split"] == "train"]
    names = [Path(r["path"]).name for r in rows]
    groups = np.array([patient_id(n) or n for n in names])
    labels = np.array([r["label"] == "PNEUMONIA" for r in rows], dtype=np.int64)
    rng = np.random.default_rng(seed)
    cases = [(labels, groups, 10), (labels, groups, 7),
             (rng.integers(0, 3, 900), rng.integers(0, 600, 900).astype(str), 4)]
    for y, g, n in cases:
        _, want = next(StratifiedGroupKFold(n, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, g))
        assert np.array_equal(np.flatnonzero(first_fold(y, g, n, seed)), np.sort(want))


def test_patients_crossing_the_sources_splits_are_warned_of_and_pooling_splits_again_by_patient(gray224, tmp_path,
                                                                                                caplog):
    kept = split(gray224, tmp_path / "s", SplitParams(), seed=0)
    crossing = kept["source_patients_across_splits"]
    assert crossing["train-test"] > 0  # Kaggle's own split, by the patient ids in its file names
    assert f"{crossing['train-test']} patients have images in more than one of the source's splits" in caplog.text
    pooled = split(gray224, tmp_path / "p", SplitParams(pool=True, val_fraction=0.1, test_fraction=0.15), seed=0)
    assert pooled["carved"] == ["test", "val"] and pooled["pooled"]
    counts = {s: sum(c.values()) for s, c in pooled["counts"].items()}
    assert sum(counts.values()) == 5840 and 0.12 < counts["test"] / 5840 < 0.18
    assert "patient_ids_across_splits" in pooled["duplicates"] and not pooled["duplicates"]["patient_ids_across_splits"]
    # each image's pixels come along from whichever source split it was in
    source = {m["name"]: (s, i) for s in ("train", "test") for i, m in enumerate(load_split(gray224 / "32", s).meta)}
    test = load_split(tmp_path / "p" / "32", "test")
    assert {m["source_split"] for m in test.meta} == {"train", "test"}
    arrays = {s: np.load(gray224 / "32" / f"{s}_images.npy") for s in ("train", "test")}
    assert all(np.array_equal(img, arrays[source[m["name"]][0]][source[m["name"]][1]])
               for img, m in zip(test.images, test.meta, strict=True))


KAGGLE_SERIES = [r"^(?P<series>NORMAL2-IM|IM)-(?P<number>\d+)-", r"^person\d+_(?P<series>bacteria|virus)_"]


@pytest.mark.parametrize("end", ["low", "high"])
def test_acquisition_validation_holds_whole_patients_and_whole_blocks_of_each_series(gray224, tmp_path, end):
    """val_by acquisition: in each numbered series (Kaggle's IM and NORMAL2-IM normals), validation is the block of
    patients at one end of the running numbers, about val_fraction of the series; names of no numbered series (the
    pneumonia images) are carved at random by patient; split.json states the rule and the blocks."""
    p = SplitParams(val_by="acquisition", series=KAGGLE_SERIES, val_end=end)
    report = split(gray224, tmp_path / "s", p, seed=1, report_path=tmp_path / "split.json")
    rule = json.loads((tmp_path / "split.json").read_text())["validation"]
    assert rule == report["validation"] and rule["by"] == "acquisition" and rule["end"] == end
    assert rule["series"] == KAGGLE_SERIES and rule["share"] == 0.1
    train, val = (load_split(tmp_path / "s" / "32", s) for s in ("train", "val"))
    assert not {m["patient_id"] for m in train.meta} & {m["patient_id"] for m in val.meta}  # whole patients
    assert {b["series"] for b in rule["blocks"]} == {"IM", "NORMAL2-IM"}
    def numbers(data, series):  # IM-0115-0001.jpeg, NORMAL2-IM-0395-0001-0002.jpeg
        base = [m["name"].split("/")[-1] for m in data.meta]
        return [int(b.removeprefix(f"{series}-").split("-")[0]) for b in base if b.startswith(f"{series}-")]

    for block in rule["blocks"]:
        mine, rest = numbers(val, block["series"]), numbers(train, block["series"])
        assert len(mine) == block["images"] and [min(mine), max(mine)] == block["numbers"]
        assert (max(mine) < min(rest)) if end == "low" else (min(mine) > max(rest))  # one block at that end
        assert 0.1 <= block["images"] / block["of_images"] < 0.12
    pneumonia = [m for m in val.meta if "person" in m["name"]]
    assert len(pneumonia) == rule["unnumbered"]["carved"]
    assert 0.08 < len(pneumonia) / rule["unnumbered"]["images"] < 0.12
    with pytest.raises(CxrError, match="split.val_by acquisition: no training file name matches"):
        split(gray224, tmp_path / "n", SplitParams(val_by="acquisition", series=[r"^(?P<series>x)(?P<number>\d+)"]),
              seed=1)
    assert not (tmp_path / "n").exists()


def test_a_patients_images_stay_together_when_only_some_are_numbered_and_a_lone_patient_stays_in_train():
    """Names of other sources: each of 40 patients has a numbered image (S-<k>-1.png) and an unnumbered one
    (other_<k>.png); one series holds a single patient. Validation takes whole patients, never half of one."""
    from cxr.data.split import carve_blocks
    from cxr.data.store import Split

    meta = [{"name": f"S-{k:03d}-1.png", "patient_id": f"P{k}", "sha256": f"a{k}"} for k in range(40)]
    meta += [{"name": f"other_{k}.png", "patient_id": f"P{k}", "sha256": f"b{k}"} for k in range(40)]
    meta += [{"name": "LONE-007-1.png", "patient_id": "L", "sha256": "c"}]
    labels = np.array([k % 2 for k in range(40)] * 2 + [0])
    data = Split(np.arange(len(meta)), labels, meta)
    kept, carved, info = carve_blocks(data, 0.2, 0, [r"^(?P<series>[A-Z]+)-(?P<number>\d+)-"], "low")
    side = {meta[i]["patient_id"]: "val" for i in carved} | {meta[i]["patient_id"]: "train" for i in kept}
    assert all(side[meta[i]["patient_id"]] == "val" for i in carved)  # no patient on both sides
    assert info["unnumbered"]["images"] == 0  # every patient has a numbered image: none is carved at random
    assert [b["series"] for b in info["blocks"]] == ["S", "S"] and "L" in {meta[i]["patient_id"] for i in kept}
    assert sorted(meta[i]["name"] for i in carved if meta[i]["name"].startswith("S-"))[:4] == [
        "S-000-1.png", "S-001-1.png", "S-002-1.png", "S-003-1.png"]  # the low end of each class's block


def test_auto_validation_keeps_the_one_whose_images_look_most_like_test_s_without_test_labels(gray224, tmp_path):
    from cxr import shift

    p = SplitParams(val_by="auto", series=KAGGLE_SERIES)
    report = split(gray224, tmp_path / "s", p, seed=1, likeness=shift.likeness)
    choice = report["validation"]["choice"]
    measured = {by: choice["domain_auroc"][by]["auroc"] for by in ("patient", "acquisition")}
    assert choice["by"] == min(measured, key=measured.get) == report["validation"]["by"]
    assert all(0.5 < a < 1 for a in measured.values())  # Kaggle's test folder looks different from either
    same = split(gray224, tmp_path / "e", SplitParams(val_by=choice["by"], series=KAGGLE_SERIES), seed=1)
    def rest(r):
        return {k: v for k, v in r.items() if k != "validation"}

    assert rest(same) == rest(report)
    # The measure reads images and patient ids, never labels: flipping test's labels changes nothing
    val, test = (load_split(tmp_path / "s" / "32", s) for s in ("val", "test"))
    flipped = type(test)(test.images, 1 - test.labels, test.meta)
    assert shift.likeness(val, test)["auroc"] == shift.likeness(val, flipped)["auroc"]


@pytest.mark.parametrize("how", ["hist", "clahe"])
def test_equalize_spreads_a_real_x_rays_gray_levels_and_the_stage_records_it(how, small_folder, tmp_path):
    path = next((small_folder / "test" / "normal").iterdir())
    [plain], *_ = decode((str(path), str(path)), [64], "stretch")[:1]
    [eq], *_ = decode((str(path), str(path)), [64], "stretch", how=how)[:1]
    assert eq.dtype == np.uint8 and eq.shape == (64, 64) and np.array_equal(eq, equalize(plain, how))
    assert eq.std() > plain.std()  # contrast spread over the gray range
    if how == "hist":  # the cumulative histogram becomes about a straight line
        cdf = np.cumsum(np.bincount(eq.ravel(), minlength=256)) / eq.size
        assert np.abs(cdf - np.linspace(0, 1, 256)).max() < 0.1
    grayscale(prepare_raw(tmp_path, small_folder), tmp_path / "gray", GrayParams(image_size=32, equalize=how,
                                                                                  workers=1))
    assert json.loads((tmp_path / "gray" / "32" / "preprocessing.json").read_text())["equalize"] == how


def prepare_raw(tmp: Path, folder: Path) -> Path:
    download(DataParams(source="imagefolder", path=str(folder)), tmp / "raw")
    return tmp / "raw"


def test_split_downsample_and_drop_duplicates(gray224, tmp_path):
    report = split(gray224, tmp_path / "s", SplitParams(balance="downsample", drop_duplicates=True), seed=0)
    assert sum(report["dropped_duplicates"].values()) == 32
    counts = report["counts"]
    assert counts["train"]["NORMAL"] == counts["train"]["PNEUMONIA"]
    assert sum(counts["test"].values()) == 624 - report["dropped_duplicates"]["test"]
    hashes = [m["sha256"] for s in ("train", "val", "test") for m in load_split(tmp_path / "s" / "32", s).meta]
    assert len(hashes) == len(set(hashes))


def test_extra_sizes_come_from_one_decode_and_split_alike(small_folder, tmp_path):
    gray = tmp_path / "gray"
    download(DataParams(source="imagefolder", path=str(small_folder)), tmp_path / "raw")
    grayscale(tmp_path / "raw", gray, GrayParams(image_size=32, extra_sizes=[64], workers=2))
    small, big = load_split(gray / "32", "train"), load_split(gray / "64", "train")
    assert small.images.shape[1:] == (32, 32) and big.images.shape[1:] == (64, 64)
    assert small.meta == big.meta and np.array_equal(small.labels, big.labels)
    down = big.images.reshape(-1, 32, 2, 32, 2).mean(axis=(2, 4))
    assert np.abs(down - small.images).mean() < 4  # the same pictures
    split(gray, tmp_path / "s", SplitParams(), seed=0)
    for s in ("train", "val", "test"):
        assert load_split(tmp_path / "s" / "32", s).meta == load_split(tmp_path / "s" / "64", s).meta


def test_three_class_needs_kaggle_file_names(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", **{f"{s}_images": rng.integers(0, 255, (20, 28, 28), dtype=np.uint8)
                                    for s in ("train", "val", "test")},
             **{f"{s}_labels": np.arange(20) % 2 for s in ("train", "val", "test")})
    gray = prepare(tmp_path, "npz", tmp_path / "x.npz", size=28, workers=1)
    with pytest.raises(CxrError, match="10 PNEUMONIA images have neither 'bacteria' nor 'virus'.*cannot give 3"):
        split(gray, tmp_path / "s", SplitParams(), seed=0, labels="three_class")
    assert not (tmp_path / "s").exists()


def test_a_val_folder_as_small_as_kaggles_is_warned_of(tmp_path, caplog):
    # Kaggle's val/ has 16 images: early stopping, the threshold and model choice would rest on them.
    rows = [r for r in manifest("chest_xray_224") if r["split"] == "train"]
    src = tmp_path / "src"
    normal = [r for r in rows if r["label"] == "NORMAL"]
    pneumonia = [r for r in rows if r["label"] == "PNEUMONIA"]
    for part, chosen in (("train", normal[:20] + pneumonia[:20]), ("test", normal[20:28] + pneumonia[20:28]),
                         ("val", normal[28:36] + pneumonia[28:36])):
        for r in chosen:
            link = src / part / r["label"] / Path(r["path"]).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(shared("chest_xray_224") / r["path"])
    gray = prepare(tmp_path, "imagefolder", src)
    split(gray, tmp_path / "s", SplitParams(), seed=0)
    assert "the source's val split has only 16 images" in caplog.text and "remove that folder" in caplog.text
