"""Worker for tests/test_scale.py: `fit` on real X-rays (the first images of each class of the Kaggle train
split, at 32 px), run as one process or under torchrun; rank 0 saves the weights and history to argv[1].
argv[2] is the TrainParams as JSON, argv[3] the shared chest_xray_224 folder. SAVE_STATE=FILE keeps the first
resume state there; RESUME_STATE=FILE starts from one.

Without augmentation and mixup, the images the model is trained on are counted: each training forward's rows are
matched to the training images by their bytes, per epoch and over every rank, and saved as "trained"."""

import collections
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from cxr.data.store import Split
from cxr.inference import ModelCard
from cxr.params import TrainParams
from cxr.training import ddp
from cxr.training.loop import fit, make_card


def real_split(root: Path, start: int, per_class: int) -> Split:
    rows = [r for r in csv.DictReader((root / "MANIFEST.csv").open()) if r["split"] == "train"]
    picked = [r for c in ("NORMAL", "PNEUMONIA") for r in [r for r in rows if r["label"] == c][start:start + per_class]]
    images = np.stack([np.asarray(Image.open(root / r["path"]).convert("L").resize((32, 32), Image.BILINEAR))
                       for r in picked])
    labels = np.array([int(r["label"] == "PNEUMONIA") for r in picked])
    return Split(images, labels, [{} for _ in picked])


if __name__ == "__main__":
    # float32 unless asked: the tests' equality to 1e-4 holds there; in bf16 each rank would round its half-batch
    # weight gradients before the all-reduce adds them, where one process rounds the whole batch's sum once.
    out, tp = Path(sys.argv[1]), TrainParams(**{"cpu_bf16": "off", **json.loads(sys.argv[2])})
    root = Path(sys.argv[3])
    train, val = real_split(root, 0, 48), real_split(root, 48, 16)
    states: list[dict] = []
    resume = os.environ.get("RESUME_STATE")
    counting = not (tp.augment or tp.mixup)
    epochs: list[collections.Counter] = []  # per epoch: how often each training image went through a training step
    keys = {img.tobytes(): i for i, img in enumerate(train.images)}
    assert len(keys) == len(train.images)  # no two images alike, so bytes name an image

    def count(module: torch.nn.Module, args: tuple) -> None:
        if module.training and counting:
            epochs[-1].update(keys[row.tobytes()] for row in (args[0][:, 0] * 255).round().byte().numpy())

    build, plan = ModelCard.build, ddp.steps

    def hooked(card: ModelCard, start: bool = False):
        model = build(card, start)
        model.register_forward_pre_hook(count)
        return model

    def epoch_plan(*args):  # fit asks for one plan per epoch
        epochs.append(collections.Counter())
        return plan(*args)

    ModelCard.build, ddp.steps = hooked, epoch_plan

    with ddp.process_group():
        model, history = fit(train, val, tp, make_card(tp, train, ["NORMAL", "PNEUMONIA"]), seed=3,
                             state=torch.load(resume, weights_only=True) if resume else None,
                             save_state=states.append)
        every = [epochs]
        if ddp.world_size() > 1:
            every = [None] * ddp.world_size()
            dist.all_gather_object(every, epochs)
        trained = [sum((rank[e] for rank in every), collections.Counter()) for e in range(len(epochs))]
        if ddp.rank() == 0:
            torch.save({"weights": model.state_dict(), "history": history, "world": ddp.world_size(),
                        "trained": [[c[i] for i in range(len(train.labels))] for c in trained] if counting else None},
                       out)
            if os.environ.get("SAVE_STATE"):
                torch.save(states[0], os.environ["SAVE_STATE"])
