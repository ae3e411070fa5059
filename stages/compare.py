"""DVC stage `compare`: the leaderboard of every variant (params `compare`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.evaluation.compare import leaderboard, write_leaderboard


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    write_leaderboard(leaderboard(p, Path(args.reports)), Path(args.out), p.compare.metric)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--out", default="leaderboard.md")
    cli.run(main, parser)
