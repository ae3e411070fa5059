"""The training settings: augmentation, schedules, losses, freezing, and resuming from a saved state."""

import copy
import dataclasses
import io
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr.data.store import Split
from cxr.errors import CxrError
from cxr.params import TrainParams
from cxr.training import ddp
from cxr.training.loop import fit, make_card
from cxr.training.parts import augment, epoch_order, make_loss, make_scheduler, trained_prior
from cxr.training.precision import CPU_MODES, FAST, FLOAT32, native_bf16, training_mode
from cxr.training.state import StateWriter, read_state


def batch(seed=0, n=6, size=16):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_augment_off_is_identity_and_flip_only_flips():
    x = batch()
    none = TrainParams(aug_rotation=0.0, aug_brightness=0.0, aug_contrast=0.0, aug_hflip=False)
    assert torch.allclose(augment(x, none, torch.Generator().manual_seed(0)), x, atol=1e-6)
    flip = TrainParams(aug_rotation=0.0, aug_brightness=0.0, aug_contrast=0.0, aug_hflip=True)
    out = augment(x, flip, torch.Generator().manual_seed(0))
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x, strict=True)]
    flipped = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x, strict=True)]
    assert all(a or b for a, b in zip(same, flipped, strict=True)) and any(flipped) and any(same)


