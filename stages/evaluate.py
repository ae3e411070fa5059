"""DVC stage `evaluate@<variant>`: test metrics, curves and the model, into files and the variant's MLflow run."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.evaluation.variant import evaluate_variant


def main(args: argparse.Namespace) -> None:
    evaluate_variant(params.load(args.params), args.variant, Path(args.data), Path(args.model_dir),
                     Path(args.reports))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant")
    parser.add_argument("--data", default="data/split")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--reports", required=True)
    cli.run(main, parser)
