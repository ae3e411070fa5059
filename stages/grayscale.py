"""DVC stage `grayscale`: decode every image once into 8-bit gray arrays (params `gray`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.data.gray import grayscale


def main(args: argparse.Namespace) -> None:
    grayscale(Path(args.raw), Path(args.out), params.load(args.params).gray)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--out", default="data/gray")
    cli.run(main, parser)
