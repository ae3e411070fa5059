"""DVC stage `download`: fetch the hub dataset, or record a local source (params `data`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.data.sources import download


def main(args: argparse.Namespace) -> None:
    download(params.load(args.params).data, Path(args.out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/raw")
    cli.run(main, parser)
