"""DVC stage `train@<variant>`: train one variant (params `train` overlaid with `models.<variant>`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.training.variant import train_variant


def main(args: argparse.Namespace) -> None:
    train_variant(params.load(args.params), args.variant, Path(args.data), Path(args.model_dir), Path(args.reports),
                  Path(args.checkpoints))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant")
    parser.add_argument("--data", default="data/split")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--reports", required=True)
    parser.add_argument("--checkpoints", required=True, help="resume state, kept outside DVC's outputs")
    cli.run(main, parser)
