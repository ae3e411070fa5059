"""The task's rules, each written once: how many logits a label set needs, logits to probabilities, and
probabilities to the predicted class. Training, metrics, evaluation and predict all call these."""

from __future__ import annotations

import numpy as np
import torch


def n_logits(n_classes: int) -> int:
    """Binary tasks train one logit (BCE on P(PNEUMONIA)); more classes train one logit each."""
    return 1 if n_classes == 2 else n_classes


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N,) P(positive) for one logit, else (N, classes) softmax; float32 whatever the logits' dtype."""
    z = logits.float() / temperature
    return z[:, 0].sigmoid() if z.shape[1] == 1 else z.softmax(1)


def as_threshold(t: float) -> float:
    """A threshold as a float32 value: scores are float32, and a comparison in float32 (torch) and one in
    float64 (Python, after JSON) then agree on every score, which they do not for e.g. 0.3 itself."""
    return float(np.float32(t))


def predicted(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The predicted class: binary when p > threshold, otherwise the argmax class."""
    return (probs > as_threshold(threshold)).long() if probs.ndim == 1 else probs.argmax(1)
