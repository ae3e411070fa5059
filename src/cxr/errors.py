"""The one exception type that stage CLIs turn into a one-line error message, and the command that makes what is
missing."""


class CxrError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable service); the message
    names the problem and the fix."""


def run_pipeline() -> str:
    """The pipeline command that fits this machine, for "X is missing; run ..." messages: the full run
    (`dvc repro`, every variant at 224 px) is meant for a GPU; on a CPU the quick profile takes minutes."""
    import torch  # here, not at the top: a stage that never fails need not pay for it

    if torch.cuda.is_available():
        return "`dvc repro`"
    return "`make quick DATA=<folder or .npz>` (minutes on a CPU; `dvc repro` is the full run, for a GPU)"
