"""The jobs a user runs on what the pipeline made: promotion through the registry (`cxr promote`), prediction
(`cxr predict`, `cxr explain`), the experiments' table (`cxr results`), the pipeline run with its params checked
and put back on failure (`cxr run`), and scheduled retraining (`cxr retrain`). They import the library below
them (training, evaluation, inference, ...); nothing below imports them."""
