"""DVC stage `compare`: leaderboard and comparison figures of every variant, logged to MLflow too
(params `compare`, `promote.metric`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.evaluation.compare import compare, spread, stage_reports, summary


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    reports = Path(args.reports)
    rows = compare(p, reports, Path(args.out))
    print(summary(rows, p.compare.metric, Path(args.out), spread(p, rows), stage_reports(reports)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--out", default="comparison")
    cli.run(main, parser)
