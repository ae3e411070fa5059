"""params.yaml parsing: the repo's file loads, and bad values fail with a message naming the key."""

import difflib
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_project, sh
from cxr import params
from cxr.models import build_model, check_variants
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
    (("train", "lr"), 0, "train.lr: 0.0 must be above 0"),
    (("train", "lr"), -0.001, "train.lr: -0.001 must be above 0"),
    (("train", "batch_size"), 0, "train.batch_size: 0 must be 1 or more"),
    (("train", "epochs"), -2, "train.epochs: -2 must be 1 or more"),
    (("train", "weight_decay"), -0.1, "train.weight_decay: -0.1 must be at least 0"),
    (("models", "mlp"), {"arch": "mlp", "lr": 0.0}, "models.mlp.lr: 0.0 must be above 0"),
    (("models", "mlp"), {"arch": "mlp", "batch_size": -8}, "models.mlp.batch_size: -8 must be 1 or more"),
    (("data", "on_bad_image"), "ignore", "data.on_bad_image: 'ignore' is not one of 'error', 'skip'"),
    # settings that used to combine silently or fail with a raw error deep in training
    (("models", "mlp"), {"arch": "mlp", "pos_weight": "auto", "class_weights": "balanced"},
     "models.mlp.pos_weight: 'auto' and class_weights balanced would both weight the classes"),
    (("models", "mlp"), {"arch": "mlp", "scheduler": "onecycle", "epochs": 3, "warmup_epochs": 4},
     "models.mlp.warmup_epochs: 4 must be below epochs (3)"),
    (("train", "warmup_epochs"), 10, "train.warmup_epochs: 10 must be below epochs (10)"),
    (("train", "label_smoothing"), 1.0, "train.label_smoothing: 1.0 must be below 1"),
    (("train", "label_smoothing"), -0.1, "train.label_smoothing: -0.1 must be at least 0"),
    (("train", "checkpoint_every"), 0, "train.checkpoint_every: 0 must be 1 or more"),
    (("train", "aug_sharpness"), 1.5, "train.aug_sharpness: 1.5 must be at most 1"),
    (("train", "aug_border"), 0.5, "train.aug_border: 0.5 must be below 0.5"),
    (("train", "aug_border"), -0.1, "train.aug_border: -0.1 must be at least 0"),
    (("split", "val_by"), "series", "split.val_by: 'series' is not one of 'patient', 'acquisition', 'auto'"),
    (("split", "series"), ["^(IM)-"], "split.series[0]: '^(IM)-' needs a named group (?P<series>...)"),
    (("split", "series"), ["^(?P<series>IM"], "split.series[0]: '^(?P<series>IM' is no regular expression"),
    (("evaluate", "threshold"), 1.5, "evaluate.threshold: 1.5 must be between 0 and 1"),
    (("evaluate", "threshold"), 0, "evaluate.threshold: 0.0 must be between 0 and 1"),
])
def test_bad_values_name_the_key(path, value, message):
    r = raw()
    r[path[0]][path[1]] = value
    with pytest.raises(ParamsError, match=re.escape(message)):
        params.parse(r)


def test_variants_pick_which_definitions_run():
    r = raw()
    r["variants"] = ["tinyvgg", "linear"]
    r["gray"]["extra_sizes"] = []  # d_vit_b16_pretrained's 224 px need not be prepared when it does not run
    r["train"]["scheduler"] = "cosine"
    r["train"]["warmup_epochs"] = 1  # nor may b_cnn5's plateau scheduler refuse a default it does not use
    p = params.parse(r)
    assert p.variants == ["tinyvgg", "linear"] and p.entries == ["tinyvgg", "linear"]
    assert "d_vit_b16_pretrained" in p.models
    for variants, message in ((["tinyvg"], "variants: 'tinyvg' is not defined under models; did you mean 'tinyvgg'?"),
                              (["mlp", "mlp"], "variants: ['mlp', 'mlp'] names a variant twice"),
                              (["mlp", "b_cnn5"], "models.b_cnn5.warmup_epochs: not with scheduler plateau")):
        with pytest.raises(ParamsError, match=re.escape(message)):
            params.parse({**r, "variants": variants})
    r["ensembles"] = {"ens": ["tinyvgg", "mlp"]}
    with pytest.raises(ParamsError, match=re.escape("ensembles.ens: ['tinyvgg', 'mlp'] must name 2 or more of the "
                                                    "variants that run (mlp is not in variants: add it there)")):
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


