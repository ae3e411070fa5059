"""Every registered arch builds, runs forward and backward with finite values; the registry's errors."""

import pytest
import torch
from torch import nn

from cxr.errors import CxrError
from cxr.models import Classifier, build_model, list_models, register_model


@pytest.mark.parametrize("arch", list_models())
def test_forward_backward_finite(arch):
    torch.manual_seed(0)
    model = Classifier(build_model(arch, image_size=32), mean=0.5, std=0.25)
    x = torch.rand(4, 1, 32, 32)
    out = model(x)
    assert out.shape == (4, 1)
    loss = nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), torch.tensor([0.0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


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
    with pytest.raises(CxrError, match="unknown arch 'resnet9'; known: linear, mlp, tinyvgg"):
        build_model("resnet9", image_size=32)
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda **kw: nn.Identity())
