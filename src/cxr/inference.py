"""The model contract: a ModelCard holds everything needed to rebuild a model and prepare its input as its
training data was prepared; with it come save/load (a file or an MLflow model) and batched probabilities in
float32. Training, evaluation, promotion and `cxr predict` all go through here."""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr import task
from cxr.errors import CxrError, run_pipeline
from cxr.models import Classifier, build_model, without_download

CARD_VERSION = 3  # 2: equalize and tta; 3: the TTA views themselves, and the data's lineage

# Test-time augmentation views, (zoom, shift x, shift y) with shifts in fractions of the side: the identity
# first, then mild versions of the training augmentation's zoom and shift. `evaluate.tta: n` averages the first
# n; the card keeps the views themselves, so that editing this list changes no model already logged.
View = tuple[float, float, float]
TTA_VIEWS: tuple[View, ...] = ((1.0, 0.0, 0.0), (1.08, 0.0, 0.0), (0.93, 0.0, 0.0), (1.0, 0.04, 0.0), (1.0, -0.04, 0.0),
             (1.0, 0.0, 0.04), (1.0, 0.0, -0.04), (1.08, 0.0, 0.04))


# A logged model's artifacts: split, sha256 and name of each image it trained on; and its card and weights as
# `save` writes them, which is all that loading it reads (the pyfunc's code is for MLflow's tools).
HASHES = "image_hashes.csv"
WEIGHTS = "model.pt"


class CardError(CxrError):
    """A model that cannot be loaded as this project's card and weights: made by an older version of the
    project, or not by it at all."""


