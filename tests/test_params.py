"""params.yaml parsing: the repo's file loads, and bad values fail with a message naming the key."""

import pytest
import yaml

from conftest import ROOT
from cxr import params
from cxr.models import build_model
from cxr.params import ParamsError


def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_load_and_every_variant_builds():
    p = params.load(ROOT / "params.yaml")
    assert {"linear", "mlp", "tinyvgg", "b_cnn5", "c_resnet18_scratch", "d_vit_scratch"} <= set(p.models)
    assert {n[0] for n in p.models if n[1] == "_"} == {"b", "c", "d"}  # every report's experiments
    for name in p.models:
        tp = p.variant(name)
        build_model(tp.arch, image_size=32 if tp.arch != "vit_b_16" else 224, **{**tp.model, "pretrained": False}
                    if "pretrained" in tp.model else tp.model)


def test_variant_overlays_train_defaults():
    r = raw()
    r["models"]["mlp"]["lr"] = 0.01
    p = params.parse(r)
    assert p.variant("mlp").lr == 0.01 and p.variant("linear").lr == p.train.lr
    assert p.variant("mlp").model == {"hidden_layers": 1, "hidden_units": 10}
    assert p.variant("mlp").epochs == p.train.epochs


@pytest.mark.parametrize("path, value, message", [
    (("data", "source"), "kaggle", "data.source: 'kaggle' is not one of 'hub', 'imagefolder', 'npz'"),
    (("gray", "image_size"), "64", "gray.image_size: expected int"),
    (("train", "lr"), "1e-3", "train.lr: '1e-3' is a string; write numbers like 1.0e-3"),
    (("train", "pos_weight"), "half", "train.pos_weight: 'half' is not a float or 'auto'"),
    (("split", "balance"), "upsample", "split.balance: 'upsample' is not one of 'none', 'downsample'"),
    (("train", "epochs"), True, "train.epochs: expected int, got True"),
    (("split", "val_fraction"), 0.9, "split.val_fraction: must be between 0 and 0.5"),
])
def test_bad_values_name_the_key(path, value, message):
    r = raw()
    r[path[0]][path[1]] = value
    with pytest.raises(ParamsError, match=message.replace("(", r"\(")):
        params.parse(r)


def test_unknown_keys_are_rejected_with_the_allowed_ones():
    r = raw()
    r["train"]["epoch"] = 3
    with pytest.raises(ParamsError, match=r"train.epoch: unknown key; did you mean 'epochs'\? allowed: arch, aug_"):
        params.parse(r)
    r = raw()
    r["models"]["mlp"]["hiden_units"] = 3
    tp = params.parse(r).variant("mlp")
    with pytest.raises(Exception, match="hiden_units: not a setting of arch 'mlp'; allowed: hidden_layers"):
        build_model(tp.arch, image_size=32, **tp.model)


def test_variant_names_must_be_snake_case():
    r = raw()
    r["models"]["Big-CNN"] = {"arch": "tinyvgg"}
    with pytest.raises(ParamsError, match="snake_case"):
        params.parse(r)
