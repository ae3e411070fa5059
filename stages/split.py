"""DVC stage `split`: train/val/test with balancing and a duplicate and leakage report (params `split`,
`data.labels`); with split.val_by auto, validation carved the way whose images look most like test's."""

import argparse
from pathlib import Path

from cxr import cli, params, shift
from cxr.data.split import split


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    split(Path(args.gray), Path(args.out), p.split, p.seed, p.data.labels, Path(args.report), shift.likeness)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gray", default="data/gray")
    parser.add_argument("--out", default="data/split")
    parser.add_argument("--report", default="reports/split.json")
    cli.run(main, parser)
