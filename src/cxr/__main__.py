"""The `cxr` command: run the pipeline as a DVC experiment, promote after it, predict with the champion, compare
the experiments, retrain (pipeline and promotion, as CI does), explain what drove a prediction, serve the champion
and monitor what it was sent."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cxr import cli, params, tracking
from cxr.errors import CxrError


def _images(args: argparse.Namespace) -> tuple[str, list[Path], list[str]]:
    """The model URI and the image files of `cxr predict` / `cxr explain`, and the names that match nothing:
    checked before the model loads (seconds), so that a typo fails at once."""
    from cxr.data.sources import IMAGE_SUFFIXES
    from cxr.jobs.predict import expand

    p = params.load(args.params)
    paths, missing = expand(args.images)
    if not paths:
        raise CxrError("; ".join(missing) or
                       f"no images in {' '.join(args.images)} ({'/'.join(sorted(IMAGE_SUFFIXES))} files, or DICOMs)")
    tracking.setup(p.mlflow.experiment)
    return _model_uri(args, p), paths, missing


def _model_uri(args: argparse.Namespace, p: params.Params) -> str:
    """--model, or the registered champion."""
    return args.model or tracking.model_uri(p.mlflow.registered_model)


def _unread(errors: list[str]) -> None:
    if errors:
        raise CxrError("; ".join(errors) + ("" if len(errors) == 1 else f" ({len(errors)} images)"))


def _predict(args: argparse.Namespace) -> None:
    from cxr.jobs.predict import model_facts, predict, render, summary

    uri, paths, missing = _images(args)
    rows, errors, card = predict(uri, paths)
    if rows:  # none readable: the error alone, no empty table
        fmt = "json" if args.json else "csv" if args.csv else "table"
        sys.stdout.write(render(rows, card, uri, fmt))
        sys.stdout.flush()
        # the counts and the model's operating point: under the table, or on stderr where stdout is data
        (sys.stdout if fmt == "table" else sys.stderr).write(summary(rows, card, model_facts(uri)))
    _unread(missing + errors)


def _explain(args: argparse.Namespace) -> None:
    from cxr.jobs.predict import explain_images

    uri, paths, missing = _images(args)
    lines, errors = explain_images(uri, paths, Path(args.out))
    if lines:
        print("\n".join(lines))
    _unread(missing + errors)


def _shift(args: argparse.Namespace) -> None:
    from cxr import shift
    from cxr.inference import load_logged

    model = card = None
    size, strict = args.size, False
    if not args.no_model:
        p = params.load(args.params)
        tracking.setup(p.mlflow.experiment)
        model, card = load_logged(_model_uri(args, p))
        size, strict = card.image_size, p.tracking.privacy == "strict"
    sets = [shift.load_set(spec, size, strict=strict) for spec in (args.reference, args.target)]
    report = shift.shift_report(*sets, model, card)
    shift.write(report, Path(args.out))
    sys.stdout.write(shift.render(report) + f"Report and figure: {args.out}/shift.json, {args.out}/shift.png\n")


def _promote(args: argparse.Namespace) -> None:
    from cxr.jobs.promote import promote

    record = promote(params.load(args.params), Path(args.reports), Path(args.data), Path(args.out),
                     Path(args.comparison))
    print(f"{record['decision']}: {record['reason']}")


def _results(args: argparse.Namespace) -> None:
    from cxr.jobs.results import show

    sys.stdout.write(show(params.load(args.params).promote.metric, args.variants))


def _run(args: argparse.Namespace) -> None:
    from cxr.jobs.experiment import run

    run(args.profile, args.data, args.name, tuple(args.set), args.force)


def _retrain(args: argparse.Namespace) -> None:
    from cxr.jobs.retrain import retrain

    text, record = retrain(params.load(args.params), args.refresh_data, Path(args.reports), Path(args.data),
                           Path(args.comparison), Path(args.out), args.profile, args.source)
    print(text)
    target = args.summary or os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        with open(target, "a") as f:
            f.write(text + "\n")
    if record["decision"] == "stopped":  # a failed job: someone looks at the shift before anything is promoted
        raise CxrError(f"promotion stopped (retrain.on_shift: stop): {record['shift']['verdict']}; see "
                       "shift/shift.png, then `cxr promote` to promote anyway, or set retrain.on_shift: warn")


def _serve(args: argparse.Namespace) -> None:
    from cxr.jobs.serve import serve

    p = params.load(args.params)
    tracking.setup(p.mlflow.experiment)
    code = serve(_model_uri(args, p), p.serve, args.host, args.port or p.serve.port, args.workers)
    if code:
        sys.exit(code)


def _monitor(args: argparse.Namespace) -> None:
    from cxr.jobs.monitor import monitor

    p = params.load(args.params)
    tracking.setup(p.mlflow.experiment)
    code = monitor([Path(x) for x in args.logs], _model_uri(args, p), args.reference, args.window, Path(args.out),
                   p.mlflow.experiment, since=args.since)
    if code:
        sys.exit(code)


MODEL_HELP = "an MLflow model URI (default: models:/<mlflow.registered_model>@champion)"
IMAGES_HELP = "image files, folders (searched recursively), globs"


def _image_commands(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """`cxr predict` and `cxr explain`: images in, per image a row or a PNG."""
    pr = sub.add_parser("predict", help="P(pneumonia) and the decision per image, from the registered champion")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help=IMAGES_HELP)
    pr.add_argument("--model", help=MODEL_HELP)
    fmt = pr.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per image and line")
    fmt.add_argument("--csv", action="store_true", help="CSV, a header then one row per image")
    pr.set_defaults(func=_predict)
    ex = sub.add_parser("explain", help="per image, a PNG of what drove P(pneumonia): Grad-CAM for convolutional "
                        "models, the input gradient for the others, with the prediction")
    ex.add_argument("images", nargs="+", metavar="IMAGE", help=IMAGES_HELP)
    ex.add_argument("--model", help=MODEL_HELP)
    ex.add_argument("--out", default="explanations", help="folder for the PNGs (default: explanations)")
    ex.set_defaults(func=_explain)
    return [pr, ex]


def _promotion_commands(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """`cxr promote` and `cxr retrain`, which promotes after `dvc repro`; the first alone takes --params (retrain's
    `dvc repro` reads params.yaml)."""
    parsers = {}
    for name, func, text in (("promote", _promote, "register the last run's best variant (val); make it champion "
                              "if it beats the current one on test"),
                             ("retrain", _retrain, "dvc repro, then promote, then a markdown summary")):
        sp = parsers[name] = sub.add_parser(name, help=text)
        sp.add_argument("--reports", default="reports")
        sp.add_argument("--data", default="data/split")
        sp.add_argument("--out", default="promotion.json", help="the decision as JSON")
        sp.add_argument("--comparison", default="comparison", help="the last run's compare stage output (its "
                        "leaderboard lists the variants that ran)")
        sp.set_defaults(func=func)
    rt = parsers["retrain"]
    rt.add_argument("--refresh-data", action="store_true", help="re-run download even if its params are unchanged")
    rt.add_argument("--profile", default="", help="run configs/<profile>.yaml (e.g. quick, for a CPU) instead of "
                    "params.yaml as it is; its params stay in params.yaml")
    rt.add_argument("--source", default="", help="with --profile: a Kaggle-style folder or .npz (default: the hub)")
    rt.add_argument("--summary", help="append the summary here (default: $GITHUB_STEP_SUMMARY when set)")
    return [parsers["promote"]]


def _experiment_commands(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """`cxr run` and `cxr results`: the DVC experiments, run and compared."""
    ru = sub.add_parser("run", help="dvc exp run with -S overrides, checked before DVC touches anything; the "
                        "workspace becomes the experiment (params.yaml included), or stays as it was on failure")
    ru.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params.yaml override, as `dvc exp run -S` takes it (repeatable; after the profile's)")
    ru.add_argument("--profile", default="", help="configs/<profile>.yaml first: quick, cpu-best")
    ru.add_argument("--data", default="", help="a Kaggle-style folder or a MedMNIST .npz (with --profile, "
                    "empty means the hub)")
    ru.add_argument("-n", "--name", default="", help="the DVC experiment's name (default: the profile's, or DVC's)")
    ru.add_argument("-f", "--force", action="store_true", help="run every stage again, even unchanged ones")
    ru.set_defaults(func=_run)
    rs = sub.add_parser("results", help="the DVC experiments' test scores within the terminal's width: each "
                        "one's best variant by validation, or --variants")
    rs.add_argument("--variants", action="store_true", help="one row per experiment and variant")
    rs.set_defaults(func=_results)
    return [rs]


def _shift_command(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    sh = sub.add_parser("shift", help="are TARGET's images what REFERENCE's are? image statistics, and the model's "
                        "scores and features (a domain classifier), with a verdict")
    for name in ("reference", "target"):
        sh.add_argument(name, help="a prepared split (data/split:test), a folder of images or a .npz[:split]")
    sh.add_argument("--model", help=MODEL_HELP)
    sh.add_argument("--no-model", action="store_true", help="image statistics only")
    sh.add_argument("--size", type=int, default=128, help="image size with --no-model (default 128)")
    sh.add_argument("--out", default="shift", help="folder for shift.json and shift.png (default: shift)")
    sh.set_defaults(func=_shift)
    return [sh]


def _serving_commands(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """`cxr serve` and `cxr monitor`: the champion over HTTP, and what its prediction log says of its inputs."""
    se = sub.add_parser("serve", help="check a registered version (its code is the project's, its weights are "
                        "tensors), then serve it over HTTP with the limits of params.yaml's serve section")
    se.add_argument("-m", "--model", help="a registered version, models:/<name>@<alias> or models:/<name>/<version> "
                    "(default: the champion)")
    se.add_argument("-p", "--port", type=int, default=0, help="default: serve.port in params.yaml")
    se.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 to answer other machines")
    se.add_argument("--workers", type=int, default=1, help="server processes (default 1; each holds the model and "
                    "its serve.decode_slots)")
    se.set_defaults(func=_serve)
    mo = sub.add_parser("monitor", help="windows of the prediction log against the model's validation set: "
                        "scores, positive rate, image statistics, estimated sensitivity and specificity; exit 3 "
                        "where more windows alerted than chance explains")
    mo.add_argument("logs", nargs="+", metavar="LOG", help="prediction log files or folders ($CXR_PREDICTION_LOG)")
    mo.add_argument("--model", help=MODEL_HELP)
    mo.add_argument("--reference", default="data/split:val", help="the images to compare with (default: "
                    "data/split:val, the champion's validation set)")
    mo.add_argument("--window", type=int, default=100, help="log lines per window (default 100)")
    mo.add_argument("--since", default="", help="only the lines from this UTC date or time on (2026-12-01, "
                    "2026-12-01T08:00)")
    mo.add_argument("--out", default="monitor", help="folder for monitor.json and monitor.png (default: monitor)")
    mo.set_defaults(func=_monitor)
    return [se, mo]


def main() -> None:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    reads_params = [*_image_commands(sub), *_promotion_commands(sub), *_experiment_commands(sub),
                    *_shift_command(sub), *_serving_commands(sub)]
    for sp in reads_params:  # --params also after the command
        sp.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: params.yaml)")
    cli.run(lambda a: a.func(a), parser)


if __name__ == "__main__":
    sys.exit(main())
