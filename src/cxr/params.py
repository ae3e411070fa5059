"""Load params.yaml into frozen dataclasses, rejecting unknown keys, wrong types and bad choices."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cxr.errors import CxrError


class ParamsError(CxrError, ValueError):
    """A params.yaml value is missing, unknown or of the wrong type; the message names the key."""


OnBadImage = Literal["error", "skip"]
Equalize = Literal["none", "hist", "clahe"]
CpuBf16 = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class DataParams:
    source: Literal["hub", "imagefolder", "npz"] = "hub"
    path: str = "data/external"  # local source (imagefolder/npz); a DVC dependency of `download`
    hub_repo: str = "keremberke/chest-xray-classification"
    hub_config: str = "full"
    hub_revision: str = "refs/convert/parquet"  # datasets 4+ refuses the repo's loader script
    labels: Literal["binary", "three_class"] = "binary"  # three_class: bacteria/virus from Kaggle file names
    on_bad_image: OnBadImage = "error"  # skip: leave out images that cannot be decoded, listed with the reason


@dataclass(frozen=True)
class GrayParams:
    image_size: int = 224  # the size variants train at unless they set their own image_size
    extra_sizes: list[int] = field(default_factory=list)  # more sizes for variants, made in the same pass
    fit: Literal["stretch", "pad", "crop"] = "stretch"  # the hub and Kaggle 224 sets are stretched
    equalize: Equalize = "none"  # contrast normalisation of each resized image: histogram or CLAHE
    workers: int = 0  # 0 = every core

    @property
    def sizes(self) -> list[int]:
        return sorted({self.image_size, *self.extra_sizes})


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = 0.1  # carved from train where the source has no validation split
    test_fraction: float = 0.15  # carved from train where the source has no test split
    balance: Literal["none", "downsample"] = "none"
    drop_duplicates: bool = False
    pool: bool = False  # pool every split of the source and carve train/val/test again, by patient
    # How a carved validation split is chosen: at random by patient; as a block of each acquisition series (the
    # patients at `val_end` of the series' running numbers), imitating a new acquisition; or auto: whichever
    # validation's images a domain classifier tells least well from the test images (no labels read)
    val_by: Literal["patient", "acquisition", "auto"] = "patient"
    val_end: Literal["low", "high"] = "low"
    # Series in file names, for figures per series: regular expressions with a group `series` and, where the
    # names give a running number, a group `number` (val_by acquisition carves blocks of those series only).
    # The first that matches a name wins; no match: no series.
    series: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainParams:
    arch: str = "tinyvgg"
    image_size: int = 0  # 0 = gray.image_size; otherwise one of gray.extra_sizes
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1.0e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    scheduler: Literal["none", "cosine", "plateau", "onecycle"] = "none"
    warmup_epochs: int = 0  # linear warm-up from lr/100 (none, cosine; onecycle uses it as its rise)
    pos_weight: float | Literal["auto"] = 1.0  # binary: "auto" = n_normal / n_pneumonia of the training split
    class_weights: Literal["none", "balanced"] = "none"  # balanced: n / (classes * n_class), as sklearn
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    augment: bool = False  # batched on the device: the aug_* below, each 0 = off
    aug_rotation: float = 10.0  # degrees, uniform in +-
    aug_scale: float = 0.0  # zoom, uniform in 1 +- (a random resized crop when above 1)
    aug_translate: float = 0.0  # shift, uniform in +- this fraction of the side
    aug_brightness: float = 0.1  # added, uniform in +-
    aug_contrast: float = 0.1  # scale around the image mean, uniform in 1 +-
    aug_gamma: float = 0.0  # x ** exp(u), u uniform in +- this (exposure curves of other machines)
    aug_noise: float = 0.0  # Gaussian noise, its std uniform in [0, this)
    aug_sharpness: float = 0.0  # x + s (x - blur(x)), s uniform in +- this (at most 1): blurs (s < 0) or sharpens
    aug_border: float = 0.0  # each side's border blacked out over a strip up to this fraction of the side (< 0.5)
    aug_hflip: bool = False  # off by default: a flip moves the heart to the right
    mixup: float = 0.0  # mixup's Beta(a, a); 0 = off
    sampler: Literal["shuffle", "balanced"] = "shuffle"  # balanced: each class drawn equally often (with replacement)
    ema: float = 0.0  # decay of an exponential moving average of the weights (per step), evaluated and kept; 0 = off
    freeze_epochs: int = 0  # train only the head for this many epochs; >= epochs keeps the base frozen
    patience: int = 3  # early stopping on validation loss (0 = off); the best epoch's weights are kept
    compile: bool = False  # torch.compile the model (CUDA; worth it for long runs)
    # CPU training steps in bf16 autocast + channels_last: auto = where the CPU has native bf16 and the arch is
    # measured faster so (cxr.training.precision); on = always (emulated without native bf16: slow); off = float32
    cpu_bf16: CpuBf16 = "auto"
    devices: int | Literal["auto"] = 1  # data-parallel processes (torchrun, one per GPU); auto = every visible GPU
    sync_batchnorm: bool = False  # with devices > 1: BatchNorm statistics over the whole batch, not each GPU's part
    seed_offset: int = 0  # added to the project seed: variants that differ only here are independent ensemble members
    checkpoint_every: int = 1  # epochs between resume states (written on a background thread)
    model: dict[str, Any] = field(default_factory=dict)  # arch settings, checked against the builder


@dataclass(frozen=True)
class EvaluateParams:
    threshold: Literal["f1", "youden"] | float = "f1"  # chosen on validation, applied to test
    tta: int = 1  # test-time augmentation: probabilities averaged over this many fixed views (1 = off, up to 8)
    calibrate: bool = True  # temperature scaling fitted on validation (ECE before and after in the reports)


Metric = Literal["accuracy", "precision", "recall", "specificity", "f1", "auroc", "average_precision"]
HEADLINE: tuple[str, ...] = typing.get_args(Metric)  # the headline scores, in that order
WITH_INTERVAL = ("accuracy", "recall", "specificity", "f1", "auroc")  # those with a 95% interval


def metric_label(metric: str) -> str:
    """A metric's name in words for people: AUROC, else as params.yaml spells it."""
    return "AUROC" if metric == "auroc" else metric