def test_augment_is_seeded_per_image_and_stays_in_range():
    x, tp = batch(n=32), TrainParams(aug_rotation=25.0, aug_brightness=0.2, aug_contrast=0.2, aug_hflip=True,
                                     aug_scale=0.15, aug_translate=0.08, aug_gamma=0.3, aug_noise=0.03)
    a = augment(x, tp, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment(x, tp, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, augment(x, tp, torch.Generator().manual_seed(4)))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert len({round(float((o - i).abs().mean()), 4) for o, i in zip(a, x, strict=True)}) == 32  # each its own


def test_gamma_keeps_each_images_order_of_pixels_and_noise_is_small_and_centred():
    x, off = batch(n=8, size=32), dict(aug_rotation=0.0, aug_brightness=0.0, aug_contrast=0.0)
    gamma = augment(x, TrainParams(**off, aug_gamma=0.4), torch.Generator().manual_seed(0))
    assert not torch.allclose(gamma, x, atol=1e-3)
    for o, i in zip(gamma, x, strict=True):  # a monotone curve: brighter stays brighter
        assert torch.equal(o.flatten().argsort(), i.flatten().argsort())
    noisy = augment(x * 0.5 + 0.25, TrainParams(**off, aug_noise=0.05), torch.Generator().manual_seed(0))
    diff = noisy - (x * 0.5 + 0.25)
    assert 0 < diff.std() < 0.05 and abs(diff.mean()) < 0.005


def test_sharpness_blurs_or_sharpens_and_borders_go_black_on_strips_of_each_side():
    x, off = batch(n=16, size=32), dict(aug_rotation=0.0, aug_brightness=0.0, aug_contrast=0.0)
    edges = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean(dim=(1, 2, 3))  # noqa: E731
    sharp = augment(x, TrainParams(**off, aug_sharpness=1.0), torch.Generator().manual_seed(0))
    change = edges(sharp) - edges(x)
    assert (change < 0).any() and (change > 0).any()  # both ways, per image
    framed = augment(x + 0.5, TrainParams(**off, aug_border=0.2), torch.Generator().manual_seed(0))
    for img in framed[:, 0]:  # every pixel > 0 before: the zeros are the strips, whole rows and columns at the edges
        rows, cols = (img > 0).any(1), (img > 0).any(0)
        inside = img[rows][:, cols]
        assert (inside > 0).all() and rows.sum() > 32 * 0.6 and cols.sum() > 32 * 0.6
        assert torch.equal(rows.nonzero().flatten(), torch.arange(int(rows.nonzero()[0]), int(rows.nonzero()[-1]) + 1))
    assert (framed == 0).any(dim=(1, 2, 3)).float().mean() > 0.5
    many = augment(torch.ones(400, 1, 10, 10), TrainParams(**off, aug_border=0.45), torch.Generator().manual_seed(1))
    black_rows = (many[:, 0] == 0).all(2).float()  # (image, row): each side's strips, as wide on average
    assert abs(black_rows[:, :5].sum() - black_rows[:, 5:].sum()) < 0.05 * black_rows.sum()


def test_zoom_and_shift_move_the_content():
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0  # a bright square in the middle
    off = dict(aug_rotation=0.0, aug_brightness=0.0, aug_contrast=0.0)
    zoomed = augment(x, TrainParams(**off, aug_scale=0.5), torch.Generator().manual_seed(1))
    assert not torch.allclose(zoomed.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.05)  # zoom changes its area
    shifted = augment(x, TrainParams(**off, aug_translate=0.2), torch.Generator().manual_seed(1))
    assert float(shifted.sum()) == pytest.approx(float(x.sum()), rel=0.02)  # same area...
    cols = torch.arange(32.0)
    centre = lambda im: float((im.sum(0) * cols).sum() / im.sum())  # noqa: E731  (column centre of mass)
    moved = [abs(centre(s[0]) - centre(i[0])) for s, i in zip(shifted, x, strict=True)]
    assert all(m <= 0.2 * 32 + 0.5 for m in moved) and max(moved) > 0.5  # ...elsewhere, by up to 20% of 32 px


def test_balanced_sampling_draws_each_class_about_equally():
    labels = torch.tensor([0] * 1341 + [1] * 3875)  # Kaggle's training split
    gen = torch.Generator().manual_seed(0)
    drawn = labels[epoch_order(labels, "balanced", gen)]
    assert len(drawn) == len(labels) and abs(drawn.float().mean().item() - 0.5) < 0.03
    order = epoch_order(labels, "shuffle", gen)
    assert torch.equal(order.sort().values, torch.arange(len(labels)))  # a permutation: each image once


def lrs(tp: TrainParams, steps_per_epoch=10, plateau_losses=None):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tp.lr)
    sched, every = make_scheduler(tp, opt, steps_per_epoch)
    out = []
    for epoch in range(tp.epochs):
        for _ in range(steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if every == "batch":
                sched.step()
        if every == "epoch":
            sched.step(plateau_losses[epoch])
    return out


def test_the_card_records_the_prior_training_weighed_the_classes_by():
    """What a prevalence estimate on new images must start from: 70% pneumonia trained as it comes is 0.7, with
    pos_weight 2 it is 140 / 170, and balanced sampling, auto pos_weight or balanced class weights give each class
    the same mass (three classes: two of them pneumonia)."""
    labels = np.array([0] * 30 + [1] * 70)
    assert trained_prior(TrainParams(), labels, 2) == pytest.approx(0.7)
    assert trained_prior(TrainParams(pos_weight=2.0), labels, 2) == pytest.approx(140 / 170)
    for tp in (TrainParams(sampler="balanced"), TrainParams(pos_weight="auto"), TrainParams(class_weights="balanced")):
        assert trained_prior(tp, labels, 2) == pytest.approx(0.5)
    three = np.array([0] * 30 + [1] * 50 + [2] * 20)
    assert trained_prior(TrainParams(), three, 3) == pytest.approx(0.7)
    assert trained_prior(TrainParams(sampler="balanced"), three, 3) == pytest.approx(2 / 3)
    images = np.zeros((100, 8, 8), dtype=np.uint8)
    card = make_card(TrainParams(sampler="balanced"), Split(images, labels, [{}] * 100), ["NORMAL", "PNEUMONIA"])
    assert card.prior == 0.5


def test_schedules():
    warm = lrs(TrainParams(lr=0.1, epochs=5, scheduler="cosine", warmup_epochs=1))
    assert warm[0] == pytest.approx(0.001) and warm[:10] == sorted(warm[:10])  # warm-up rises from lr/100
    # 10 steps an epoch: the warm-up ends at step 10 on the full lr, the cosine is at half of it halfway
    # through the 40 steps after, and falls to ~0 at the last
    assert warm[10] == max(warm) == pytest.approx(0.1) and warm[30] == pytest.approx(0.05)
    assert warm[10:] == sorted(warm[10:], reverse=True) and warm[-1] < 0.001
    assert lrs(TrainParams(lr=0.1, epochs=3)) == [0.1] * 30
    one = lrs(TrainParams(lr=0.1, epochs=5, scheduler="onecycle"))
    assert max(one) == pytest.approx(0.1) and one[0] < 0.01 and one[-1] < 1e-4
    plateau = lrs(TrainParams(lr=0.1, epochs=6, scheduler="plateau", patience=2), 1, [1, 1, 1, 1, 1, 1])
    assert plateau[0] == 0.1 and plateau[-1] < 0.1


def test_binary_loss_equals_two_class_cross_entropy_with_weights_or_smoothing():
    labels = np.array([0] * 10 + [1] * 30)
    logits, y = torch.randn(40, 1, generator=torch.Generator().manual_seed(0)), torch.from_numpy(labels)
    two = torch.cat([torch.zeros_like(logits), logits], 1)  # softmax([0, z]) = sigmoid(z)
    cpu = torch.device("cpu")
    weighted = make_loss(TrainParams(class_weights="balanced"), labels, 2, cpu)(logits, y)
    assert weighted.item() == pytest.approx(F.cross_entropy(two, y, weight=torch.tensor([40 / 20, 40 / 60])).item(),
                                            rel=1e-5)
    smoothed = make_loss(TrainParams(label_smoothing=0.1), labels, 2, cpu)(logits, y)
    assert smoothed.item() == pytest.approx(F.cross_entropy(two, y, label_smoothing=0.1).item(), rel=1e-5)
    with pytest.raises(CxrError, match="pos_weight is for binary labels"):
        make_loss(TrainParams(pos_weight=2.0), np.array([0, 1, 2]), 3, torch.device("cpu"))


def tiny_split(n, seed, size=32, classes=2):
    """Images whose brightness tells the class: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = np.clip(rng.normal(80 + 40 * labels[:, None, None], 30, (n, size, size)), 0, 255).astype(np.uint8)
    return Split(images, labels.astype(np.int64), [{} for _ in range(n)])


def run_fit(train, val, tp, seed, n_classes=2, **kw):
    card = make_card(tp, train, ["NORMAL", "PNEUMONIA"] if n_classes == 2 else ["NORMAL", "BACTERIA", "VIRUS"])
    return fit(train, val, tp, card, seed, **kw)


def test_freeze_trains_only_the_head_then_everything():
    states = []
    tp = TrainParams(arch="resnet18", epochs=3, freeze_epochs=1, batch_size=16, patience=9)
    model, _ = run_fit(tiny_split(48, 0), tiny_split(16, 1), tp, seed=0, save_state=lambda s: states.append(
        copy.deepcopy(s["model"])))
    torch.manual_seed(0)
    init = run_fit(tiny_split(48, 0), tiny_split(16, 1), TrainParams(arch="resnet18", epochs=1, lr=0.0,
                                                                  batch_size=16), seed=0)[0].state_dict()
    assert torch.equal(states[0]["net.conv1.weight"], init["net.conv1.weight"])  # epoch 1: base frozen
    # ...BatchNorm statistics too (a frozen Keras base keeps them), as built: mean 0, variance 1
    assert torch.equal(states[0]["net.layer1.0.bn1.running_mean"], torch.zeros(64))
    assert torch.equal(states[0]["net.bn1.running_var"], torch.ones(64))
    assert not torch.equal(states[1]["net.bn1.running_var"], torch.ones(64))  # epoch 2: they follow the data
    assert not torch.equal(states[0]["net.fc.weight"], init["net.fc.weight"])  # ...the head learns
    assert not torch.equal(states[1]["net.conv1.weight"], states[0]["net.conv1.weight"])  # epoch 2: all learn
    with pytest.raises(CxrError, match="has no pretrained base to freeze"):
        run_fit(tiny_split(8, 0), tiny_split(8, 1), TrainParams(arch="tinyvgg", freeze_epochs=1), seed=0)


def test_resume_from_a_saved_state_ends_identically_on_cpu():
    tp = TrainParams(arch="cnn5", epochs=4, batch_size=16, patience=9, augment=True, scheduler="cosine",
                     warmup_epochs=1, model={"filters": [8, 8, 16]}, aug_scale=0.1, aug_gamma=0.2, aug_noise=0.02,
                     mixup=0.2, sampler="balanced", ema=0.9)
    train, val = tiny_split(64, 0, classes=3), tiny_split(24, 1, classes=3)
    whole, history = run_fit(train, val, tp, seed=5, n_classes=3)
    saved = []

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # as a Ctrl-C right after epoch 2

    with pytest.raises(KeyboardInterrupt):
        run_fit(train, val, tp, seed=5, n_classes=3, on_epoch=stop_after_two, save_state=saved.append)
    buf = io.BytesIO()
    torch.save(saved[-1], buf)  # the state must survive the file round trip, with weights_only loading
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["epoch"] == 2
    resumed, history2 = run_fit(train, val, tp, seed=5, n_classes=3, state=state)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]  # noqa: E731
    assert strip(history2) == strip(history)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(),
                                                   strict=True))


def test_patience_0_switches_early_stopping_off():
    tp = TrainParams(arch="mlp", epochs=5, patience=0, lr=0.5, batch_size=16)  # a high lr: val loss goes up
    _, history = run_fit(tiny_split(48, 0), tiny_split(16, 1), tp, seed=0)
    assert len(history) == 5 and min(range(5), key=lambda i: history[i]["val_loss"]) < 4


def test_states_are_written_every_n_epochs_off_the_training_thread(tmp_path):
    tp = TrainParams(arch="cnn5", epochs=5, batch_size=16, patience=9, checkpoint_every=2,
                     model={"filters": [8, 8, 16]})
    path = tmp_path / "state.pt"
    writer = StateWriter(path, {"fingerprint": "f"})
    threads, written = [], []

    def save(state):
        writer(state)
        threads.append(writer._thread.ident)
        writer.wait()
        written.append(read_state(path, "f")["epoch"])

    run_fit(tiny_split(48, 0), tiny_split(16, 1), tp, seed=0, save_state=save)
    assert written == [2, 4]  # every 2nd epoch, none after the last
    assert threading.get_ident() not in threads
    assert read_state(path, "other settings") is None


def test_with_ema_the_moving_average_is_evaluated_early_stopped_on_and_kept():
    tp = TrainParams(arch="cnn5", epochs=3, batch_size=16, patience=0, ema=0.9, lr=0.01,
                     model={"filters": [8, 8, 16]})
    train, val = tiny_split(64, 0), tiny_split(32, 1)
    states = []
    model, history = run_fit(train, val, tp, seed=0, save_state=states.append)
    raw, average = states[0]["model"], {k.removeprefix("module."): v for k, v in states[0]["ema"].items()
                                        if k.startswith("module.")}
    assert raw.keys() == average.keys() and not torch.equal(raw["net.0.weight"], average["net.0.weight"])
    x = torch.from_numpy(val.images[:, None].astype(np.float32) / 255)
    with torch.no_grad():
        loss = F.binary_cross_entropy_with_logits(model.eval()(x).reshape(-1), torch.from_numpy(val.labels).float())
    assert loss.item() == pytest.approx(min(r["val_loss"] for r in history), rel=1e-4)


def conv_modes(tp, **kw):
    """(training, output dtype, channels_last input) of every convolution a short fit runs, and the fit's
    (model, history)."""
    seen = set()

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels > 1:  # 1 channel is both layouts at once
            seen.add((module.training, output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        model, history = run_fit(tiny_split(64, 0), tiny_split(32, 1), tp, seed=0, **kw)
    finally:
        handle.remove()
    return seen, model, history


def test_the_cuda_path_runs_on_cpu_in_bf16_autocast_with_channels_last():
    """The GPU's training settings, on the CPU: convolutions get channels_last input and give bf16 in training
    steps, evaluation stays float32, and the model that comes out is plain float32 and contiguous."""
    seen, model, history = conv_modes(TrainParams(arch="tinyvgg", epochs=3, batch_size=16, patience=0), mode=FAST)
    assert seen == {(True, torch.bfloat16, True), (False, torch.float32, True)}
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert history[-1]["val_accuracy"] >= 0.9  # it learns: brightness tells the class


def test_cpu_bf16_picks_the_arch_s_measured_mode_where_the_cpu_has_native_bf16():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native = native_bf16()
    assert native == any(torch.cpu.get_capabilities().get(f) for f in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))
    assert training_mode(cpu, "xrnet", "auto") == (FAST if native else FLOAT32)
    assert training_mode(cpu, "resnet50", "auto") == (CPU_MODES.get("resnet50", FLOAT32) if native else FLOAT32)
    assert training_mode(cpu, "linear", "on") == FAST and training_mode(cpu, "xrnet", "off") == FLOAT32
    assert training_mode(cuda, "linear", "off") == FAST  # the setting is the CPU's: a GPU always trains in bf16
    # what fit does with it: bf16 channels_last convolutions in training steps, or plain float32
    tp = TrainParams(arch="tinyvgg", epochs=1, batch_size=16, patience=0)

    def in_training(tp):
        return {mode for mode in conv_modes(tp)[0] if mode[0]}

    assert in_training(tp) == {(True, torch.bfloat16 if native else torch.float32, native)}
    assert in_training(dataclasses.replace(tp, cpu_bf16="off")) == {(True, torch.float32, False)}
    assert in_training(dataclasses.replace(tp, cpu_bf16="on")) == {(True, torch.bfloat16, True)}


def test_bf16_training_on_the_cpu_is_repeatable_and_learns():
    tp = TrainParams(arch="xrnet", epochs=3, batch_size=16, patience=0, augment=True, ema=0.9)
    train, val = tiny_split(96, 0, size=64), tiny_split(32, 1, size=64)
    a, history = run_fit(train, val, tp, seed=0, mode=FAST)
    b, _ = run_fit(train, val, tp, seed=0, mode=FAST)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert history[-1]["val_auroc"] > 0.9


def test_compile_with_inductor_on_cpu_trains_what_eager_trains():
    tp = TrainParams(arch="mlp", epochs=2, batch_size=16, patience=0, model={"hidden_units": 16})
    train, val = tiny_split(64, 0, size=16), tiny_split(16, 1, size=16)
    eager, h1 = run_fit(train, val, tp, seed=0)
    compiled, h2 = run_fit(train, val, dataclasses.replace(tp, compile=True), seed=0)
    assert [r["val_loss"] for r in h2] == pytest.approx([r["val_loss"] for r in h1], rel=1e-4)
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_state_written_on_a_gpu_resumes_on_the_cpu_with_augmentation_reseeded(caplog):
    tp = TrainParams(arch="tinyvgg", epochs=3, batch_size=16, patience=0, augment=True)
    train, val = tiny_split(48, 0), tiny_split(16, 1)
    saved = []

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fit(train, val, tp, seed=2, on_epoch=stop_after_one, save_state=saved.append)
    # What a CUDA run writes: a Philox generator state (16 bytes) for augmentation, and the CUDA RNG's.
    cpu_state = copy.deepcopy(saved[-1])  # resuming trains the optimizer's state tensors in place: a copy each
    state = copy.deepcopy(cpu_state) | {"aug_device": "cuda", "aug_rng": torch.zeros(16, dtype=torch.uint8),
                         "cuda_rng": torch.zeros(16, dtype=torch.uint8)}
    with caplog.at_level("INFO"):
        resumed, history = run_fit(train, val, tp, seed=2, state=state)
    assert "written on cuda: augmentation reseeded" in caplog.text
    assert [r["epoch"] for r in history] == [1, 2, 3]
    # The stream it went on with is a CPU generator seeded from the shuffle state and the epoch: the same
    # state with that generator written in (as a CPU state) ends with the same weights, and the CPU state
    # as saved (augmentation not reseeded) ends elsewhere.
    seeded = torch.Generator().manual_seed(int(cpu_state["shuffle_rng"].sum()) + cpu_state["epoch"])
    same, _ = run_fit(train, val, tp, seed=2, state=copy.deepcopy(cpu_state) | {"aug_rng": seeded.get_state()})
    other, _ = run_fit(train, val, tp, seed=2, state=copy.deepcopy(cpu_state))
    weights = [torch.cat([w.flatten().float() for w in m.state_dict().values()]) for m in (resumed, same, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_pretrained_variants_start_from_the_imagenet_weights(tmp_path, monkeypatch):
    """With the weights file in torch's hub cache (here a stand-in, built in the test, under the file name
    torchvision looks for), training starts from it: a base kept frozen ends with exactly its weights."""
    import torchvision

    from cxr.models.zoo import _weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    imagenet = torchvision.models.resnet18()
    file = _weights("resnet18")[1]
    file.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), file)
    tp = TrainParams(arch="resnet18", epochs=1, freeze_epochs=1, batch_size=16, model={"pretrained": True})
    model, _ = run_fit(tiny_split(32, 0), tiny_split(16, 1), tp, seed=0)
    for name in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "layer3.0.downsample.0.weight"):
        assert torch.equal(model.net.state_dict()[name], imagenet.state_dict()[name]), name


@pytest.mark.parametrize(("n", "batch", "world"), [(5216, 32, 8), (5216, 16, 8), (5216, 64, 8), (97, 19, 4),
                                                   (3, 16, 4)])
def test_every_rank_steps_every_batch_and_the_ranks_train_each_image_once(n, batch, world):
    """The data-parallel plan on the Kaggle training split's size: the old one (image i on rank i % world)
    skipped every batch where a rank held none (9.7% of them at batch 32 on 8 ranks); here every rank steps
    every batch, and the ranks' parts of a batch are that batch, each image once."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    plans = [ddp.steps(order, batch, torch.device("cpu"), world, r) for r in range(world)]
    assert {len(p) for p in plans} == {math.ceil(n / batch)}  # no batch skipped, on any rank
    for i, parts in enumerate(zip(*plans, strict=True)):
        batch_i = parts[0].batch
        taken = torch.cat([p.images for p in parts])
        assert sorted(taken.tolist()) == sorted(batch_i.tolist()) and len(taken) == len(batch_i), i
        for p in parts:
            assert torch.equal(batch_i[p.rows], p.images)
    assert torch.equal(torch.cat([s.images for s in ddp.steps(order, batch, torch.device("cpu"), 1, 0)]), order)
