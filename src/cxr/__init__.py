"""Chest X-ray pneumonia classification: data stages, models, training, evaluation and tracking."""

LABELS = ("NORMAL", "PNEUMONIA")  # index = label: 0 NORMAL, 1 PNEUMONIA, as in the Hugging Face dataset
SPLITS = ("train", "val", "test")