@pytest.mark.parametrize("variant, message", [
    ({"arch": "resnet19"}, "models.x: unknown arch 'resnet19'; did you mean 'resnet18'\\? known: cnn5, "),
    ({"arch": "vgg16", "image_size": 16}, "models.x: arch 'vgg16' cannot take 16 px images \\(.*too small\\); give"),
    ({"arch": "cnn5", "image_size": 16}, "models.x: arch 'cnn5' pools 5 times: image_size 16 is too small"),
    ({"arch": "vit_b_16", "image_size": 40}, "models.x: arch 'vit_b_16' takes image sizes that are multiples of 16"),
    ({"arch": "tinyvgg", "filter": 8}, "models.x: filter: not a setting of arch 'tinyvgg'; allowed: filters"),
])
def test_a_variant_the_arch_cannot_build_is_refused_in_milliseconds(variant, message):
    r = raw()
    r["gray"]["extra_sizes"] = [16, 40]
    r["models"], r["variants"] = {"x": variant}, ["x"]
    p = params.parse(r)
    t0 = time.perf_counter()
    with pytest.raises(ParamsError, match=message):
        check_variants(p)
    assert time.perf_counter() - t0 < 1  # the meta device: no weights, no compute


def test_bad_params_stop_dvc_repro_in_the_first_stage_with_one_line(tmp_path):
    repo = make_project(tmp_path / "repo", {"big": {"arch": "vgg16", "image_size": 16}},
                        gray={"image_size": 32, "extra_sizes": [16]}, data={"source": "imagefolder"})
    out = sh(repo, "dvc", "repro", ok=False)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: models.big: arch 'vgg16' cannot take 16 px images (Given input size: (512x1x1). "
                      "Calculated output size: (512x0x0). Output size is too small); give it a larger image_size"]
    assert not (repo / "data" / "raw").exists() and not (repo / "dvc.lock").exists()


