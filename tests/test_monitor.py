"""`cxr monitor` on real X-rays and a real model: prediction logs written by the real writer (serving.read, score,
PredictionLog) from the model's own validation images (no alert), a brightened copy of them and Kaggle's test
images (alerts that say what moved), a log with torn lines and another model's lines; the thresholds' family-wise
false-alarm rate on fresh resamples; and the pure statistics (Wilson, PSI, CBPE, KS) against known values."""

import base64
import io
import json
import os
import re
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import stats as scipy_stats

from conftest import ROOT, SHARED, data_stages, manifest, project_env, shared
from cxr import params, serving
from cxr.data.store import load_split
from cxr.errors import CxrError
from cxr.evaluation.variant import evaluate_variant
from cxr.inference import load_logged
from cxr.jobs import monitor as mon
from cxr.jobs.serve import served
from cxr.params import GrayParams
from cxr.training.variant import train_variant

NAME = "cxr-monitor-test"
EXPERIMENT = "monitor-test"
WINDOW = 50


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A real mlp trained for 4 epochs at 32 px on 800 Kaggle train images (500 per class, 200 of them its
    validation set), evaluated (temperature and threshold fitted on validation), logged, registered and made
    champion in the session's SQLite store; its validation images decoded from their files, as a server reads
    them."""
    tmp = tmp_path_factory.mktemp("monitor")
    data = data_stages(tmp, 500, GrayParams(image_size=32, workers=2))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update({"epochs": 4, "batch_size": 32})
    raw["gray"]["image_size"] = 32
    p = params.parse(raw)
    train_variant(p, "mlp", data, tmp / "m", tmp / "r", tmp / "ck")
    ev = evaluate_variant(p, "mlp", data, tmp / "m", tmp / "r")
    version = mlflow.register_model(ev["mlflow"]["model_uri"], NAME).version
    MlflowClient().set_registered_model_alias(NAME, "champion", version)
    uri = f"models:/{NAME}@champion"
    model, card = load_logged(uri)
    where = {r["sha256"]: SHARED / "chest_xray_224" / r["path"] for r in manifest("chest_xray_224")}
    val = load_split(data / "32", "val")
    files = [where[m["sha256"]] for m in val.meta]
    decoded = [serving.read(f, card) for f in files]
    assert all(np.array_equal(d.gray, im) for d, im in zip(decoded, val.images, strict=True))  # what it saw
    return {"uri": uri, "model": model, "card": card, "identity": serving.identity(uri) | {"variant": card.variant},
            "reference": f"{data}:val", "val": decoded, "files": files, "version": str(version)}


def write_log(folder: Path, c: dict, decoded: list[serving.Decoded], who: dict | None = None, calls: int = 1) -> Path:
    """`decoded` scored by the champion and appended to the log in `folder` by the real writer, in `calls`
    requests."""
    log = serving.PredictionLog(folder, who or c["identity"])
    for part in np.array_split(np.arange(len(decoded)), calls):
        batch = [decoded[i] for i in part]
        log.write(batch, serving.score(c["model"], c["card"], [d.gray for d in batch]))
    return folder


def run(c: dict, log: Path, out: Path, window: int = WINDOW) -> tuple[int, dict]:
    code = mon.monitor([log], c["uri"], c["reference"], window, out, EXPERIMENT)
    return code, json.loads((out / "monitor.json").read_text())


def test_windows_of_the_validation_images_raise_no_alert_and_leave_a_report_a_figure_and_a_run(champion, tmp_path,
                                                                                                capsys):
    """40 windows of 50 lines, each a seeded resample of the model's 200 validation images: at most 5% alert
    (the thresholds are set for 5% on windows of new images like these; windows of the reference's own images
    alert less), the exit code says whether any did, and the report, the figure and the run are there."""
    pick = np.random.default_rng(1).integers(0, len(champion["val"]), 40 * WINDOW)
    log = write_log(tmp_path / "log", champion, [champion["val"][i] for i in pick], calls=40)
    code, report = run(champion, log, tmp_path / "out")
    windows = report["windows"]
    alerts = sum(w["alert"] for w in windows)
    assert len(windows) == 40 and all(w["lines"] == WINDOW for w in windows)
    assert alerts <= 0.05 * len(windows), [w["moved"] for w in windows if w["alert"]]
    assert mon.chance_allows(40, 0.05) == 4  # windows alerting by chance alone, 95 times in 100
    assert code == report["exit_code"] == 0 and report["verdict"].startswith("no alert")
    assert report["logs"]["used"] == 2000 and report["logs"]["skipped"] == 0 and not report["logs"]["other_models"]
    assert report["reference"]["warnings"] == []  # data/split:val is the set the card says it was validated on
    # thresholds set on resampled windows for a 5% family-wise rate, every statistic at one quantile level
    cal = report["thresholds"]["by_window"][str(WINDOW)]
    assert 0.04 <= cal["false_alarm_rate"] <= 0.05 and 0.95 < cal["quantile"] < 1
    # every Kaggle image is 224 px wide: resamples never vary the width, and its threshold is the floor for a kind
    # of image never seen in 200 (3 in a window of 50 may come by chance: rule of three)
    assert cal["thresholds"]["width_ks"] == cal["ks_floor"] == 3 / WINDOW
    # the reference's figures: the truth beside the label-free estimate, which stays near it on its windows
    ref = report["reference"]
    assert ref["images"] == 200 and ref["prevalence"] == 0.5 and ref["sensitivity"] > 0.8
    check = ref["cbpe_check"]
    assert abs(check["sensitivity_bias"]) < 0.05 and abs(check["specificity_bias"]) < 0.05, check
    assert abs(ref["cbpe_sensitivity"] - ref["sensitivity"]) < 0.05
    printed = capsys.readouterr().out
    assert f"Verdict: {report['verdict'][:40]}" in printed
    assert len(re.findall(r"(?m)^ +\d+  2\d{3}-", printed)) == 40  # a row per window
    assert (tmp_path / "out" / "monitor.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient()
    run_ = client.get_run(report["mlflow"]["run_id"])
    tags = run_.data.tags
    assert tags["registered_model"] == NAME and tags["model_version"] == champion["version"]
    assert tags["monitor.alert"] == str(bool(alerts))
    assert tags["model_id"] == champion["identity"]["model_id"] and tags["monitor.verdict"] == report["verdict"]
    assert client.get_experiment(run_.info.experiment_id).name == EXPERIMENT
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "score_ks")] == list(range(1, 41))
    assert {a.path for a in client.list_artifacts(run_.info.run_id)} == {"monitor.json", "monitor.png"}


def test_the_validation_set_through_cxr_serve_is_logged_as_the_writer_logs_it_and_as_one_window_is_no_alert(
        champion, tmp_path):
    """Every validation file once, POSTed to `cxr serve` on the champion (a real server on 127.0.0.1): the lines
    the server logs are the in-process writer's for the same images (but the time); as one window of 200 they
    are the reference's distribution in every statistic, so nothing can alert, on any machine."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"registered_model": NAME}}))
    env = project_env() | {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
                           serving.LOG_ENV: str(tmp_path / "log")}
    with served(champion["uri"], env, cxr_serve=True, cwd=tmp_path) as url:
        for i in range(0, len(champion["files"]), 50):
            body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
                [base64.b64encode(f.read_bytes()).decode()] for f in champion["files"][i:i + 50]]}}).encode()
            request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                assert r.status == 200
    from_server = [json.loads(x) for x in next((tmp_path / "log").glob("*.jsonl")).read_text().splitlines()]
    written = write_log(tmp_path / "writer", champion, champion["val"])
    mine = [json.loads(x) for x in next(written.glob("*.jsonl")).read_text().splitlines()]
    assert len(from_server) == len(mine)
    for a, b in zip(from_server, mine, strict=True):  # P within 1e-6: batches of 50 against one of 200 round apart
        assert a["p_pneumonia"] == pytest.approx(b["p_pneumonia"], abs=1e-6)
        assert {k: v for k, v in a.items() if k not in ("time", "p_pneumonia")} == \
            {k: v for k, v in b.items() if k not in ("time", "p_pneumonia")}
    code, report = run(champion, tmp_path / "log", tmp_path / "out", 200)
    [w] = report["windows"]
    assert code == 0 and report["verdict"].startswith("no alert: the one window looks like") and not w["alert"]
    # nothing moved: the scores' KS may see a pair of P's 1e-7 apart swap places (the server's batches), no more
    assert all(w[k] <= (2 / 200 if k == "score_ks" else 1e-6) for k in mon.MEASURES), {k: w[k] for k in mon.MEASURES}
    assert w["cbpe_sensitivity"] == pytest.approx(report["reference"]["cbpe_sensitivity"])


