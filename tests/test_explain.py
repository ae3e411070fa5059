"""The maps of cxr.explain on real X-rays: the input gradient of a linear model is its weights, and Grad-CAM
follows where a convolutional model's evidence is."""

import numpy as np
import torch
from matplotlib.text import Text
from PIL import Image

from conftest import shared
from cxr import explain
from cxr.inference import ModelCard


def xrays(n: int, size: int) -> np.ndarray:
    files = sorted((shared("chest_xray_224") / "test" / "NORMAL").glob("*.jpeg"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("L").resize((size, size))) for f in files])


def test_a_linear_model_s_input_gradient_is_its_weight_map_whatever_the_image():
    card = ModelCard("lin", "linear", 32, ("NORMAL", "PNEUMONIA"), "stretch", 32, "none", 0.5, 0.25)
    model = card.build().eval()
    heat, label = explain.saliency(model, card, xrays(3, 32))
    assert label == "input gradient" and heat.shape == (3, 32, 32) and heat.min() >= 0 and heat.max() == 1
    layers = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]  # no activations:
    w = torch.linalg.multi_dot(layers[::-1]) if len(layers) > 1 else layers[0]  # one matrix overall
    w = w.abs().reshape(1, 1, 32, 32)
    expected = torch.nn.functional.avg_pool2d(w, 5, stride=1, padding=2)[0, 0]
    expected = (expected / expected.flatten().quantile(0.995)).clamp(0, 1).numpy()
    for h in heat:  # the same map for every image: a linear model's gradient does not depend on it
        assert np.allclose(h, expected, atol=1e-5)


def test_grad_cam_moves_with_the_evidence_in_a_convolutional_model():
    """A TinyVGG whose pneumonia logit is made to read one quarter of its last feature map (the others are
    silenced): Grad-CAM lights that quarter and not the opposite one, on real X-rays."""
    card = ModelCard("cnn", "tinyvgg", 64, ("NORMAL", "PNEUMONIA"), "stretch", 64, "none", 0.5, 0.25)
    model = card.build().eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight.data.abs_()  # every feature counts for pneumonia: Grad-CAM's rectified sum is then positive
    images = xrays(4, 64)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    _, act, name = explain._last_feature_map(model, x)
    h, w = act.shape[2:]
    keep = torch.zeros(1, 1, h, w)
    keep[..., : h // 2, : w // 2] = 1.0  # the top-left quarter
    hook = dict(model.named_modules())[name].register_forward_hook(lambda _m, _i, out: out.abs() * keep + 1e-3)
    try:
        heat, label = explain.saliency(model, card, images)
    finally:
        hook.remove()
    assert label == f"Grad-CAM on {name}" and heat.shape == (4, 64, 64)
    assert (heat[:, :24, :24].mean((1, 2)) > 4 * heat[:, 40:, 40:].mean((1, 2)) + 1e-6).all()


def test_the_figure_has_a_colour_bar_of_the_map_and_a_line_on_how_to_read_it():
    """Each method's own words: Grad-CAM's map is evidence for pneumonia (rectified), the input gradient's a
    magnitude either way; both scaled per image."""
    from cxr.plots import plt
    from cxr.serving import score

    for arch, method, says in (("tinyvgg", "Grad-CAM on", "raised P(pneumonia)"), ("linear", "input gradient",
                                                                                     "up or down")):
        card = ModelCard(arch, arch, 64, ("NORMAL", "PNEUMONIA"), "stretch", 64, "none", 0.5, 0.25)
        model = card.build().eval()
        images = xrays(1, 64)
        heat, label = explain.saliency(model, card, images)
        fig = explain.figure(images[0], heat[0], "x.jpeg", score(model, card, list(images))[0], label)
        try:
            image, bar = fig.axes  # the X-ray with its map, and the colour bar under it
            assert method in image.get_title() and "P(pneumonia)" in image.get_title()
            assert bar.get_xlim() == (0, 1) and "relative to this image" in bar.get_xlabel()
            assert [t.get_text()[:2] for t in bar.get_xticklabels()] == ["0:", "1:"]
            how = fig.get_supxlabel()
            assert says in how and "Scaled per image" in how and how.startswith("Red: ")
            fig.canvas.draw()  # every word within the PNG, none cut at its edges
            box = fig.bbox
            line = next(t for t in fig.findobj(Text) if t.get_text() == how)
            for text in (line, bar.xaxis.label, *bar.get_xticklabels()):
                extent = text.get_window_extent()
                assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0, text.get_text()
        finally:
            plt.close(fig)
