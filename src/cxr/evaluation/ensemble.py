"""The ensemble stage: trained variants' probabilities averaged as one model, with its own MLflow run, then
evaluated exactly as a variant (threshold, TTA, temperature, reports, the logged model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow

from cxr import inference, tracking
from cxr.errors import CxrError
from cxr.evaluation.variant import evaluate_variant
from cxr.inference import ModelCard
from cxr.io import atomic_path
from cxr.models import without_download
from cxr.params import Params

log = logging.getLogger(__name__)
# what members must share: they see one input, and trained on the same images (promotion relies on the lineage)
SAME = ("image_size", "classes", "fit", "draft", "equalize", "source", "train_digest", "val_digest")


def assemble(name: str, members: dict[str, tuple[Any, ModelCard]]) -> tuple[Any, ModelCard]:
    """One model averaging the members' probabilities, and its card (the members' own settings inside)."""
    (first, (_, card)), *rest = members.items()
    for other, (_, c) in rest:
        diff = [k for k in SAME if getattr(c, k) != getattr(card, k)]
        if diff:
            raise CxrError(f"ensembles.{name}: {other} and {first} differ in {', '.join(diff)} "
                           f"({getattr(c, diff[0])!r} vs {getattr(card, diff[0])!r}); an ensemble's members must "
                           "take the same input and have trained on the same images")
    settings = {"members": [{"arch": c.arch, "settings": without_download(c.settings), "mean": c.mean, "std": c.std}
                            for _, c in members.values()]}
    ens = ModelCard(variant=name, arch="ensemble", image_size=card.image_size, classes=card.classes, fit=card.fit,
                    draft=card.draft, equalize=card.equalize, mean=0.0, std=1.0, settings=settings, source=card.source,
                    train_digest=card.train_digest, val_digest=card.val_digest, prior=_mean_prior(members))
    model = ens.build()
    for module, (member, _) in zip(model.net.members, members.values(), strict=True):
        module.load_state_dict(member.state_dict())
    return model.eval(), ens


def _mean_prior(members: dict[str, tuple[Any, ModelCard]]) -> float | None:
    """The members' training priors averaged (each averages its own probabilities); None if one lacks it."""
    priors = [c.prior for _, c in members.values()]
    return None if any(q is None for q in priors) else sum(priors) / len(priors)  # type: ignore[misc]


def run_ensemble(p: Params, name: str, data: Path, models: Path, model_dir: Path, report_dir: Path) -> dict[str, Any]:
    """Assemble ensembles.<name> from models/<member>/model.pt into model_dir, log it as an MLflow run, and
    evaluate it into report_dir like a variant."""
    members = {m: inference.load(models / m / "model.pt") for m in p.ensembles[name]}
    model, card = assemble(name, members)
    root = tracking.project_root()
    experiment_id = tracking.setup(p.mlflow.experiment, root)
    note = f"**{name}**: ensemble of {', '.join(members)} (their probabilities averaged)"
    tags = tracking.run_tags(name, root) | {tracking.NOTE: note}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        mlflow.log_params({"variant": name, "arch": "ensemble", "members": ",".join(members), "seed": p.seed,
                           "image_size": card.image_size})
        with atomic_path(model_dir, is_dir=True) as tmp:
            inference.save(tmp / "model.pt", model, card)
            (tmp / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id}))
    log.info("%s: ensemble of %s", name, ", ".join(members))
    return evaluate_variant(p, name, data, model_dir, report_dir)
