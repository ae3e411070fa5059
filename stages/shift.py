"""DVC stage `shift`: can validation speak for the test set? The report of cxr.shift on the prepared validation
split against test, before any model trains: image statistics and a domain classifier on the images
(reports/shift.json and the figure reports/shift.png). The compare stage repeats its verdict."""

import argparse
import sys
from pathlib import Path

from cxr import cli, params, shift


def main(args: argparse.Namespace) -> None:
    size = params.load(args.params).gray.image_size
    report = shift.shift_report(*(shift.load_set(f"{args.data}:{name}", size) for name in ("val", "test")))
    shift.write(report, Path(args.out))
    sys.stdout.write(shift.render(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/split")
    parser.add_argument("--out", default="reports")
    cli.run(main, parser)