@dataclass(frozen=True)
class CompareParams:
    metric: Metric = "auroc"


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "chest-xray"
    registered_model: str = "chest-xray-classifier"


@dataclass(frozen=True)
class PromoteParams:
    metric: Metric = "auroc"
    # the candidate must beat the champion on test by more than this, with 95% confidence (paired bootstrap)
    min_delta: float = 0.0
    # test images of patients neither model trained or validated on, fewer than this after removing the seen ones
    # (or fewer patients, where the file names give them): no decision
    min_test_images: int = 200
    min_test_patients: int = 100


@dataclass(frozen=True)
class RetrainParams:
    # `cxr retrain` compares the images the champion never saw with those it trained on: on a shift, warn (the
    # summary says so) or stop (no promotion; `cxr promote` promotes anyway once someone has looked)
    on_shift: Literal["warn", "stop"] = "warn"


@dataclass(frozen=True)
class TrackingParams:
    # strict: no pixels to MLflow (galleries stay local files, the model's input example is drawn), and file names
    # and patient ids are salted hashes in every output (privacy.py); for a hospital's own data
    privacy: Literal["public", "strict"] = "public"


@dataclass(frozen=True)
class ServeParams:
    # `cxr serve` hands these to the served model (CXR_SERVE_<KEY>); plain `mlflow models serve` gets the defaults
    port: int = 5001
    max_megapixels: float = 50.0  # an image larger by its header is refused undecoded (detectors make about 20)
    max_image_mb: float = 20.0  # one encoded image
    max_images: int = 256  # images in one request
    max_request_mb: float = 64.0  # a request's body, refused as it arrives (base64 makes images 4/3 larger)
    decode_slots: int = 2  # images decoded at once per server process: what bounds its memory


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataParams = DataParams()
    gray: GrayParams = GrayParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # every variant's definition
    variants: list[str] | None = None  # the variants the pipeline runs (DVC stages); None: all of models
    ensembles: dict[str, list[str]] = field(default_factory=dict)  # name -> member variants (probabilities averaged)
    evaluate: EvaluateParams = EvaluateParams()
    compare: CompareParams = CompareParams()
    mlflow: MlflowParams = MlflowParams()
    tracking: TrackingParams = TrackingParams()
    promote: PromoteParams = PromoteParams()
    retrain: RetrainParams = RetrainParams()
    serve: ServeParams = ServeParams()

    @property
    def entries(self) -> list[str]:
        """Every variant, then every ensemble: what is evaluated, ranked and may be promoted."""
        return [*(self.variants or []), *self.ensembles]

    def image_size(self, variant: str) -> int:
        return self.variant(variant).image_size or self.gray.image_size

    def variant(self, name: str) -> TrainParams:
        """The `train` defaults overlaid with `models.<name>`; keys that are not train settings
        are the arch's own settings (hidden_units, filters...)."""
        if name not in self.models:
            raise ParamsError(f"models.{name}: no such variant; known: {', '.join(self.models) or 'none'}")
        names = {f.name for f in dataclasses.fields(TrainParams)} - {"model"}
        over = self.models[name] or {}
        if not isinstance(over, dict):
            raise ParamsError(f"models.{name}: expected a mapping of settings, got {over!r}")
        base = dataclasses.asdict(self.train)
        base.update({k: v for k, v in over.items() if k in names})
        base["model"] = {**self.train.model, **{k: v for k, v in over.items() if k not in names}}
        return _build(TrainParams, base, f"models.{name}")


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return value if it matches the annotation tp, else raise ParamsError naming key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check(value, arm, key)
            except ParamsError:
                pass
        raise ParamsError(f"{key}: {value!r} is not a {_describe(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        return [_check(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise ParamsError(f"{key}: expected a mapping, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads 1e-3 (no dot) as a string: say how to write it.
        raise ParamsError(f"{key}: {value!r} is a string; write numbers like 1.0e-3 or 0.001")
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ParamsError(f"{key}: expected {tp.__name__}, got {value!r}")


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    return " or ".join(_describe(a) if typing.get_args(a) else getattr(a, "__name__", repr(a)) for a in args) \
        if args else getattr(tp, "__name__", repr(tp))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params.yaml'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        near = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ParamsError(f"{_join(prefix, unknown[0])}: unknown key; {hint}allowed: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, _join(prefix, name))
        else:
            kwargs[name] = _check(value, tp, _join(prefix, name))
    return cls(**kwargs)


def _check_train(tp: TrainParams, prefix: str) -> None:
    if tp.devices != "auto" and tp.devices < 1:
        raise ParamsError(f"{prefix}.devices: {tp.devices} must be 1 or more, or auto")
    for key in ("epochs", "batch_size", "checkpoint_every"):
        if getattr(tp, key) < 1:
            raise ParamsError(f"{prefix}.{key}: {getattr(tp, key)} must be 1 or more")
    for key in ("lr", "weight_decay", "label_smoothing", "grad_clip", "warmup_epochs", "freeze_epochs", "patience",
                "aug_scale", "aug_translate", "aug_gamma", "aug_noise", "aug_sharpness", "aug_border", "mixup", "ema"):
        value = getattr(tp, key)
        if value < 0 or (key == "lr" and value == 0):
            raise ParamsError(f"{prefix}.{key}: {value} must be {'above' if key == 'lr' else 'at least'} 0")
    if tp.warmup_epochs and tp.scheduler == "plateau":
        raise ParamsError(f"{prefix}.warmup_epochs: not with scheduler plateau; use cosine or onecycle")
    if tp.warmup_epochs >= tp.epochs:
        raise ParamsError(f"{prefix}.warmup_epochs: {tp.warmup_epochs} must be below epochs ({tp.epochs})")
    if tp.label_smoothing >= 1:
        raise ParamsError(f"{prefix}.label_smoothing: {tp.label_smoothing} must be below 1 (1 would make every "
                          "target the same)")
    for key, limit in (("aug_scale", 1), ("ema", 1), ("aug_border", 0.5)):  # borders of half a side: all black
        if getattr(tp, key) >= limit:
            raise ParamsError(f"{prefix}.{key}: {getattr(tp, key)} must be below {limit}")
    if tp.aug_sharpness > 1:  # x + s (x - blur) = blur + (1 + s)(x - blur): below -1 the edges invert
        raise ParamsError(f"{prefix}.aug_sharpness: {tp.aug_sharpness} must be at most 1 (beyond, blurring inverts "
                          "the edges)")
    if tp.sampler == "balanced" and (tp.class_weights != "none" or tp.pos_weight != 1.0):
        raise ParamsError(f"{prefix}.sampler: balanced sampling already weights the classes; keep pos_weight: 1.0 "
                          "and class_weights: none with it")
    if tp.class_weights != "none" and tp.pos_weight != 1.0:
        raise ParamsError(f"{prefix}.pos_weight: {tp.pos_weight!r} and class_weights {tp.class_weights} would both "
                          "weight the classes; keep one (pos_weight: 1.0 or class_weights: none)")


def _check_variants(params: Params) -> None:
    """Every definition's types and name; `variants` filled in, known and unique; the variants that run fit the
    prepared sizes and the train rules."""
    for name in params.models:
        params.variant(name)  # the types of every definition, also of variants that do not run
        if not name.replace("_", "").isalnum() or not name.islower():
            raise ParamsError(f"models.{name}: variant keys must be snake_case (they name stages and runs)")
    if params.variants is None:  # parse() fills it in: the dataclass stays frozen for everyone else
        object.__setattr__(params, "variants", list(params.models))
    for name in params.variants:
        if name not in params.models:
            near = difflib.get_close_matches(name, params.models, n=1)
            raise ParamsError(f"variants: {name!r} is not defined under models; "
                              + (f"did you mean {near[0]!r}?" if near else f"known: {', '.join(params.models)}"))
    if len(set(params.variants)) < len(params.variants):
        raise ParamsError(f"variants: {params.variants!r} names a variant twice")
    # The rules that combine a definition with the train defaults and the prepared sizes hold for the variants
    # that run: a profile may change those defaults (cosine for all) without touching a plateau variant's.
    for name in params.variants:
        tp = params.variant(name)
        if tp.image_size and tp.image_size not in params.gray.sizes:
            raise ParamsError(f"models.{name}.image_size: {tp.image_size} is not prepared; add it to "
                              f"gray.extra_sizes (now {params.gray.extra_sizes})")
        _check_train(tp, f"models.{name}")


def _check_split(split: SplitParams) -> None:
    for key in ("val_fraction", "test_fraction"):
        if not 0 < getattr(split, key) < 0.5:
            raise ParamsError(f"split.{key}: must be between 0 and 0.5")
    for i, pattern in enumerate(split.series):
        try:
            groups = re.compile(pattern).groupindex
        except re.error as e:
            raise ParamsError(f"split.series[{i}]: {pattern!r} is no regular expression ({e})") from None
        if "series" not in groups:
            raise ParamsError(f"split.series[{i}]: {pattern!r} needs a named group (?P<series>...) (and "
                              "(?P<number>\\d+) where the names give a running number, for val_by acquisition)")


def _check_after_training(params: Params) -> None:
    """Ensembles, evaluation and promotion."""
    for name, members in params.ensembles.items():
        if name in params.models or not name.replace("_", "").isalnum() or not name.islower():
            raise ParamsError(f"ensembles.{name}: needs a snake_case name that no variant in models has")
        unknown = [m for m in members if m not in params.variants]
        if len(set(members)) < 2 or unknown:
            raise ParamsError(f"ensembles.{name}: {members!r} must name 2 or more of the variants that run"
                              + (f" ({', '.join(map(str, unknown))} is not in variants: add it there)"
                                 if unknown else ""))
    if not 1 <= params.evaluate.tta <= 8:
        raise ParamsError(f"evaluate.tta: {params.evaluate.tta} must be 1 (off) to 8 views")
    t = params.evaluate.threshold
    if isinstance(t, float) and not 0 < t < 1:
        raise ParamsError(f"evaluate.threshold: {t} must be between 0 and 1 (a probability), or f1 or youden")
    if not 0 <= params.promote.min_delta < 1:
        raise ParamsError("promote.min_delta: must be between 0 and 1 (a difference of scores)")
    for key in ("min_test_images", "min_test_patients"):
        if getattr(params.promote, key) < 1:
            raise ParamsError(f"promote.{key}: {getattr(params.promote, key)} must be at least 1")


def _check_serve(serve: ServeParams) -> None:
    for key, value in dataclasses.asdict(serve).items():
        if not (math.isfinite(value) and value > 0):
            raise ParamsError(f"serve.{key}: {value!r} must be a positive number")
    if serve.port > 65535:
        raise ParamsError(f"serve.port: {serve.port} is no TCP port (1 to 65535)")


def parse(raw: dict[str, Any]) -> Params:
    params = _build(Params, raw, "")
    for size in params.gray.sizes:  # ints already: _check saw to that
        if size < 8:
            raise ParamsError(f"gray: image size {size!r} is too small; use whole numbers of 8 or more")
    _check_train(params.train, "train")  # first, so that a bad default is named where it is set
    _check_variants(params)
    _check_split(params.split)
    _check_after_training(params)
    _check_serve(params.serve)
    return params


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params")
    with path.open() as f:
        return parse(yaml.safe_load(f) or {})
