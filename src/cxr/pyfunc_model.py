"""The model MLflow loads and serves for a model this project logged (models from code: this file is copied into
the model, so no pickled object is ever loaded). Only MLflow imports it.

`predict`'s input is hinted as a DataFrame, which is what MLflow hands it: the logged signature (one binary
`image` column) makes MLflow convert every input to one. MLflow warns at each definition of a PythonModel
whose `predict` input has no hint; a DataFrame hint is one it accepts without inferring a signature from it
or validating against it, so the logged signature and input example stay the model's."""

import os
import threading
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.models import set_model

from cxr import inference
from cxr.serving import IDENTITY_ENV, PredictionLog, decoded, images_of, limits, score


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """`load_context` reads the card and weights (tensors only) and the limits, `predict` scores a batch of
    encoded images and logs them (serving.PredictionLog, where CXR_PREDICTION_LOG names a folder)."""

    def load_context(self, context: Any) -> None:
        weights = Path(context.artifacts["weights"])
        self.model, self.card = inference.load(weights, "the served model")
        self.limits = limits()
        self.slots = threading.BoundedSemaphore(self.limits.decode_slots)
        mlmodel = yaml.safe_load((weights.parent.parent / "MLmodel").read_text())  # artifacts/model.pt
        who = {k: os.environ.get(v, "") for k, v in IDENTITY_ENV.items()}  # `cxr serve` knows the version
        self.log = PredictionLog.from_env(who | {"model_id": mlmodel.get("model_id") or "",
                                                 "variant": self.card.variant})

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = decoded(images_of(model_input), self.card, self.limits, self.slots)
        rows = score(self.model, self.card, [d.gray for d in images])
        self.log.write(images, rows)
        return pd.DataFrame(rows)


set_model(ImageClassifier())
