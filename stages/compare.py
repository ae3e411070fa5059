"""DVC stage `compare`: leaderboard and comparison figures of every variant, logged to MLflow too
(params `compare`, `promote.metric`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.evaluation.compare import compare, spread, summary


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    rows = compare(p, Path(args.reports), Path(args.out))
    print(summary(rows, p.compare.metric, Path(args.out), spread(p, rows)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--out", default="comparison")
    cli.run(main, parser)