@dataclass(frozen=True)
class ModelCard:
    """A trained model's settings. `fit` and `draft` come from the arrays it was trained on (the grayscale
    stage's record), never from the params of the day, so that predict prepares images exactly as they were."""

    variant: str
    arch: str
    image_size: int
    classes: tuple[str, ...]
    fit: str  # stretch | pad | crop
    draft: int  # JPEG decode scale: the largest size the grayscale stage made in the same decode
    equalize: str  # none | hist | clahe, after resizing
    mean: float  # input normalisation, from the training split
    std: float
    settings: dict[str, Any] = field(default_factory=dict)  # the arch's own settings
    threshold: float = 0.5  # binary: positive when P(PNEUMONIA) > threshold (chosen on validation)
    temperature: float = 1.0  # logits are divided by it before the sigmoid / softmax (fitted on validation)
    tta_views: tuple[View, ...] = TTA_VIEWS[:1]  # probabilities are averaged over these views
    # lineage: where the images came from and which trained and validated it (store.images_digest), so that
    # promotion can tell whether a test image was seen; the logged model lists the images' sha256s
    source: str = ""
    train_digest: str = ""
    val_digest: str = ""
    # P(pneumonia, of any kind) as training weighed the classes (0.5 with balanced sampling): the prior its
    # scores carry, from which a prevalence estimate on new images starts; None on cards of older versions
    prior: float | None = None

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def build(self, start: bool = False) -> Classifier:
        """The network with this card's shape and normalisation, untrained. `pretrained` only shapes the start
        of training (`start`: ImageNet weights where the settings ask for them); saved weights replace it, so a
        rebuild never downloads."""
        net = build_model(self.arch, num_classes=task.n_logits(len(self.classes)), image_size=self.image_size,
                          **(self.settings if start else without_download(self.settings)))
        return Classifier(net, self.mean, self.std)

    def probabilities(self, logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """(views, N, logits) to probabilities: each view's at the temperature, averaged over the views."""
        t = self.temperature if temperature is None else temperature
        return torch.stack([task.probabilities(v, t) for v in logits]).mean(0)

    def predicted(self, probs: torch.Tensor) -> torch.Tensor:
        return task.predicted(probs, self.threshold)

    def logits_of(self, model: nn.Module, images: np.ndarray) -> torch.Tensor:
        """(views, N, logits) for uint8 (N, H, W) images, on the best device, in float32, returned on the CPU."""
        device = pick_device()
        return predict_logits(model.to(device), to_device(images, device), self.tta_views).cpu()

    def probs_of(self, model: nn.Module, images: np.ndarray) -> torch.Tensor:
        """Probabilities for uint8 (N, H, W) images: every view, the temperature, the average."""
        return self.probabilities(self.logits_of(model, images))

    def to_dict(self) -> dict[str, Any]:
        return {"card_version": CARD_VERSION, **dataclasses.asdict(self), "classes": list(self.classes),
                "tta_views": [list(v) for v in self.tta_views],
                "input": "float32 (N, 1, S, S) gray in [0, 1]; output: logits"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ModelCard:
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in d and f.default is f.default_factory is dataclasses.MISSING]
        if d.get("card_version") != CARD_VERSION or missing:
            raise CardError(f"{where} has no model card of this version (missing {', '.join(missing) or 'the version'})"
                           "; it was made by an older version of this project: run `dvc repro` to retrain it")
        names = {f.name for f in fields}
        kept = {k: v for k, v in d.items() if k in names}
        views = tuple(tuple(float(x) for x in v) for v in kept.get("tta_views", TTA_VIEWS[:1]))
        return cls(**(kept | {"classes": tuple(kept["classes"]), "tta_views": views}))


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The whole split as uint8 (N, 1, H, W) on the device: 4x smaller than float32, converted per batch."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(device)


def batches(x: torch.Tensor, size: int, order: torch.Tensor | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """(index, float batch in [0, 1]) over uint8 images, in `order` if given."""
    for i in range(0, x.shape[0], size):
        idx = order[i:i + size] if order is not None else slice(i, i + size)
        xb = x[idx].float().div_(255.0)
        if x.is_cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield idx, xb


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """No reduced precision, whatever the caller set: autocast off, and no TF32 in CUDA convolutions and
    matmuls (its 10-bit mantissa would shift scores, thresholds and AUROC between GPU and CPU)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def view(x: torch.Tensor, zoom: float, dx: float, dy: float) -> torch.Tensor:
    """A float batch (B, 1, H, W) zoomed about its centre and shifted (fractions of the side), zeros outside."""
    if (zoom, dx, dy) == (1.0, 0.0, 0.0):
        return x
    theta = torch.tensor([[1 / zoom, 0.0, -2 * dx], [0.0, 1 / zoom, -2 * dy]], device=x.device).expand(len(x), 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, views: tuple[View, ...] | None = None,
                   batch_size: int = 512) -> torch.Tensor:
    """(N, logits) in float32, computed in float32; with `views`, (views, N, logits), one row per view."""
    with contextlib.suppress(NotImplementedError):  # a pt2 program loaded from MLflow: exported in eval mode
        model.eval()
    with full_float32():
        out = [torch.cat(rows) for rows in zip(*([model(view(xb, *v)).float() for v in views or [(1.0, 0.0, 0.0)]]
                                                 for _, xb in batches(x, batch_size)), strict=True)]
    return torch.stack(out) if views else out[0]


def save(path: Path, model: Classifier, card: ModelCard) -> None:
    torch.save({"card": card.to_dict(), "state_dict": model.state_dict()}, path)


def load(path: Path, where: str = "") -> tuple[Classifier, ModelCard]:
    """A saved model as data: plain tensors and a card (unpickling anything else is refused, so loading never
    runs code), built from this project's own architectures. `where` names it in errors (default: the path)."""
    if not path.exists():
        raise CxrError(f"{path} is missing; run {run_pipeline()} to train it")
    where = where or str(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CardError(f"{where} is refused: its weights file holds more than tensors and a card, and loading it "
                        f"would run code ({str(e).splitlines()[-1].strip()[:120]})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CardError(f"{where} is refused: its weights file is not a card and a state dict")
    card = ModelCard.from_dict(ckpt.get("card") or {}, where)
    model = card.build()
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CardError(f"{where} is refused: its weights do not fit its card's {card.arch} ({e})") from e
    return model.eval(), card


def load_logged(uri: str) -> tuple[Classifier, ModelCard]:
    """The MLflow model at `uri` as data: the card and weights logged with it (WEIGHTS), loaded by `load`. The
    flavor's own files (a pickle, or a pt2 program) are never loaded: a version without WEIGHTS is refused."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from cxr.tracking import store_and_error

    name = version_of(uri)
    try:
        path = logged_file(uri, WEIGHTS)
    except (MlflowException, OSError) as e:
        try:
            get_model_info(uri)  # the model answers, so the file is what is missing; else the store's error
        except (MlflowException, OSError) as store:
            raise CxrError(f"cannot load {uri} from {store_and_error(store)}; "
                           f"run {run_pipeline()} then `cxr promote` first, or check "
                           "MLFLOW_TRACKING_URI") from store
        raise CardError(f"{name} is refused: it has no card and weights file (artifacts/{WEIGHTS}), so it "
                        "is not a model this version of the project logged, and its other files are code; "
                        "run `dvc repro` to retrain it") from e
    return load(Path(path), name)


def logged_file(uri: str, name: str) -> str:
    """The file `name` logged with the MLflow model at `uri`, downloaded; from the model's own artifact
    repository, so registered (models:/m@a), logged (models:/m-<id>) and runs:/ URIs alike. Raises
    MlflowException or OSError when the model or the file is missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(uri)
    try:
        return repo.download_artifacts(f"artifacts/{name}")  # the image pyfunc's (cxr.serving)
    except (MlflowException, OSError):
        return repo.download_artifacts(f"extra_files/{name}")  # a model logged before it, as a torch flavor


def version_of(uri: str) -> str:
    """`uri` with the registry version it resolves to, for messages: models:/m@champion (version 3)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    model, alias = uri.removeprefix("models:/").split("@", 1)
    try:
        return f"{uri} (version {mlflow.MlflowClient().get_model_version_by_alias(model, alias).version})"
    except (MlflowException, OSError):
        return uri
