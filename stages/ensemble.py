"""DVC stage `ensemble@<name>`: average the probabilities of `ensembles.<name>`'s variants as one model, log
it as an MLflow run and evaluate it like a variant."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.evaluation.ensemble import run_ensemble


def main(args: argparse.Namespace) -> None:
    run_ensemble(params.load(args.params), args.name, Path(args.data), Path(args.models), Path(args.model_dir),
                 Path(args.reports))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name")
    parser.add_argument("--data", default="data/split")
    parser.add_argument("--models", default="models", help="the variants' model folders")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--reports", required=True)
    cli.run(main, parser)