def brightened(path: Path, card, shift: int = 40) -> serving.Decoded:
    """The file's image `shift` grey levels brighter (clipped), sent as a PNG, read as the server reads it."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(grey + shift, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return serving.read(buf.getvalue(), card)


def test_a_brightened_copy_of_the_validation_images_alerts_in_every_window_naming_the_mean_grey(champion, tmp_path):
    where = {r["sha256"]: SHARED / "chest_xray_224" / r["path"] for r in manifest("chest_xray_224")}
    order = np.random.default_rng(3).permutation(len(champion["val"]))  # the split lists a class at a time
    bright = [brightened(where[champion["val"][i].sha256], champion["card"]) for i in order]
    code, report = run(champion, write_log(tmp_path / "log", champion, bright, calls=4), tmp_path / "out")
    windows = report["windows"]
    assert code == mon.ALERT_EXIT and report["verdict"].startswith("ALERT in 4 of 4 windows")
    for w in windows:
        assert w["alert"] and "mean_ks" in w["exceeded"] and w["unreliable"]  # CBPE cannot be read on these
        assert any(m.startswith("mean grey (KS ") for m in w["moved"]), w["moved"]
    assert "mean grey in 4" in report["verdict"]
    # the vectorised statistics of a window are scipy's KS and psi() on the log's values against the reference's
    ref = mon.load_reference(champion["reference"], champion["model"], champion["card"])
    first = mon.read_logs([tmp_path / "log"]).lines[:WINDOW]
    for k in ("mean", "border", "sharpness"):
        ks = scipy_stats.ks_2samp(ref.columns[k], [r[k] for r in first]).statistic
        assert windows[0][f"{k}_ks"] == pytest.approx(ks, abs=1e-9)
    assert windows[0]["score_psi"] == pytest.approx(mon.psi(ref.columns["p"], [r["p_pneumonia"] for r in first]))


def test_kaggle_test_images_a_source_the_model_never_drew_from_alert(champion, tmp_path):
    """The model's training and validation images are from Kaggle's train folder; its test folder is another
    population (docs/shift.md): the log of all 624 of them alerts."""
    files = sorted(shared("chest_xray_224").joinpath("test").rglob("*.jpeg"))
    order = np.random.default_rng(0).permutation(len(files))  # as patients arrive: the classes mixed
    decoded = [serving.read(files[i], champion["card"]) for i in order]
    code, report = run(champion, write_log(tmp_path / "log", champion, decoded, calls=12), tmp_path / "out")
    windows = report["windows"]
    assert code == mon.ALERT_EXIT and len(windows) == 12  # and the last 24 lines, under half a window, left out
    assert report["logs"]["left_out"] == 24
    assert sum(w["alert"] for w in windows) >= 0.75 * len(windows), [w["moved"] for w in windows]


def test_full_resolution_originals_alert_on_their_size_and_one_in_a_window_does_not(champion, tmp_path):
    """Kaggle's untouched originals (399 to 2890 px wide) beside the 224 px copies the model knows: a window of
    them alerts on width, height and aspect; one original among 49 validation images is no alarm."""
    files = sorted(shared("chest_xray_fullres_sample").rglob("*.jpeg"))[:100]
    originals = [serving.read(f, champion["card"]) for f in files]
    rng = np.random.default_rng(4)
    mixed = [d for k in range(4) for d in [originals[k], *(champion["val"][i] for i in rng.integers(0, 200, 49))]]
    code, report = run(champion, write_log(tmp_path / "one", champion, mixed), tmp_path / "out1")
    assert not any({"width_ks", "height_ks", "aspect_ks"} & set(w["exceeded"]) for w in report["windows"])
    code, report = run(champion, write_log(tmp_path / "all", champion, originals), tmp_path / "out2")
    sizes = {"width_ks", "height_ks", "aspect_ks"}
    assert code == mon.ALERT_EXIT and all(sizes <= set(w["exceeded"]) for w in report["windows"])
    assert all(any(m.startswith("width (KS 1.00 > 0.06)") for m in w["moved"]) for w in report["windows"])


def test_torn_lines_are_skipped_and_counted_other_models_left_out_and_a_log_of_none_of_its_lines_is_refused(
        champion, tmp_path):
    pick = np.random.default_rng(2).permutation(len(champion["val"]))[:100]  # the split lists a class at a time
    log = write_log(tmp_path / "log", champion, [champion["val"][i] for i in pick], calls=2)
    other = {"model": "other-model", "version": "7", "model_id": "m-0ther"}
    write_log(tmp_path / "log", champion, champion["val"][100:130], who=other)
    [path] = sorted(log.glob("predictions-*.jsonl"))
    good = path.read_text().splitlines()
    broken = json.loads(good[0])
    del broken["p_pneumonia"]
    with path.open("ab") as f:  # a torn line (a full disk), garbage, JSON that is no line, one without its score
        f.write(good[1][:40].encode() + b"\n" + b"\x00\xff\xfe garbage\n" + b"[1, 2]\n" + json.dumps(broken).encode()
                + b"\n")
    code, report = run(champion, log, tmp_path / "out", window=40)
    logs = report["logs"]
    assert logs["skipped"] == 3 and logs["skipped_by_file"] == {str(path): 3} and logs["malformed"] == 1
    assert logs["used"] == 100 and logs["other_models"] == {"m-0ther": {"lines": 30, "model": "other-model",
                                                                        "version": "7"}}
    assert [(w["lines"], w["partial"]) for w in report["windows"]] == [(40, False), (40, False), (20, True)]
    assert logs["left_out"] == 0 and set(report["thresholds"]["by_window"]) == {"40", "20"}  # its own thresholds
    assert code == report["exit_code"]
    # a log of the other model's lines alone: one line that names what it holds and the --model to give
    only = write_log(tmp_path / "only", champion, champion["val"][:20], who=other)
    with pytest.raises(CxrError) as e:
        mon.monitor([only], champion["uri"], champion["reference"], WINDOW, tmp_path / "out2", EXPERIMENT)
    msg = str(e.value)
    assert "\n" not in msg and "m-0ther (other-model version 7, 20 lines)" in msg
    assert "--model models:/other-model/7" in msg and champion["identity"]["model_id"] in msg
    assert not (tmp_path / "out2").exists()
    with pytest.raises(CxrError, match="no such file or folder"):
        mon.monitor([tmp_path / "nowhere"], champion["uri"], champion["reference"], WINDOW, tmp_path / "o", EXPERIMENT)
    with pytest.raises(CxrError, match=r"--window 5: give 10 lines or more"):
        mon.monitor([log], champion["uri"], champion["reference"], 5, tmp_path / "o", EXPERIMENT)
    with pytest.raises(CxrError, match=r"100 lines of the model: fewer than half a window of 300; give --window 100"):
        mon.monitor([log], champion["uri"], champion["reference"], 300, tmp_path / "o", EXPERIMENT)


def test_log_lines_are_read_in_time_order_across_files(champion, tmp_path):
    import datetime

    writer = serving.PredictionLog(tmp_path, champion["identity"])
    batch = champion["val"][:3]
    rows = serving.score(champion["model"], champion["card"], [d.gray for d in batch])
    day = datetime.datetime(2026, 12, 7, 23, 59, tzinfo=datetime.UTC)
    (tmp_path / "b.jsonl").write_bytes(writer.lines(batch, rows, day))  # read first, written later
    (tmp_path / "a.jsonl").write_bytes(writer.lines(batch, rows, day + datetime.timedelta(minutes=2)))
    logs = mon.read_logs([tmp_path])
    assert [r["time"] for r in logs.lines] == ["2026-12-07T23:59:00.000Z"] * 3 + ["2026-12-08T00:01:00.000Z"] * 3
    assert [r["sha256"] for r in logs.lines[:3]] == [d.sha256 for d in batch]  # one time: the files' order


def test_the_family_wise_false_alarm_rate_on_fresh_resamples_of_the_reference_is_the_rate_asked(champion):
    ref = mon.load_reference(champion["reference"], champion["model"], champion["card"])
    cal = mon.calibrate(ref, WINDOW, 0.05, mon.RESAMPLES, seed=0)
    values = np.array([cal["thresholds"][k] for k in mon.MEASURES])
    assert 0.035 <= cal["false_alarm_rate"] <= 0.05
    fresh = mon.null_measures(ref, WINDOW, 4000, seed=123)  # other draws than those the thresholds came from
    rate = float((fresh > values).any(1).mean())
    assert 0.02 <= rate <= 0.08, rate
    # each statistic alone alerts far less often than the family: the level is well above 95%
    assert cal["quantile"] > 0.98 and all((fresh[:, k] > values[k]).mean() < 0.03 for k in range(len(values)))
    # the same seed, the same thresholds
    assert mon.calibrate(ref, WINDOW, 0.05, mon.RESAMPLES, seed=0) == cal


def test_the_vectorised_ks_is_scipys_and_the_null_is_seeded():
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=300), 1)  # ties, as rounded statistics have
    ri, wi = rng.integers(0, 300, (5, 300)), rng.integers(0, 300, (5, 40))
    ks = mon._ks(values, ri, wi)
    for b in range(5):
        assert ks[b] == pytest.approx(scipy_stats.ks_2samp(values[ri[b]], values[wi[b]]).statistic, abs=1e-12)


def test_wilson_psi_and_cbpe_against_known_values():
    lo, hi = mon.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert mon.wilson(0, 20)[0] == 0 and mon.wilson(20, 20)[1] == 1 and mon.wilson(0, 0) == (0.0, 1.0)
    # PSI: the same distribution is 0; all of the target in the two outer deciles, by hand (half a count per bin)
    x = np.arange(100.0)
    assert mon.psi(x, x) == pytest.approx(0, abs=1e-12)
    target = np.r_[np.zeros(50), np.full(50, 99.0)]
    ref_share = np.full(10, 10.5 / 105)
    tgt_share = np.r_[50.5, [0.5] * 8, 50.5] / 105
    assert mon.psi(x, target) == pytest.approx(float(((tgt_share - ref_share) * np.log(tgt_share / ref_share)).sum()))
    assert mon.psi(x, target) > 1  # far above the 0.25 that the usual rule of thumb calls a shift
    # CBPE: labels drawn from perfectly calibrated probabilities give back the true sensitivity and specificity
    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 0.6, 20000)
    y = rng.random(20000) < p
    called = p > 0.6
    sens, spec = mon.cbpe(p, called)
    assert float(sens) == pytest.approx((called & y).sum() / y.sum(), abs=0.01)
    assert float(spec) == pytest.approx((~called & ~y).sum() / (~y).sum(), abs=0.01)
    # rows of windows at once: the same figures per row
    both = mon.cbpe(np.stack([p, p]), np.stack([called, called]))
    assert np.allclose(both[0], float(sens)) and np.allclose(both[1], float(spec))


def test_thresholds_of_correlated_statistics_are_looser_than_bonferroni_and_a_constant_one_never_alerts():
    rng = np.random.default_rng(0)
    a = rng.normal(size=4000)
    null = np.stack([a, a + 1e-3 * rng.normal(size=4000), np.zeros(4000)], 1)  # two that move together, a constant
    values, level, achieved = mon.thresholds(null, 0.05)
    assert 0.945 <= level <= 0.96 and achieved == pytest.approx(0.05, abs=0.002)  # not 1 - 0.05 / 3
    assert values[2] == 0 and not (null[:, 2] > values[2]).any()
    indep = rng.normal(size=(4000, 3))
    _, level, achieved = mon.thresholds(indep, 0.05)
    assert level == pytest.approx(0.95 ** (1 / 3), abs=0.004) and achieved == pytest.approx(0.05, abs=0.002)


def test_windows_keep_a_partial_last_window_of_half_or_more():
    assert mon.windows(250, 100) == [slice(0, 100), slice(100, 200), slice(200, 250)]
    assert mon.windows(249, 100) == [slice(0, 100), slice(100, 200)]
    assert mon.windows(40, 100) == []

