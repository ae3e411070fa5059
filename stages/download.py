"""DVC stage `download`: fetch the hub dataset, or record a local source (params `data`)."""

import argparse
from pathlib import Path

from cxr import cli, params
from cxr.data.sources import download
from cxr.models import check_variants


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    check_variants(p)  # the first stage: a bad variant fails here, before the data stages' work
    download(p.data, Path(args.out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/raw")
    cli.run(main, parser)
