"""DVC stage `grayscale`: decode every image once into 8-bit gray arrays (params `gray`, `data.on_bad_image`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.data.gray import grayscale


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    grayscale(Path(args.raw), Path(args.out), p.gray, p.data.on_bad_image, Path(args.report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--out", default="data/gray")
    parser.add_argument("--report", default="reports/grayscale.json", help="counts and skipped images")
    cli.run(main, parser)
