"""The model MLflow loads and serves for a model this project logged (models from code: this file is copied into
the model, so no pickled object is ever loaded). Only MLflow imports it.

`predict`'s input is hinted as a DataFrame, which is what MLflow hands it: the logged signature (one binary
`image` column) makes MLflow convert every input to one. MLflow warns at each definition of a PythonModel
whose `predict` input has no hint; a DataFrame hint is one it accepts without inferring a signature from it
or validating against it, so the logged signature and input example stay the model's."""

import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import set_model

from cxr import inference
from cxr.serving import MAX_MB, decoded, images_of, score


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """`load_context` reads the card and weights (tensors only), `predict` scores a batch of encoded images."""

    def load_context(self, context: Any) -> None:
        self.model, self.card = inference.load(Path(context.artifacts["weights"]), "the served model")
        self.max_mb = float(os.environ.get("CXR_SERVE_MAX_MB", MAX_MB))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return pd.DataFrame(score(self.model, self.card, decoded(images_of(model_input), self.card, self.max_mb)))


set_model(ImageClassifier())
