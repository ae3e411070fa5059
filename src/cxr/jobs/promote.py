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
from dataclasses import dataclass, replace
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
ALIAS = tracking.CHAMPION


def last_run_variants(comparison: Path) -> list[str]:
    """The variants and ensembles of the last pipeline run, as its compare stage listed them: after a profile
    (`make quick`) these are the profile's, not params.yaml's `variants`."""
    board = comparison / "leaderboard.json"
    if not board.exists():
        raise CxrError(f"{board} is missing: no pipeline run to promote from; run {run_pipeline()} first")
    return [row["variant"] for row in json.loads(board.read_text())]


def candidate(p: Params, reports: Path, comparison: Path) -> dict[str, Any]:
    """The variant of the last run with the best `promote.metric` on validation (never test)."""
    variant, ev = best_on_val(last_run_variants(comparison), reports, p.promote.metric)
    return {"variant": variant, "val": ev["val"][p.promote.metric], **ev["mlflow"]}


@dataclass(frozen=True)
class Seen:
    """What a model trained and validated on: the images' sha256s and their patients' ids; `validated`: the
    sha256s of its validation images alone."""

    images: frozenset[str]
    patients: frozenset[str]
    validated: frozenset[str] = frozenset()


def seen_images(uri: str) -> Seen:
    """The images and patients the registered model at `uri` trained and validated on, from the list logged with
    it (image_hashes.csv: split, sha256, name and patient_id; a list of an older version has no patient column:
    the id its file name gives). The one reader of that list: promotion and `cxr retrain`'s shift report."""
    try:
        path = logged_file(uri, HASHES)
    except (MlflowException, OSError) as e:
        raise CxrError(f"{uri} has no list of the images it saw ({HASHES}): it cannot be scored fairly; retrain it "
                       f"with this version of the project ({tracking.store_and_error(e)})") from e
    rows = read_csv(path)
    patients = frozenset(r["patient_id"] if "patient_id" in r else patient_id(r["name"]) for r in rows) - {""}
    return Seen(frozenset(r["sha256"] for r in rows), patients,
                frozenset(r["sha256"] for r in rows if r.get("split") == "val"))


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


def unseen_test_images(p: Params, test: Split, seen: dict[str, Seen]) -> tuple[torch.Tensor, dict[str, Any]]:
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
    """'12 images of 5 patients seen by the candidate, ...': what `unseen_test_images` removed for each model."""
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


@dataclass(frozen=True)
class Contender:
    """A model promotion compares: its registry version and variant, its probabilities on the test split at its
    threshold (None: it cannot be scored there, `why_not` says why) and what it trained and validated on."""

    version: str
    variant: str
    probs: torch.Tensor | None = None
    threshold: float = 0.5
    seen: Seen = Seen(frozenset(), frozenset())
    why_not: str = ""


@dataclass(frozen=True)
class Decision:
    """What promotion decided: "promoted", "kept" or "stopped" (a shift held a comparison back), why, the
    candidate's test score, the champion before (version, variant, test score; None where none was compared),
    the paired difference (None without a comparison) and the test images' counts (unseen_test_images)."""

    decision: str
    reason: str
    candidate_test: float
    previous_champion: dict[str, Any] | None
    difference: dict[str, Any] | None
    test_images: dict[str, Any]

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def decide(p: Params, test: Split, class_names: list[str], cand: Contender, champ: Contender | None,
           shift: dict[str, Any] | None = None) -> Decision:
    """The candidate against the champion (None: there is none yet) on the test images of patients neither
    trained or validated on: promoted only when the 95% interval of the paired difference lies above
    promote.min_delta; held back where `shift` (`cxr retrain`'s report) found a shift and retrain.on_shift is stop.
    A CxrError where nothing can be decided: too few unseen test images, or a score undefined on them."""
    seen = {"candidate": cand.seen}
    if champ is not None and champ.probs is not None and champ.version != cand.version:
        seen[ALIAS] = champ.seen  # compared: the patients it saw are no test of it
    keep, images = unseen_test_images(p, test, seen)  # every score below is on these images only
    key, labels = p.promote.metric, torch.from_numpy(test.labels)[keep]
    assert cand.probs is not None, "a candidate that cannot be scored is refused before any decision"
    score = metric(key, cand.probs[keep], labels, class_names, cand.threshold)
    if score is None:
        raise CxrError(f"the test split has one class, so {key} is undefined; set promote.metric: recall")
    on, whose, gone = scored_on(images)
    alone = f"test {key} {score:.4f} on {on} {whose} it neither trained nor validated on{gone}"
    before: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    if champ is None:
        promoted, reason = True, f"no {ALIAS} yet; {alone}"
    elif champ.version == cand.version:
        promoted, reason = False, f"the candidate is already the {ALIAS} (version {champ.version})"
    elif champ.probs is None:
        before = {"version": champ.version, "variant": champ.variant, "test": None}
        promoted, reason = True, (f"the {ALIAS} (version {champ.version}) cannot be scored on this test data: "
                                  f"{champ.why_not}; {alone}")
    else:
        before = {"version": champ.version, "variant": champ.variant,
                  "test": metric(key, champ.probs[keep], labels, class_names, champ.threshold)}
        promoted, stats = paired_difference(p, test, keep, cand, champ)
        reason = (f"test {key} on {on} {whose} neither model trained or validated on{gone}: {score:.4f} vs "
                  f"{before['test']:.4f} (version {champ.version}): {stats['difference']:+.4f}, 95% interval "
                  f"[{stats['ci95_low']:+.4f}, {stats['ci95_high']:+.4f}] ({stats['resamples']} paired bootstrap "
                  f"resamples by {stats['unit']}), {'above' if promoted else 'not above'} min_delta "
                  f"{p.promote.min_delta}")
    decision, reason = final_decision(p, shift if before is not None else None, promoted, reason)
    return Decision(decision, reason, score, before, stats, images)


