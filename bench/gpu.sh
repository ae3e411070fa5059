#!/usr/bin/env bash
# Everything that needs a GPU, in one call (the device machine: `bash bench/gpu.sh`; nothing here runs in CI):
# the CUDA tests (float32 evaluation against the CPU), then training speed, eager and compiled.
set -u
python -m pytest -q -m gpu tests/ 2>&1 | tail -5
python bench/train_speed.py --archs resnet18,resnet50,vgg16,efficientnet_b0,vit_b_16
python bench/train_speed.py --archs resnet18,efficientnet_b0 --compile
