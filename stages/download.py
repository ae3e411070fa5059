"""DVC stage `download`: fetch the hub dataset, or record a local source (params `data`)."""

import argparse
import logging
from pathlib import Path

from cxr import cli, params
from cxr.data.sources import download
from cxr.models import check_variants
from cxr.models.zoo import unavailable_weights

log = logging.getLogger("cxr.download")


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    check_variants(p)  # the first stage: a bad variant that runs fails here, before the data stages' work
    # A warning, not an error: the other variants can still be trained (`dvc repro --keep-going`).
    pretrained = {n: p.variant(n).arch for n in p.variants if p.variant(n).model.get("pretrained")}
    for arch, why in unavailable_weights(pretrained.values()).items():
        names = ", ".join(n for n, a in pretrained.items() if a == arch)
        log.warning("%s will fail at train: %s; put the file there (set TORCH_HOME to move it), set pretrained: "
                    "false, or train the other variants with `dvc repro --keep-going`", names, why)
    download(p.data, Path(args.out), p.tracking.privacy == "strict")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/raw")
    cli.run(main, parser)
