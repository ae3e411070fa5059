"""Promotion: register the variant that is best on validation, and move the `champion` alias to it only if
it beats the current champion by `promote.min_delta` on the test images of patients that neither of them trained
or validated on (each logged model lists the images it saw, and their patients). The champion is resolved once,
to a version number, and everything of it (weights, seen list, record) is read from that version."""

from __future__ import annotations

import datetime
import json
import logging
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cxr import bootstrap, tracking
from cxr.data.gray import patient_id
from cxr.data.store import Split, classes, load_split, preprocessing
from cxr.errors import CxrError, run_pipeline
from cxr.inference import HASHES, CardError, ModelCard, load_logged, logged_file
from cxr.io import atomic_path, best_on_val, read_csv, write_json
from cxr.metrics import metric
from cxr.params import Params, metric_label

log = logging.getLogger(__name__)
ALIAS = "champion"


def ran(comparison: Path) -> list[str]:
    """The variants and ensembles of the last pipeline run, as its compare stage listed them: after a profile
    (`make quick`) these are the profile's, not params.yaml's `variants`."""
    board = comparison / "leaderboard.json"
    if not board.exists():
        raise CxrError(f"{board} is missing: no pipeline run to promote from; run {run_pipeline()} first")
    return [row["variant"] for row in json.loads(board.read_text())]


def candidate(p: Params, reports: Path, comparison: Path) -> dict[str, Any]:
    """The variant of the last run with the best `promote.metric` on validation (never test)."""
    variant, ev = best_on_val(ran(comparison), reports, p.promote.metric)
    return {"variant": variant, "val": ev["val"][p.promote.metric], **ev["mlflow"]}


@dataclass(frozen=True)
class Seen:
    """What a model trained and validated on: the images' sha256s and their patients' ids."""

    images: frozenset[str]
    patients: frozenset[str]


def seen_rows(uri: str) -> list[dict[str, str]]:
    """The images the registered model at `uri` trained and validated on, as logged with it: split, sha256, name
    and patient_id (a list of an older version has no patient column: the id its file name gives)."""
    try:
        path = logged_file(uri, HASHES)
    except (MlflowException, OSError) as e:
        raise CxrError(f"{uri} has no list of the images it saw ({HASHES}): it cannot be scored fairly; retrain it "
                       f"with this version of the project ({tracking.store_and_error(e)})") from e
    return [r if "patient_id" in r else r | {"patient_id": patient_id(r["name"])} for r in read_csv(path)]


def seen_images(uri: str) -> Seen:
    """The images and patients the registered model at `uri` trained and validated on."""
    rows = seen_rows(uri)
    return Seen(frozenset(r["sha256"] for r in rows), frozenset(r["patient_id"] for r in rows) - {""})


def test_probs(uri: str, data: Path) -> tuple[torch.Tensor | None, ModelCard | None, str, list[str]]:
    """The model at `uri`'s probabilities on the current test split, its card and the sha256s of the test images
    in the order scored; or None and why it cannot be scored there (another image size, preprocessing or label
    set than the data prepared now)."""
    try:
        model, card = load_logged(uri)
    except CardError as e:  # a model of an older version of the project: it cannot be applied as it was
        return None, None, str(e), []
    if why_not := not_applicable(card, data):
        return None, card, why_not, []
    test = load_split(data / str(card.image_size), "test")
    return card.probs_of(model, test.images), card, "", [m["sha256"] for m in test.meta]


def not_applicable(card: ModelCard, data: Path) -> str:
    """Why a model with this card cannot be applied to the data prepared now, or "" when it can."""
    folder = data / str(card.image_size)
    if not (folder / "test_labels.npy").exists():
        return f"its image size {card.image_size} is not prepared (add it to gray.extra_sizes, re-run)"
    prep = preprocessing(folder)
    if (card.fit, card.draft, card.equalize) != (prep["fit"], prep["draft"], prep.get("equalize", "none")) \
            or list(card.classes) != classes(folder):
        return (f"it was trained on other preprocessing (fit {card.fit}, draft {card.draft}, equalize "
                f"{card.equalize}, {'/'.join(card.classes)})")
    return ""


