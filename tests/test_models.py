"""Every registered arch builds, runs forward and backward with finite values; pretrained weights through
torchvision's API from a cache the test writes; the registry's errors."""

import re

import pytest
import torch
import torchvision
from torch import nn

from conftest import make_imagefolder, make_project, sh
from cxr.errors import CxrError
from cxr.models import Classifier, build_model, list_models, register_model


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("arch", list_models())
def test_forward_backward_finite(arch, num_classes):
    torch.manual_seed(0)
    settings = {"members": [{"arch": a, "settings": {}, "mean": 0.4, "std": 0.2} for a in ("tinyvgg", "mlp")]} \
        if arch == "ensemble" else {}
    model = Classifier(build_model(arch, num_classes=num_classes, image_size=32, **settings), mean=0.5, std=0.25)
    out = model(torch.rand(4, 1, 32, 32))
    assert out.shape == (4, num_classes)
    y = torch.tensor([0, 1, 0, 1])
    loss = (nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y.float()) if num_classes == 1
            else nn.functional.cross_entropy(out, y))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_pretrained_weights_load_from_torch_home_with_rgb_filters_summed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # stands in for the real file
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    model = build_model("resnet18", pretrained=True, image_size=64)
    assert model.conv1.in_channels == 1
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])
    assert model.fc.out_features == 1 and model.head_name == "fc"
    # 1-channel gray through the summed filter = gray replicated to RGB through the original one
    x = torch.rand(2, 1, 64, 64)
    rgb = nn.functional.conv2d(x.expand(-1, 3, -1, -1), imagenet["conv1.weight"], stride=2, padding=3)
    assert torch.allclose(model.conv1(x), rgb, atol=1e-5)


def test_missing_pretrained_weights_offline_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # No network here; elsewhere a closed proxy port makes the download fail the same way.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(CxrError, match=rf"ImageNet weights for mobilenet_v2 .*put mobilenet_v2-7ebf99e0.pth .*"
                                       rf"into {folder}"):
        build_model("mobilenet_v2", pretrained=True, image_size=64)


def test_the_first_stage_warns_of_pretrained_weights_it_cannot_get(tmp_path, monkeypatch):
    """Offline, a pretrained variant fails at its train stage, after the data stages and the other variants;
    the download stage says so in its first seconds, and still does its work."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # offline here; elsewhere a closed port
    repo = make_project(tmp_path / "repo", {"lin": {"arch": "linear"},
                                            "r18": {"arch": "resnet18", "pretrained": True},
                                            "r18_ft": {"arch": "resnet18", "pretrained": True, "lr": 1e-5},
                                            "mnet": {"arch": "mobilenet_v2", "pretrained": True}},
                        data={"source": "imagefolder", "path": str(make_imagefolder(tmp_path / "src", per_class=5))})
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    out = sh(repo, "dvc", "repro", "download")
    assert re.findall(r"cxr.download: (.+?) will fail at train", out) == ["mnet", "r18, r18_ft"], out
    assert f"resnet18-f37072fd.pth is not in {folder} and https://download.pytorch.org/models/" in out
    assert "train the other variants with `dvc repro --keep-going`" in out
    assert (repo / "data" / "raw" / "source.json").exists()  # a warning: the stage did its work
    folder.mkdir(parents=True)
    (folder / "resnet18-f37072fd.pth").touch()  # in the cache: nothing to download, no warning
    out = sh(repo, "dvc", "repro", "-f", "download")
    assert re.findall(r"cxr.download: (.+?) will fail at train: (\S+)", out) == [("mnet", "mobilenet_v2-7ebf99e0.pth")]


def test_sizes_a_model_cannot_take():
    with pytest.raises(CxrError, match="image_size 16 is too small; use 32"):
        build_model("cnn5", image_size=16)
    with pytest.raises(CxrError, match="vit_b_16.*224 with pretrained weights"):
        build_model("vit_b_16", image_size=100)


@pytest.mark.parametrize("arch", ["linear", "mlp", "tinyvgg"])
def test_output_is_a_raw_logit(arch):
    # Report A put a ReLU after the logit, clamping it at 0; ours must go negative.
    model = build_model(arch, image_size=16)
    assert isinstance(list(model.modules())[-1], nn.Linear)
    with torch.no_grad():
        model[-1].bias.fill_(-5.0)
        assert (model(torch.zeros(2, 1, 16, 16)) < 0).all()


def test_linear_has_no_activation_and_mlp_has_relu():
    assert not any(isinstance(m, nn.ReLU) for m in build_model("linear", image_size=8, hidden_layers=3).modules())
    relus = [m for m in build_model("mlp", image_size=8, hidden_layers=3).modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 3


def test_tinyvgg_matches_report_a_shape():
    model = build_model("tinyvgg", image_size=640, filters=10, kernel_size=3)
    assert model[-1].in_features == 10 * 160 * 160


def test_registry_errors():
    with pytest.raises(CxrError, match=r"unknown arch 'resnet9'; did you mean 'resnet50'\? known: cnn5, .*, vit_b_16"):
        build_model("resnet9", image_size=32)
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda **kw: nn.Identity())