def scored_on(images: dict[str, Any]) -> tuple[str, str, str]:
    """The words for the images a decision scores (unseen_test_images' counts): 'the 80 of 120 test images (40 of
    60 patients)', whose they are, and what was removed ('' where nothing was)."""
    on = f"the {images['used']} of {images['total']} test images" + (
        f" ({images['patients_used']} of {images['patients_total']} patients)" if images["patients_total"] else "")
    whose = "whose patients" if images["patients_total"] else "that"  # images without patient ids: themselves
    gone = f" (removed: {removed_text(images)})" if images["used"] < images["total"] else ""
    return on, whose, gone


def paired_difference(p: Params, test: Split, keep: torch.Tensor, cand: Contender,
                      champ: Contender) -> tuple[bool, dict[str, Any]]:
    """Whether the candidate beats the champion on the `keep` test images, and the paired difference: promote
    only if the 95% interval of candidate - champion lies above min_delta, from the bootstrap of every interval
    (the same resampled patients for both models): a difference within the test set's noise moves nothing."""
    assert cand.probs is not None and champ.probs is not None, "both models are scored before they are compared"
    labels = torch.from_numpy(test.labels)[keep]
    design = bootstrap.design(labels, [test.meta[i] for i in keep.tolist()], p.split.series)
    stats = bootstrap.paired(p.promote.metric, (cand.probs[keep], cand.threshold),
                             (champ.probs[keep], champ.threshold), labels,
                             bootstrap.resample_counts(design, bootstrap.RESAMPLES, p.seed))
    if stats["ci95"] is None:
        raise CxrError(f"test {p.promote.metric} is undefined in some bootstrap resamples of the "
                       f"{len(labels)} compared test images, so no interval decides; set promote.metric: accuracy")
    stats |= {"ci95_low": stats["ci95"][0], "ci95_high": stats["ci95"][1], "unit": design.unit}
    return stats["ci95_low"] > p.promote.min_delta, stats