@pytest.mark.parametrize("profile", ["quick", "cpu-best"])
def test_a_profile_becomes_dvc_overrides_that_give_exactly_its_params_and_keep_the_comments(profile, tmp_path):
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` applies

    from cxr.jobs.experiment import overrides

    recipe = yaml.safe_load((ROOT / "configs" / f"{profile}.yaml").read_text())
    data = tmp_path / "shared data" / "it's here"  # a space and a quote survive the override grammar
    data.mkdir(parents=True)
    file = tmp_path / "params.yaml"
    file.write_text((ROOT / "params.yaml").read_text())
    data = Path(os.path.relpath(data))  # as `make quick DATA=../shared/...` gives it, from the project's root
    apply_overrides(str(file), overrides(recipe, str(data)))
    p, before = params.load(file), params.load(ROOT / "params.yaml")
    assert p.variants == recipe["variants"] and p.ensembles == recipe["ensembles"]
    assert set(before.models) | set(recipe.get("models", {})) == set(p.models)  # definitions kept, others added
    for section in ("gray", "train", "evaluate"):
        for key, value in recipe.get(section, {}).items():
            assert getattr(getattr(p, section), key) == value, f"{section}.{key}"
    assert (p.data.source, p.data.path) == ("imagefolder", str(data))
    comments = [line.split("#", 1)[1] for line in file.read_text().splitlines() if "#" in line]
    assert comments == [line.split("#", 1)[1] for line in (ROOT / "params.yaml").read_text().splitlines()
                        if "#" in line]  # every comment kept, in order (DVC drops those after a replaced list)
    check_variants(p)  # every variant builds at the profile's size
    if profile == "cpu-best":
        assert p.variant("xr_s1").arch == "xrnet" and p.variant("xr_s1").seed_offset == 1


def test_params_yaml_keeps_its_layout_and_comments_through_dvcs_overrides(tmp_path):
    """`dvc exp run -S` rewrites params.yaml (ruamel): the file is laid out as that rewrite writes it, so that an
    override changes only its own lines, and no list ends a section or carries a comment (ruamel drops a comment
    after a list, and a replaced commented list can break the file)."""
    from dvc.utils.hydra import apply_overrides

    text = (ROOT / "params.yaml").read_text()
    file = tmp_path / "params.yaml"

    def comments(t: str) -> list[str]:
        return [line.split("#", 1)[1] for line in t.splitlines() if " # " in line or line.lstrip().startswith("#")]

    for sets, changed in ((["seed=42"], 0), (["train.epochs=abc"], 2), (["gray.extra_sizes=[]"], 3),
                          (["split.series=[]"], 4), (["variants=[linear]"], None),
                          (["~ensembles", "+ensembles={e:[a,b]}"], None)):
        file.write_text(text)
        apply_overrides(str(file), sets)
        after = file.read_text()
        assert yaml.safe_load(after), sets  # a valid file
        assert [c for c in comments(text) if c not in comments(after)] == [], sets
        lines = [d for d in difflib.unified_diff(text.splitlines(), after.splitlines(), lineterm="", n=0)
                 if d[:1] in "+-" and d[:3] not in ("+++", "---")]
        assert changed is None or len(lines) == changed, (sets, lines)


def test_cxr_run_checks_params_first_and_puts_everything_back_when_a_stage_fails(tmp_path, small_folder):
    repo = make_project(tmp_path / "repo", {"linear": {"arch": "linear", "epochs": 1}},
                        gray={"image_size": 16, "extra_sizes": []}, data={"source": "imagefolder",
                                                                          "path": str(small_folder)})
    (repo / "configs").mkdir()
    (repo / "configs" / "quick.yaml").write_text((ROOT / "configs" / "quick.yaml").read_text())
    # The pipeline's first two stages (a cached output and one DVC does not cache) are all this needs: the rest
    # is the same mechanism at a minute's cost.
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    pipeline = {"stages": {k: pipeline["stages"][k] for k in ("download", "grayscale")}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    sh(repo, "git", "commit", "-qam", "two stages")
    out = sh(repo, "cxr", "run", "-S", "seed=7", "-n", "first")
    assert "It won't be created" not in out  # DVC's word on each output of a first run: nothing to act on
    assert "The workspace is now the experiment first: params.yaml holds its params " in out
    assert params.load(repo / "params.yaml").seed == 7  # the workspace is the experiment, params included
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status")
    before, raw = (repo / "params.yaml").read_bytes(), (repo / "data" / "raw" / "manifest.csv").read_bytes()

    out = sh(repo, "cxr", "run", "-S", "train.epochs=abc", ok=False)  # a bad value: DVC never starts
    assert out.strip().splitlines()[-1] == ("error: train.epochs: expected int, got 'abc'; nothing was run, "
                                            "params.yaml and the outputs are as they were")
    out = sh(repo, "cxr", "run", "-S", "train.epochz=3", ok=False)  # a typo: the key is named
    assert out.strip().splitlines()[-1].startswith("error: -S train.epochz=3: ") and "epochz" in out
    # A stage fails after another ran: download takes a folder with a corrupt image, grayscale stops on it.
    bad = tmp_path / "bad"
    shutil.copytree(small_folder, bad, symlinks=True)
    (next(bad.glob("train/*")) / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    gray = (repo / "reports" / "grayscale.json").read_bytes()  # not cached by DVC: `dvc checkout` cannot restore it
    out = sh(repo, "cxr", "run", "-n", "first", "-S", f"data.path={bad}", ok=False)
    assert "Running stage 'download'" in out and "Running stage 'grayscale'" in out and "corrupt" in out
    assert out.strip().splitlines()[-1].startswith("error: dvc exp run failed (exit ")
    assert (repo / "params.yaml").read_bytes() == before
    assert (repo / "data" / "raw" / "manifest.csv").read_bytes() == raw  # the previous download's, from the cache
    assert (repo / "reports" / "grayscale.json").read_bytes() == gray
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status")
    assert "dvc exp apply <experiment>" not in out  # cxr run put them back: no word on doing it by hand

    # A plain `dvc exp run` cannot be helped before it starts: the failing stage says how to get back.
    out = sh(repo, "dvc", "exp", "run", "-S", f"data.path={bad}", ok=False)
    assert "`dvc exp apply <experiment>`" in out
    assert (repo / "params.yaml").read_bytes() != before and not (repo / "reports" / "grayscale.json").exists()
    sh(repo, "dvc", "exp", "apply", "first")  # the experiment the failed `cxr run -n first` left in place
    assert (repo / "params.yaml").read_bytes() == before and (repo / "reports" / "grayscale.json").exists()
    assert "no profile 'fast'" in sh(repo, "cxr", "run", "--profile", "fast", ok=False)