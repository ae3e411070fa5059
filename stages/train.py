"""DVC stage `train@<variant>`: train one variant (params `train` overlaid with `models.<variant>`)."""

import argparse
import sys
from pathlib import Path

from cxr import cli, params
from cxr.errors import CxrError
from cxr.training import ddp
from cxr.training.variant import train_variant


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    n = ddp.device_count(p.variant(args.variant).devices)
    if n > 1 and not ddp.launched():  # this same command again, as n torchrun processes
        if code := ddp.launch(n, sys.argv):
            raise CxrError(f"train@{args.variant}: torchrun exited with {code} (see the ranks' errors above)")
        return
    with ddp.process_group():
        train_variant(p, args.variant, Path(args.data), Path(args.model_dir), Path(args.reports),
                      Path(args.checkpoints))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant")
    parser.add_argument("--data", default="data/split")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--reports", required=True)
    parser.add_argument("--checkpoints", required=True, help="resume state, kept outside DVC's outputs")
    cli.run(main, parser)
