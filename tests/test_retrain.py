"""`cxr retrain` end to end, as the scheduled workflow runs it, on real images: a first run promotes, a
candidate within the test set's noise keeps the champion, a clearly better one promotes; then `cxr predict`
with the champion gives what its evaluation gave."""

import csv
import io
import json
import re
import shutil
import sys

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import make_imagefolder, make_project, sh, tracking_at
from cxr.__main__ import main as cxr_main
from cxr.data.gray import decode
from cxr.inference import HASHES, load_logged, logged_file
from cxr.io import read_csv
from cxr.serving import read
from cxr.wording import score_text

MIN_DELTA = 0.005


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = make_imagefolder(tmp_path_factory.mktemp("src"), per_class=60)
    return folder, make_project(tmp_path_factory.mktemp("retrain") / "repo", {},
                        data={"source": "imagefolder", "path": str(folder)},
                        gray={"image_size": 64, "extra_sizes": [224]},
                        promote={"min_delta": MIN_DELTA, "min_test_images": 100, "min_test_patients": 50})


def retrain(repo, variant: dict, *args: str, on_shift: str = "warn", ok: bool = True) -> tuple[dict, str, str]:
    """`cxr retrain` of the variant `cand`: the promotion's record, the summary file so far and the output."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["cand"], params["variants"] = variant, ["cand"]
    params["retrain"]["on_shift"] = on_shift
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(repo, "cxr", "retrain", "--summary", "summary.md", *args, ok=ok)
    return json.loads((repo / "promotion.json").read_text()), (repo / "summary.md").read_text(), out


def champion_seen(repo) -> set[str]:
    """The sha256s of the images the champion trained and validated on (its image_hashes.csv)."""
    with tracking_at(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"):
        return {r["sha256"] for r in read_csv(logged_file("models:/chest-xray-classifier@champion", HASHES))}


def card_of(repo):
    with tracking_at(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"):
        return load_logged("models:/chest-xray-classifier@champion")[1]


def test_retrain_promotes_first_keeps_the_champion_on_noise_promotes_a_clearly_better_one(project, monkeypatch,
                                                                                          capsys, tmp_path):
    folder, repo = project
    first, text, _ = retrain(repo, {"arch": "tinyvgg", "epochs": 1, "lr": 1.0e-4})
    # Kaggle has byte-identical copies, and patients, across its train and test folders
    n = first["test_images"]
    assert first["decision"] == "promoted" and first["reason"].startswith("no champion yet; test auroc ")
    assert f" on the {n['used']} of {n['total']} test images ({n['patients_used']} of {n['patients_total']} " \
        "patients) whose patients it neither trained nor validated on" in first["reason"]
    assert n["used"] == n["total"] - n["removed"]["candidate"]["images"] and list(n["removed"]) == ["candidate"]
    assert first["champion_version"] == first["candidate"]["version"] and first["previous_champion"] is None
    assert "## Retraining: promoted a new champion" in text and "| cand |" in text
    assert first["shift"] is None and "### Shift" not in text  # no champion: nothing to compare with

    # The same recipe, a hair's breadth apart: a difference within the test set's noise moves nothing.
    noise, text, _ = retrain(repo, {"arch": "tinyvgg", "epochs": 1, "lr": 1.05e-4})
    assert noise["decision"] == "kept" and noise["champion_version"] == first["candidate"]["version"]
    before = noise["previous_champion"]
    assert before["version"] == first["candidate"]["version"]
    assert before["test"] == pytest.approx(first["candidate"]["test"], abs=1e-6)  # same test data, same score
    diff = noise["difference"]
    assert diff["difference"] == pytest.approx(noise["candidate"]["test"] - before["test"])
    assert diff["ci95_low"] <= diff["difference"] <= diff["ci95_high"] and diff["ci95_low"] <= MIN_DELTA
    assert "95% interval" in noise["reason"] and "not above min_delta" in noise["reason"]
    assert f"[{diff['ci95_low']:+.4f}, {diff['ci95_high']:+.4f}]" in text  # the summary shows the interval
    assert text.count("## Retraining:") == 2 and "kept the champion" in text
    # The images the champion never saw (here the test split) against those it trained or validated on (fewer
    # than 50 validation images here), in its features too.
    report = noise["shift"]
    seen = champion_seen(repo)
    metas = [m for s in ("train", "val", "test") for m in read_csv(repo / "data" / "split" / "64" / f"{s}_meta.csv")]
    assert report["reference"]["images"] == sum(m["sha256"] in seen for m in metas) >= len(seen)
    assert report["reference"]["name"] == "trained or validated on" and "memorisation alone" in report["verdict"]
    assert report["model"]["variant"] == first["candidate"]["variant"]
    assert report["target"]["images"] == n["used"]  # the test images of patients it never saw
    assert f"### Shift: the images the champion never saw against those it was validated on\n\n{report['verdict']}." \
        in text
    features = report["model"]["domain"]  # the shift summary's words: the leaderboard's (cxr.wording.shift_summary)
    auroc = f"AUROC {score_text(features['auroc'], features['ci95'])}"
    assert auroc in report["verdict"] if features["different"] else f"on cand's features, {auroc}; " in text
    assert text.count(auroc) == 1  # quoted once: by the verdict where it tells the sets apart, else beside it
    assert (f"{report['reference']['images']} images (trained or validated on) against {n['used']} (never seen). "
            "Report and figure: shift/shift.json, shift/shift.png") in text
    assert json.loads((repo / "shift" / "shift.json").read_text())["verdict"] == report["verdict"]

    # New images 40 grey levels brighter (a new scanner, say: here the test split, in a copy of the prepared
    # data): with retrain.on_shift stop, nothing is promoted, the job fails with one line, the summary says why.
    brighter = tmp_path / "split"
    shutil.copytree(repo / "data" / "split", brighter)
    for f in brighter.glob("*/test_images.npy"):
        np.save(f, np.clip(np.load(f).astype(int) + 40, 0, 255).astype(np.uint8))
    better_recipe = {"arch": "mlp", "epochs": 3, "lr": 1.0e-3}
    stopped, text, out = retrain(repo, better_recipe, "--data", str(brighter), on_shift="stop", ok=False)
    assert stopped["decision"] == "stopped" and stopped["champion_version"] == first["candidate"]["version"]
    assert stopped["reason"].startswith("retrain.on_shift is stop and the images the champion never saw are shifted "
                                        "in images")
    assert "the comparison alone would have" in stopped["reason"] and stopped["shift"]["images"]["mean"]["shift"]
    assert "## Retraining: stopped before promotion (retrain.on_shift: stop)" in text
    assert "retrain.on_shift is stop: nothing was promoted" in text
    assert out.count("error: promotion stopped (retrain.on_shift: stop): shift in images: mean (+") == 1
    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    assert client.get_model_version_by_alias("chest-xray-classifier", "champion").version == \
        first["candidate"]["version"]
    logged = {a.path for a in client.list_artifacts(stopped["candidate"]["run_id"], "shift")}
    assert logged == {"shift/shift.json", "shift/shift.png"}

    better, text, _ = retrain(repo, better_recipe)  # warn, the data as prepared: the comparison decides
    assert better["decision"] == "promoted", better["reason"]
    assert better["difference"]["ci95_low"] > MIN_DELTA
    assert better["previous_champion"]["version"] == first["candidate"]["version"]

    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    monkeypatch.chdir(repo)  # `cxr` in this process from here on: no more start-ups of torch and MLflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def cxr(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["cxr", *args])
        with tracking_at(uri):
            cxr_main()
        return capsys.readouterr().out

    cxr("promote")  # nothing retrained: the champion is the candidate again
    assert json.loads((repo / "promotion.json").read_text())["reason"] == \
        f"the candidate is already the champion (version {better['candidate']['version']})"

    name = better["registered_model"]
    assert client.get_model_version_by_alias(name, "champion").version == better["candidate"]["version"]
    for record in (first, noise, better):
        version = client.get_model_version(name, record["candidate"]["version"])
        assert version.tags["promotion.decision"] == record["decision"]  # the re-selection left them alone
        assert version.tags["promotion.reason"] == record["reason"]
        run = client.get_run(record["candidate"]["run_id"])
        assert run.data.tags["promotion.decision"] == record["decision"]

    # `cxr predict` on 20 test images gives the champion's P(PNEUMONIA) in its evaluation's predictions.csv,
    # and its decision. The 64 px arrays were decoded at the JPEG scale of 224 px, made in the same pass:
    # predict must do the same, or 35-44% of the pixels differ.
    rows = list(csv.DictReader((repo / "reports" / "cand" / "predictions.csv").open()))[:20]
    paths = [folder / r["name"] for r in rows]  # names are relative to the source folder
    out = sh(repo, "cxr", "predict", "--json", *map(str, paths))
    got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    # binary: one probability column
    assert [list(g) for g in got] == [["image", "p_pneumonia", "decision", "threshold", "class"]] * len(got)
    assert [g["image"] for g in got] == list(map(str, paths))
    for g, r in zip(got, rows, strict=True):
        assert g["p_pneumonia"] == pytest.approx(float(r["p_pneumonia"]), abs=1e-6) and g["decision"] == r["predicted"]
    stored = np.load(repo / "data" / "split" / "64" / "test_images.npy")[:20]
    assert np.array_equal(np.stack([read(path, card_of(repo)).gray for path in paths]), stored)
    assert not np.array_equal(np.stack([decode((str(x), str(x)), [64], "stretch")[0][0] for x in paths]), stored)

    # Folders (recursively) and quoted globs; a header naming the model and its threshold; CSV.
    table = cxr("predict", str(paths[0].parent), str(folder / "test" / "*" / paths[1].name)).splitlines()
    assert table[0].startswith("models:/chest-xray-classifier@champion: cand (") and "threshold" in table[0]
    assert table[1].split() == ["image", "P(pneumonia)", "decision"]
    in_folder = sorted(x for x in paths[0].parent.iterdir())
    n = len(in_folder) + 1
    lines, notes = table[2:2 + n], table[2 + n:]
    assert [line.split()[0] for line in lines] == [*map(str, in_folder), str(paths[1])]
    by_path = {str(folder / r["name"]): r for r in rows}
    for line in lines:
        path, prob, decision = line.split()
        if path in by_path:
            assert float(prob) == pytest.approx(float(by_path[path]["p_pneumonia"]), abs=1e-4)
            assert decision == by_path[path]["predicted"]
    # Under the table, the counts at the threshold and the champion's operating point on validation and test.
    calls = [line.split()[2] for line in lines]
    assert notes[0] == (f"{n} images: {calls.count('NORMAL')} called NORMAL, {calls.count('PNEUMONIA')} called "
                        f"PNEUMONIA (P(pneumonia) > {card_of(repo).threshold:.4f}, chosen on validation).")
    m = client.get_run(better["candidate"]["run_id"]).data.metrics
    assert " ".join(line.strip() for line in notes[1:]) == (
        f"This model (cand, version {better['candidate']['version']}) on validation: sensitivity "
        f"{m['val_best/recall']:.3f}, specificity {m['val_best/specificity']:.3f}; on test: sensitivity "
        f"{m['test/recall']:.3f}, specificity {m['test/specificity']:.3f}, so it calls about "
        f"{1 - m['test/specificity']:.0%} of normal test images pneumonia.")
    as_csv = list(csv.DictReader(io.StringIO(cxr("predict", "--csv", *map(str, paths[:3])))))
    assert [r["image"] for r in as_csv] == list(map(str, paths[:3]))
    assert list(as_csv[0]) == ["image", "p_pneumonia", "decision", "threshold", "class"]
    assert [float(r["p_pneumonia"]) for r in as_csv] == pytest.approx([float(r["p_pneumonia"]) for r in rows[:3]],
                                                                       abs=1e-6)

    bad = repo / "corrupt.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = sh(repo, "cxr", "predict", str(paths[0]), str(bad), "missing.png", ok=False)
    assert str(paths[0]) in out and "missing.png: no such file" in out and "corrupt.jpeg: corrupt or truncated" in out
    assert out.count("error:") == 1  # one line for all of them


def metas(repo, *splits: str) -> list[dict[str, str]]:
    return [m for s in splits for m in csv.DictReader((repo / "data/split/64" / f"{s}_meta.csv").open())]


def test_promotion_scores_both_models_only_on_test_patients_neither_saw(project):
    """The champion above trained with split.pool false. With pool true the test split is carved from every
    image by patient, and the champion trained or validated on many of those patients, on some through other
    images than the test ones: promotion first stops with one line (too few unseen patients), then, allowed
    fewer, scores both models on the images of patients neither saw, with the counts of the split's meta files."""
    from sklearn.metrics import roc_auc_score

    folder, repo = project
    store = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    old = metas(repo, "train", "val")  # what the champion saw
    champion = MlflowClient(store).get_model_version_by_alias("chest-xray-classifier", "champion").version
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["pool"] = True
    # a seed whose test split holds two of the three patients this folder has in both Kaggle's train and test
    # folders (person101, person102): the champion trained on their train images, not on their test images
    params["seed"] = 2
    params["models"]["cand"], params["variants"] = {"arch": "mlp", "epochs": 3, "lr": 1.0e-3}, ["cand"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    kept = (repo / "promotion.json").read_text()
    out = sh(repo, "cxr", "retrain", ok=False)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "promotion stopped: only" in errors[0] and "min_test_images (100)" in errors[0]
    assert "patients seen by the champion" in errors[0] and "retrain it on this split" in errors[0]
    assert (repo / "promotion.json").read_text() == kept  # no record of a decision that was not made
    assert MlflowClient(store).get_model_version_by_alias("chest-xray-classifier", "champion").version == champion

    params["promote"] |= {"min_test_images": 10, "min_test_patients": 5}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "cxr", "retrain", "--summary", "summary.md")
    record = json.loads((repo / "promotion.json").read_text())
    test, new = metas(repo, "test"), metas(repo, "train", "val")
    saw = {who: ({m["sha256"] for m in ms}, {m["patient_id"] for m in ms} - {""}) for who, ms in
           (("champion", old), ("candidate", new))}

    def seen_by(m, who):
        return m["sha256"] in saw[who][0] or m["patient_id"] in saw[who][1]

    unseen = [i for i, m in enumerate(test) if not seen_by(m, "champion") and not seen_by(m, "candidate")]
    n = record["test_images"]
    assert n["total"] == len(test) and n["used"] == len(unseen) and 10 <= n["used"] <= len(test) / 2
    assert n["patients_total"] == len({m["patient_id"] for m in test})
    assert n["patients_used"] == len({test[i]["patient_id"] for i in unseen}) >= 5
    by_champion = [m for m in test if seen_by(m, "champion")]
    assert n["removed"]["champion"] == {"images": len(by_champion), "patients": len({m["patient_id"] for m in
                                                                                      by_champion}),
                                        "same_image": sum(m["sha256"] in saw["champion"][0] for m in test)}
    # patients the champion saw through other images than these: removed too, where an image check keeps them
    assert n["removed"]["champion"]["same_image"] < n["removed"]["champion"]["images"] >= len(test) / 2
    assert n["removed"]["candidate"]["images"] == 0  # pool true carves test by patient: the candidate saw none
    assert (f"on the {len(unseen)} of {len(test)} test images ({n['patients_used']} of {n['patients_total']} "
            "patients) whose patients neither model trained or validated on (removed: "
            f"{n['removed']['champion']['images']} images of {n['removed']['champion']['patients']} patients seen by "
            "the champion)") in record["reason"]
    assert record["difference"]["unit"] == "patient" and "paired bootstrap resamples by patient" in record["reason"]
    # The candidate's recorded test AUROC is over those images only, as scikit-learn counts it.
    rows = list(csv.DictReader((repo / "reports/cand/predictions.csv").open()))
    labels = [int(rows[i]["label"] == "PNEUMONIA") for i in unseen]
    assert record["candidate"]["test"] == pytest.approx(roc_auc_score(labels, [float(rows[i]["p_pneumonia"])
                                                                               for i in unseen]), abs=1e-6)
    summary = (repo / "summary.md").read_text()
    assert f"on the {n['used']} of {n['total']} test images ({n['patients_used']} of {n['patients_total']} " \
           "patients)" in summary and "by patient)" in summary
    version = MlflowClient(store).get_model_version("chest-xray-classifier", record["candidate"]["version"])
    assert version.tags["promotion.test_patients"] == f"{n['patients_used']} of {n['patients_total']}"
    assert version.tags["promotion.removed"].startswith(f"{n['removed']['champion']['images']} images of ")