def final_decision(p: Params, shift: dict[str, Any] | None, promoted: bool, reason: str) -> tuple[str, str]:
    """The decision and why: "promoted" or "kept" as the comparison says, or "stopped" where `shift` found a
    shift and retrain.on_shift is stop (the champion stays; the reason says what the comparison alone did)."""
    if not (shift and any(shift["shifted"].values()) and p.retrain.on_shift == "stop"):
        return ("promoted" if promoted else "kept"), reason
    kinds = " and ".join(k for k, v in shift["shifted"].items() if v)
    return "stopped", (f"retrain.on_shift is stop and the images the {ALIAS} never saw are shifted in {kinds} from "
                       f"those it was validated on; the comparison alone would have "
                       f"{'promoted the candidate' if promoted else 'kept the champion'}: {reason}")


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
    """Register the candidate, `decide` on the test images of patients neither model saw, move the alias if it
    wins; write the decision to `out` and as tags. `shift`: `cxr retrain`'s shift report (verdict, shifted): with
    retrain.on_shift stop, a shift holds the decision back (decision "stopped": the champion stays). `pinned`:
    the champion as the caller resolved it (`cxr retrain`, before its shift report); else resolved here, once."""
    tracking.setup(p.mlflow.experiment)
    client, name = MlflowClient(), p.mlflow.registered_model
    champ = (pinned or pin(p)).champion
    cand = candidate(p, reports, comparison)
    cand["version"] = _register(client, name, cand)
    ruling = decide(p, *decision_inputs(p, client, data, cand, champ), shift)
    cand["test"] = ruling.candidate_test
    now = champion(client, name)
    if (now and now.version) != (champ and champ.version):  # another promotion landed while this one compared
        raise CxrError(f"{name}@{ALIAS} moved from version {champ.version if champ else 'none'} to "
                       f"{now.version if now else 'none'} during this promotion, which compared the candidate with "
                       "the former; nothing was promoted or recorded: run `cxr promote` again")
    if ruling.promoted:
        client.set_registered_model_alias(name, ALIAS, cand["version"])
    record = {"decision": ruling.decision, "reason": ruling.reason, "registered_model": name,
              "metric": p.promote.metric, "min_delta": p.promote.min_delta, "test_images": ruling.test_images,
              "candidate": cand, "previous_champion": ruling.previous_champion, "difference": ruling.difference,
              "champion_version": cand["version"] if ruling.promoted else champ.version, "shift": shift,
              "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if ruling.previous_champion is not None or champ is None:  # a champion re-selected keeps its promotion's tags
        for k, value in promotion_tags(p, cand, ruling, shift).items():
            client.set_model_version_tag(name, cand["version"], k, value)
            client.set_tag(cand["run_id"], k, value)
    with atomic_path(out) as tmp:
        write_json(tmp, record)
    log.info("%s %s version %s (%s): %s. In the MLflow UI: %s", ruling.decision, name, cand["version"],
             cand["variant"], ruling.reason, version_link(name, cand["version"]))
    return record


def decision_inputs(p: Params, client: MlflowClient, data: Path, cand: dict[str, Any],
               champ: Any | None) -> tuple[Split, list[str], Contender, Contender | None]:
    """What `decide` reads: the test split, its classes, and the candidate and the champion (its ModelVersion, or
    None), each scored on that split and with its seen list, from its registry version, never the alias. The
    registered model is described by the candidate's labels."""
    name = p.mlflow.registered_model
    uri = tracking.model_uri(name, cand["version"])
    probs, card, why_not, order = test_probs(uri, data)
    if probs is None or card is None:
        raise CxrError(f"cannot score the candidate {cand['variant']}: {why_not}")
    describe_model(client, name, card.classes, p)
    test, class_names = load_split(data / str(card.image_size), "test"), list(card.classes)
    mine = Contender(cand["version"], cand["variant"], probs, card.threshold, seen_images(uri))
    if champ is None:
        return test, class_names, mine, None
    if champ.version == cand["version"]:  # nothing to compare: the decision says so
        return test, class_names, mine, Contender(champ.version, champ.tags.get("variant", ""))
    champ_uri = tracking.model_uri(name, champ.version)
    their_probs, their_card, why_not, their_order = test_probs(champ_uri, data)
    theirs = Contender(champ.version, champ.tags.get("variant", ""), why_not=why_not)
    if their_probs is None or their_card is None:
        return test, class_names, mine, theirs
    if their_order != order:
        raise CxrError(f"the candidate's test images ({data}/{card.image_size}) and the {ALIAS}'s "
                       f"({data}/{their_card.image_size}) are not the same images in the same order; nothing was "
                       "promoted: run `dvc repro` so that every image size is split from one selection")
    return test, class_names, mine, replace(theirs, probs=their_probs, threshold=their_card.threshold,
                                            seen=seen_images(champ_uri))


def promotion_tags(p: Params, cand: dict[str, Any], ruling: Decision, shift: dict[str, Any] | None) -> dict[str, str]:
    """The decision as tags of the candidate's model version and run."""
    key, images = p.promote.metric, ruling.test_images
    tags = {"promotion.decision": ruling.decision, "promotion.reason": ruling.reason,
            f"val_{key}": f"{cand['val']:.4f}", f"test_{key}": f"{cand['test']:.4f}",
            "promotion.test_images": f"{images['used']} of {images['total']}",
            "promotion.test_patients": f"{images['patients_used']} of {images['patients_total']}",
            "promotion.removed": removed_text(images) or "none"}
    if shift:
        tags |= tracking.shift_tag(shift["verdict"])
    if ruling.difference:
        tags["promotion.ci95"] = f"[{ruling.difference['ci95_low']:+.4f}, {ruling.difference['ci95_high']:+.4f}]"
    return tags


def version_link(name: str, version: str) -> str:
    """The registered model version's page in the MLflow UI, as a whole address to print."""
    return tracking.ui_link(f"models/{urllib.parse.quote(name, safe='')}/versions/{version}", tracking.ui_base())
