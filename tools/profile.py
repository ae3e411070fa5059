"""`cxr run --profile` as it was called before it existed (docs/results.md's commands): run the pipeline with a
profile, configs/<profile>.yaml, as one DVC experiment (cxr.profiles). DATA is a Kaggle-style folder or a
MedMNIST .npz; empty means the hub. The workspace is left as the experiment, params.yaml included."""

import argparse

from cxr import cli, profiles


def main(args: argparse.Namespace) -> None:
    profiles.run(args.profile, args.data, args.name, tuple(args.set))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", help="configs/<profile>.yaml: quick, cpu-best")
    parser.add_argument("--data", default="", help="a Kaggle-style folder or a MedMNIST .npz; empty: the hub")
    parser.add_argument("--name", default="", help="the DVC experiment's name (default: the profile's)")
    parser.add_argument("-S", "--set", action="append", default=[], help="more overrides, after the profile's")
    cli.run(main, parser)
