"""Chest X-ray pneumonia classification: data stages, models, training, evaluation and tracking."""

LABELS = ("NORMAL", "PNEUMONIA")  # index = label: 0 NORMAL, 1 PNEUMONIA, as in the Hugging Face dataset
# data.labels: three_class splits PNEUMONIA by the cause in Kaggle file names (report D's task).
CLASSES = {"binary": LABELS, "three_class": ("NORMAL", "BACTERIA", "VIRUS")}
SPLITS = ("train", "val", "test")