def test_the_champion_is_pinned_once_though_the_alias_moves_during_promotion(project, monkeypatch):
    """A teammate's promotion moves @champion between the resolution and the scoring (a hook in the scoring):
    promotion reads the weights and the seen list of the version it resolved, by number, never the alias again;
    and as it compared the candidate with a champion that is no longer the champion, it moves nothing and records
    nothing, in one line. Without the move it records the version it compared."""
    from cxr import params as P
    from cxr.errors import CxrError
    from cxr.jobs import promote

    _, repo = project
    store = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    client, name = MlflowClient(store), "chest-xray-classifier"
    client.set_registered_model_alias(name, "champion", "1")  # the first champion, pool false: another candidate
    read: list[str] = []
    move = [True]
    real_probs, real_seen = promote.test_probs, promote.seen_images

    def moving(uri, data):
        read.append(uri)
        if uri == f"models:/{name}/1" and move[0]:  # the champion is being scored: version 2 is promoted meanwhile
            client.set_registered_model_alias(name, "champion", "2")
        return real_probs(uri, data)

    def seen(uri):
        read.append(uri)
        return real_seen(uri)

    monkeypatch.setattr(promote, "test_probs", moving)
    monkeypatch.setattr(promote, "seen_images", seen)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = repo / "pinned.json"
    with tracking_at(store):
        with pytest.raises(CxrError, match=f"^{name}@champion moved from version 1 to 2 during this promotion"):
            promote.promote(P.load(), repo / "reports", repo / "data" / "split", out)
        assert str(client.get_model_version_by_alias(name, "champion").version) == "2" and not out.exists()
        # the champion's and the candidate's versions, by number only, never the alias
        assert f"models:/{name}/1" in read and len(set(read)) == 2
        assert all(re.fullmatch(rf"models:/{name}/\d+", u) for u in read), read
        move[0], read[:] = False, []
        client.set_registered_model_alias(name, "champion", "1")
        record = promote.promote(P.load(), repo / "reports", repo / "data" / "split", out)
    version = record["candidate"]["version"]
    assert sorted(set(read)) == sorted({f"models:/{name}/1", f"models:/{name}/{version}"})
    assert str(record["previous_champion"]["version"]) == "1" and "(version 1)" in record["reason"]
    assert str(record["champion_version"]) == str(version if record["decision"] == "promoted" else 1)
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(record["champion_version"])
    assert record["test_images"]["removed"]["champion"]["images"] >= len(metas(repo, "test")) / 2  # version 1's list