def unseen(p: Params, test: Split, seen: dict[str, Seen]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The indices of the test images that no model in `seen` saw, nor any image of whose patient it saw, and the
    counts: images and patients in all and used, and those removed for each model. An error when images were
    removed and fewer than promote.min_test_images (or promote.min_test_patients, where the images name their
    patients) are left: a score on patients a model saw is no test score, and on a handful it decides nothing."""
    hashes, patients = [m["sha256"] for m in test.meta], [m.get("patient_id") or "" for m in test.meta]

    def saw(s: Seen, i: int) -> bool:
        return hashes[i] in s.images or patients[i] in s.patients

    keep = [i for i in range(len(hashes)) if not any(saw(s, i) for s in seen.values())]
    named = set(patients) - {""}
    used = {patients[i] or f"image {i}" for i in keep}  # what a resample draws: a patient, or an image without id
    removed = {}
    for name, s in seen.items():
        gone = [i for i in range(len(hashes)) if saw(s, i)]
        removed[name] = {"images": len(gone), "same_image": sum(hashes[i] in s.images for i in gone),
                         "patients": len({patients[i] for i in gone} - {""})}
    counts = {"total": len(hashes), "used": len(keep), "patients_total": len(named), "patients_used": len(used),
              "removed": removed}
    short = [f"promote.min_test_images ({p.promote.min_test_images})"] if len(keep) < p.promote.min_test_images \
        else []
    if named and len(used) < p.promote.min_test_patients:
        short.append(f"promote.min_test_patients ({p.promote.min_test_patients})")
    if len(hashes) > len(keep) and short:
        fix = (f"the {ALIAS} was trained on another split of these patients: retrain it on this split"
               if removed.get(ALIAS, {}).get("images") else
               "the candidate trained on these patients or copies of their images: re-split with split.pool: true, "
               "or set split.drop_duplicates: true")
        of = f" of {len(used)} of {len(named)} patients" if named else ""
        raise CxrError(f"promotion stopped: only {len(keep)} of {len(hashes)} test images{of} are left once those of "
                       f"patients a model trained or validated on are removed ({removed_text(counts)}), below "
                       f"{' and '.join(short)}; {fix}, or set those lower")
    return torch.tensor(keep, dtype=torch.long), counts


def removed_text(counts: dict[str, Any]) -> str:
    """'12 images of 5 patients seen by the candidate, ...': what `unseen` removed for each model."""
    def n(k: int, what: str) -> str:
        return f"{k} {what}" + ("s" if k != 1 else "")

    return ", ".join(f"{n(r['images'], 'image')}" + (f" of {n(r['patients'], 'patient')}" if r["patients"] else "") +
                     f" seen by the {name}" for name, r in counts["removed"].items() if r["images"])


def _register(client: MlflowClient, name: str, cand: dict[str, Any]) -> str:
    """The registry version holding the candidate's model: an existing one, else a new one."""
    try:
        for mv in client.search_model_versions(f"name='{name}'"):
            if mv.source == cand["model_uri"]:  # search results leave model_id empty
                return mv.version
        version = mlflow.register_model(cand["model_uri"], name, tags={"variant": cand["variant"]}).version
        note = client.get_run(cand["run_id"]).data.tags.get(tracking.NOTE)
        if note:  # the version's description in the registry: the run's (what it is, data, scores)
            client.update_model_version(name, version, description=plain(note))
        return version
    except MlflowException as e:
        raise CxrError(f"cannot register {cand['model_uri']} ({cand['variant']}) in {tracking.store_and_error(e)}; "
                       "was the pipeline run against another MLflow store? Re-run `dvc repro` with this "
                       "MLFLOW_TRACKING_URI") from e


def plain(note: str) -> str:
    """A run's markdown description as plain text, for the registry, whose versions table shows a description
    raw (markdown's ** and backticks would read as such): the same words; a link, its text and bare URL."""
    return re.sub(r"\*\*|`", "", re.sub(r"\[([^\]]*)\]\(([^)]*)\)", r"\1 (\2)", note))


def describe_model(client: MlflowClient, name: str, classes: tuple[str, ...] | list[str], p: Params) -> None:
    """The registered model's description in the registry (each version has its run's): what it classifies,
    its labels and how the champion is chosen, in plain text like the versions'. Written when it differs, so
    that a label change shows."""
    labels = ", ".join(f"{i} {c}" for i, c in enumerate(classes))
    text = (f"Chest X-ray pneumonia classification: one frontal chest X-ray (grayscale, resized as the model card "
            f"says) in, the class out; labels {labels}. Each version is one pipeline variant or ensemble, trained by "
            f"dvc repro or a profile (its description: the run's data and scores). The {ALIAS} alias is the "
            f"version cxr predict uses: cxr promote registers the variant best on validation "
            f"{metric_label(p.promote.metric)} and moves the alias only when it beats "
            f"the {ALIAS} on the test images of patients neither model trained or validated on (paired bootstrap by "
            f"patient, 95% interval of the difference above promote.min_delta {p.promote.min_delta}).")
    try:
        if client.get_registered_model(name).description != text:
            client.update_registered_model(name, description=text)
    except MlflowException as e:
        raise CxrError(f"cannot describe {name} in {tracking.store_and_error(e)}") from e


def champion(client: MlflowClient, name: str) -> Any | None:
    """The champion's model version; None only when the registry says the alias does not exist. Any other
    failure (a timeout, a server error, a refused login) stops: taken for "no champion", it would promote."""
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as e:
        # SQL stores and the REST API say INVALID_PARAMETER_VALUE "alias ... not found"; others 404
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST") and "not found" in str(e):
            return None
        raise CxrError(f"cannot read {name}@{ALIAS} from {tracking.store_and_error(e)}; nothing was promoted: "
                       "check the server and your credentials, then run `cxr promote` again") from e


def _decide(p: Params, champ_probs: torch.Tensor, champ_card: ModelCard, cand_probs: torch.Tensor,
            cand_card: ModelCard, labels: torch.Tensor, meta: list[dict[str, Any]]) -> tuple[bool, dict[str, Any]]:
    """Promote only if the 95% interval of candidate - champion lies above min_delta, from the bootstrap of every
    interval (the same resampled patients for both models): a difference within the test set's noise moves
    nothing."""
    design = bootstrap.design(labels, meta, p.split.series)
    stats = bootstrap.paired(p.promote.metric, (cand_probs, cand_card.threshold), (champ_probs, champ_card.threshold),
                             labels, bootstrap.resample_counts(design, bootstrap.RESAMPLES, p.seed))
    if stats["ci95"] is None:
        raise CxrError(f"test {p.promote.metric} is undefined in some bootstrap resamples of the "
                       f"{len(labels)} compared test images, so no interval decides; set promote.metric: accuracy")
    stats |= {"ci95_low": stats["ci95"][0], "ci95_high": stats["ci95"][1], "unit": design.unit}
    return stats["ci95_low"] > p.promote.min_delta, stats


@dataclass(frozen=True)
class Pin:
    """The champion's model version as resolved once at the start (None: there was none): promotion and
    `cxr retrain` read its weights, seen list and shift report from `models:/<name>/<version>`, never from the
    alias again, which a teammate's promotion may move meanwhile."""

    champion: Any | None  # its ModelVersion


def pin(p: Params) -> Pin:
    """The champion now, before anything is registered. A registered model that does not exist yet has no
    champion: asked for its alias, a server with logins answers 403 (no permission on a model nobody owns), not
    "not found", so its existence is searched first (a search lists only what one may read)."""
    tracking.setup(p.mlflow.experiment)
    client, name = MlflowClient(), p.mlflow.registered_model
    try:
        exists = bool(client.search_registered_models(f"name = '{name}'"))
    except MlflowException as e:
        raise CxrError(f"cannot search {name} in {tracking.store_and_error(e)}; nothing was promoted: check the "
                       "server and your credentials, then run `cxr promote` again") from e
    return Pin(champion(client, name) if exists else None)


def promote(p: Params, reports: Path, data: Path, out: Path, comparison: Path = Path("comparison"),
            shift: dict[str, Any] | None = None, pinned: Pin | None = None) -> dict[str, Any]:
    """Register the candidate, decide on the test images of patients neither model saw, move the alias if it
    wins; write the decision to `out` and as tags. `shift`: `cxr retrain`'s shift report (verdict, shifted): with
    retrain.on_shift stop, a shift holds the decision back (decision "stopped": the champion stays). `pinned`:
    the champion as the caller resolved it (`cxr retrain`, before its shift report); else resolved here, once."""
    tracking.setup(p.mlflow.experiment)
    client, name, key = MlflowClient(), p.mlflow.registered_model, p.promote.metric
    champ = (pinned or pin(p)).champion
    cand = candidate(p, reports, comparison)
    cand["version"] = _register(client, name, cand)
    cand_uri = f"models:/{name}/{cand['version']}"
    cand_probs, cand_card, why_not, order = test_probs(cand_uri, data)
    if cand_probs is None or cand_card is None:
        raise CxrError(f"cannot score the candidate {cand['variant']}: {why_not}")
    describe_model(client, name, cand_card.classes, p)
    test = load_split(data / str(cand_card.image_size), "test")
    labels, names = torch.from_numpy(test.labels), list(cand_card.classes)
    seen = {"candidate": seen_images(cand_uri)}
    probs, card, why_not = None, None, ""
    if champ is not None and champ.version != cand["version"]:
        champ_uri = f"models:/{name}/{champ.version}"
        probs, card, why_not, champ_order = test_probs(champ_uri, data)
        if probs is not None:
            if champ_order != order:
                raise CxrError(f"the candidate's test images ({data}/{cand_card.image_size}) and the {ALIAS}'s "
                               f"({data}/{card.image_size if card else ''}) are not the same images in the same "
                               "order; nothing was promoted: run `dvc repro` so that every image size is split "
                               "from one selection")
            seen[ALIAS] = seen_images(champ_uri)
    keep, images = unseen(p, test, seen)  # every score below is on these images only
    cand["test"] = metric(key, cand_probs[keep], labels[keep], names, cand_card.threshold)
    if cand["test"] is None:
        raise CxrError(f"the test split has one class, so {key} is undefined; set promote.metric: recall")
    before: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    on = f"the {len(keep)} of {len(labels)} test images" + (
        f" ({images['patients_used']} of {images['patients_total']} patients)" if images["patients_total"] else "")
    gone = f" (removed: {removed_text(images)})" if images["used"] < images["total"] else ""
    whose = "whose patients" if images["patients_total"] else "that"  # images without patient ids: themselves
    alone = f"test {key} {cand['test']:.4f} on {on} {whose} it neither trained nor validated on{gone}"
    if champ is None:
        promoted, reason = True, f"no {ALIAS} yet; {alone}"
    elif champ.version == cand["version"]:
        promoted, reason = False, f"the candidate is already the {ALIAS} (version {champ.version})"
    elif probs is None or card is None:
        before = {"version": champ.version, "variant": champ.tags.get("variant", ""), "test": None}
        promoted, reason = True, (f"the {ALIAS} (version {champ.version}) cannot be scored on this test data: "
                                  f"{why_not}; {alone}")
    else:
        score = metric(key, probs[keep], labels[keep], names, card.threshold)
        before = {"version": champ.version, "variant": champ.tags.get("variant", ""), "test": score}
        promoted, stats = _decide(p, probs[keep], card, cand_probs[keep], cand_card, labels[keep],
                                  [test.meta[i] for i in keep.tolist()])
        verdict = "above" if promoted else "not above"
        reason = (f"test {key} on {on} {whose} neither model trained or validated on{gone}: "
                  f"{cand['test']:.4f} vs {score:.4f} (version {champ.version}): {stats['difference']:+.4f}, 95% "
                  f"interval [{stats['ci95_low']:+.4f}, {stats['ci95_high']:+.4f}] ({stats['resamples']} paired "
                  f"bootstrap resamples by {stats['unit']}), {verdict} min_delta {p.promote.min_delta}")
    decision = "promoted" if promoted else "kept"
    if before is not None and shift and any(shift["shifted"].values()) and p.retrain.on_shift == "stop":
        kinds = " and ".join(k for k, v in shift["shifted"].items() if v)
        reason = (f"retrain.on_shift is stop and the images the {ALIAS} never saw are shifted in {kinds} from those "
                  f"it was validated on; the comparison alone would have "
                  f"{'promoted the candidate' if promoted else 'kept the champion'}: {reason}")
        promoted, decision = False, "stopped"
    now = champion(client, name)
    if (now and now.version) != (champ and champ.version):  # another promotion landed while this one compared
        raise CxrError(f"{name}@{ALIAS} moved from version {champ.version if champ else 'none'} to "
                       f"{now.version if now else 'none'} during this promotion, which compared the candidate with "
                       "the former; nothing was promoted or recorded: run `cxr promote` again")
    if promoted:
        client.set_registered_model_alias(name, ALIAS, cand["version"])
    record = {"decision": decision, "reason": reason, "registered_model": name, "metric": key,
              "min_delta": p.promote.min_delta, "test_images": images, "candidate": cand,
              "previous_champion": before, "difference": stats,
              "champion_version": cand["version"] if promoted else champ.version, "shift": shift,
              "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    tags = {"promotion.decision": decision, "promotion.reason": reason, f"val_{key}": f"{cand['val']:.4f}",
            f"test_{key}": f"{cand['test']:.4f}", "promotion.test_images": f"{images['used']} of {images['total']}",
            "promotion.test_patients": f"{images['patients_used']} of {images['patients_total']}",
            "promotion.removed": removed_text(images) or "none"}
    if shift:
        tags["shift.verdict"] = shift["verdict"][:5000]  # MLflow's limit on a tag's value
    if stats:
        tags["promotion.ci95"] = f"[{stats['ci95_low']:+.4f}, {stats['ci95_high']:+.4f}]"
    if before is not None or champ is None:  # a champion re-selected keeps the tags of its promotion
        for k, value in tags.items():
            client.set_model_version_tag(name, cand["version"], k, value)
            client.set_tag(cand["run_id"], k, value)
    with atomic_path(out) as tmp:
        write_json(tmp, record)
    log.info("%s %s version %s (%s): %s. In the MLflow UI: %s", decision, name, cand["version"], cand["variant"],
             reason, version_link(name, cand["version"]))
    return record


def version_link(name: str, version: str) -> str:
    """The registered model version's page in the MLflow UI, as a whole address to print."""
    return tracking.ui_link(f"models/{urllib.parse.quote(name, safe='')}/versions/{version}", tracking.ui_base())
