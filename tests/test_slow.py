"""Full real-data runs (`make test-all` or `pytest -m slow`): every image of the Kaggle 224 px set."""

import pytest
import yaml

from conftest import ROOT, shared
from cxr import params
from cxr.data.gray import grayscale
from cxr.data.sources import download
from cxr.data.split import split
from cxr.evaluation.variant import evaluate_variant
from cxr.params import DataParams, GrayParams, SplitParams
from cxr.training.variant import train_variant

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gray64(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kaggle64")
    download(DataParams(source="imagefolder", path=str(shared("chest_xray_224"))), tmp / "raw")
    grayscale(tmp / "raw", tmp / "gray", GrayParams(image_size=64))
    return tmp / "gray"


def run_variant(gray, tmp, variant, labels, **settings):
    split(gray, tmp / "split", SplitParams(), seed=42, labels=labels)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["gray"]["image_size"] = 64
    raw["models"][variant].update(settings)
    p = params.parse(raw)
    train_variant(p, variant, tmp / "split", tmp / "m", tmp / "r", tmp / "ck")
    return evaluate_variant(p, variant, tmp / "split", tmp / "m", tmp / "r")


def test_resnet18_from_scratch_beats_auroc_0_90_on_the_kaggle_test_set(gray64, tmp_path):
    metrics = run_variant(gray64, tmp_path, "c_resnet18_scratch", "binary", epochs=4)
    assert metrics["test"]["auroc"] > 0.90


def test_three_class_task_on_the_kaggle_set(gray64, tmp_path):
    metrics = run_variant(gray64, tmp_path, "c_resnet18_scratch", "three_class", epochs=3)
    assert metrics["classes"] == ["NORMAL", "BACTERIA", "VIRUS"]
    assert metrics["test"]["accuracy"] > 0.6 and metrics["test"]["auroc"] > 0.8  # chance: 0.39 and 0.5


def test_the_cpu_best_recipe_on_a_smaller_budget_holds_up_on_the_official_test_set(tmp_path_factory, tmp_path):
    """configs/cpu-best.yaml's recipe, one member at 96 px for 5 epochs (about a fifth of its cost): the
    official 624 test images, shifted from the validation split carved out of Kaggle's train. Measured:
    val AUROC 0.928, test 0.918 (after 5 epochs the EMA of the weights still lags: 10 epochs at 128 px give
    0.997 / 0.952)."""
    tmp = tmp_path_factory.mktemp("kaggle96")
    download(DataParams(source="imagefolder", path=str(shared("chest_xray_224"))), tmp / "raw")
    grayscale(tmp / "raw", tmp / "gray", GrayParams(image_size=96))
    split(tmp / "gray", tmp / "split", SplitParams(), seed=42)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    recipe = yaml.safe_load((ROOT / "configs" / "cpu-best.yaml").read_text())
    for section in ("gray", "train", "evaluate"):
        raw[section].update(recipe[section])
    raw["gray"].update(image_size=96)
    raw["models"], raw["variants"], raw["ensembles"] = {"xr": {"epochs": 5}}, ["xr"], {}
    p = params.parse(raw)
    train_variant(p, "xr", tmp / "split", tmp_path / "m", tmp_path / "r", tmp_path / "ck")
    metrics = evaluate_variant(p, "xr", tmp / "split", tmp_path / "m", tmp_path / "r")
    assert metrics["val"]["auroc"] > 0.90 and metrics["test"]["auroc"] > 0.90
