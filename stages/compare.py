"""DVC stage `compare`: leaderboard and comparison figures of every variant, logged to MLflow too
(params `compare`, `promote.metric`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.evaluation.compare import compare, split_report, spread, summary


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    reports = Path(args.reports)
    rows = compare(p, reports, Path(args.out))
    print(summary(rows, p.compare.metric, Path(args.out), spread(p, rows), split_report(reports)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--out", default="comparison")
    cli.run(main, parser)
