"""Shared plumbing for the thin stage CLIs: logging, params loading and one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from cxr.errors import CxrError

RESTORES = "CXR_RUN_RESTORES"  # set by `cxr run`, which puts params.yaml and the outputs back itself


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse args, configure logging, run main; a CxrError becomes one line on stderr and exit 1."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main(args)
    except CxrError as e:
        print(f"error: {e}", file=sys.stderr)
        if os.environ.get("DVC_EXP_NAME") and not os.environ.get(RESTORES):  # a plain `dvc exp run`
            print("DVC leaves its -S values in params.yaml and this stage's outputs deleted: `dvc exp apply "
                  "<experiment>` (the one the workspace held, from `dvc exp show`) puts them back; `cxr run -S` "
                  "does it by itself", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; outputs of this stage were not written", file=sys.stderr)
        sys.exit(130)
