"""``python -m regnet_kernels designspace sample|train|edf``: a design-space study.

* ``sample``: draw a population of a space (optionally restricted to a complexity regime)
  into a JSON file.
* ``train``: train every model of a population with one short regime through the ``train``
  command's own code path (fused kernels by default), one folder per model under ``--out``;
  rerunning skips finished models and resumes an interrupted one from its checkpoint. One
  line per model; the train command's own output goes to each model's ``train.log``. The
  errors go to ``OUT/results.json``: 1 - val top-1 when the data folder has a ``val`` split,
  else 1 - the last epoch's train top-1 (the synthetic set has no validation split).
* ``edf``: the error EDFs of several trained populations, raw and complexity-normalized, in
  one PNG (matplotlib) with the curves in a CSV beside it and the KS distance of every
  population to the first (with a bootstrap interval) in a ``-summary.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .complexity import complexity
from .design import params_from_dict
from .design_analysis import (complexity_bin_edges, complexity_weights, error_edf,
                              ks_bootstrap)
from .design_space import SPACE_NAMES, design_space

RESULTS = "results.json"
METRICS = "metrics.json"
LOG = "train.log"


class StudyError(RuntimeError):
    """A study step that cannot run, with the reason."""


# ---------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, object]:
    """``name=value``: value as JSON, or ``low:high[:step]`` for the integers from low to
    high inclusive (``widths=8:128:8``)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise StudyError(f"--set takes name=value, got {text!r}")
    match = re.fullmatch(r"(\d+):(\d+)(?::(\d+))?", value.strip())
    if match:
        low, high, step = int(match[1]), int(match[2]), int(match[3] or 1)
        return name, tuple(range(low, high + 1, step))
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        raise StudyError(f"--set {name}: {value!r} is neither JSON nor low:high[:step]") from None


def run_sample(args) -> int:
    overrides = dict(parse_override(text) for text in args.set or ())
    try:
        space = design_space(args.space, **overrides)
        if args.flops or args.params or args.acts:
            space = space.restrict(flops=args.flops, params=args.params, acts=args.acts,
                                   resolution=args.resolution, num_classes=args.num_classes)
        networks = space.sample(args.n, seed=args.seed)
    except ValueError as error:
        raise StudyError(f"designspace sample: {error}") from None
    except RuntimeError as error:
        raise StudyError(str(error)) from None
    # ids that do not depend on n: a longer sample (same seed) keeps the shorter one's models
    # and so their trained folders
    width = max(3, len(str(args.n - 1)))
    models = []
    for index, network in enumerate(networks):
        counts = complexity(network, args.resolution, args.num_classes)
        models.append({"id": f"{space.name}-{index:0{width}d}", "params": asdict(network),
                       "complexity": counts})
    population = {"space": space.name, "settings": space.settings(), "seed": args.seed,
                  "resolution": args.resolution, "num_classes": args.num_classes,
                  "size": space.size(), "models": models}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(population, indent=1) + "\n")
    flops = np.array([m["complexity"]["flops"] for m in models]) / 1e6
    summary = (f", {flops.min():.2f}-{flops.max():.2f} MF at {args.resolution}px" if models
               else "")
    print(f"{space.name}: {len(models)} models (space of {space.size():.3g}){summary} -> {out}")
    return 0


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------


def load_population(path: str | Path) -> dict:
    path = Path(path)
    try:
        population = json.loads(path.read_text())
        int(population["resolution"])
        for model in population["models"]:
            params_from_dict(model["params"])
            int(model["complexity"]["flops"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise StudyError(f"{path} is not a population written by `designspace sample`: "
                         f"{error}") from None
    return population


def model_error(metrics: dict) -> tuple[float, str]:
    """(error, which metric it comes from): validation top-1 when there was a val split."""
    if "val_top1" in metrics:
        return 1.0 - metrics["val_top1"], "val_top1"
    return 1.0 - metrics["train_top1"], "train_top1"


def _finished(model_dir: Path, epochs: int) -> dict | None:
    try:
        metrics = json.loads((model_dir / METRICS).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if metrics.get("epochs") == epochs else None


def _describe(params: dict) -> str:
    if "depths" in params:
        return (f"d={params['depths']} w={params['widths']} "
                f"b={[round(1 / r, 2) for r in params['bottleneck_ratios']]} "
                f"g={params['group_widths']}")
    return (f"d={params['depth']} w0={params['w0']} wa={params['wa']} wm={params['wm']} "
            f"b={round(1 / params['bottleneck_ratio'], 2)} g={params['group_width']}")


def run_train(args) -> int:
    from . import train
    population = load_population(args.population)
    out = Path(args.out) if args.out else Path(args.population).with_suffix("")
    if args.resolution is None:  # the resolution the population's complexities are counted at
        args.resolution = population["resolution"]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    models = population["models"]
    for index, model in enumerate(models):
        model_dir = out / model["id"]
        start = time.perf_counter()
        metrics = _finished(model_dir, args.epochs)
        status = "done before"
        if metrics is None:
            model_args = copy.copy(args)
            model_args.model, model_args.params = None, json.dumps(model["params"])
            model_args.out, model_args.resume = str(model_dir), True
            model_dir.mkdir(parents=True, exist_ok=True)
            with open(model_dir / LOG, "a") as log, contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                code = train.run(model_args)
            if code != 0:
                raise StudyError(f"{model['id']}: train failed (exit {code}); see "
                                 f"{model_dir / LOG}")
            metrics = json.loads((model_dir / METRICS).read_text())
            status = f"trained in {time.perf_counter() - start:.1f} s"
        error, metric = model_error(metrics)
        results.append({"id": model["id"], "params": model["params"], "error": error,
                        "metric": metric, "complexity": model["complexity"],
                        "train_time_s": metrics.get("time_s")})
        print(f"[{index + 1}/{len(models)}] {model['id']} {_describe(model['params'])} "
              f"{model['complexity']['flops'] / 1e6:.2f} MF: error {error:.4f} "
              f"(1 - {metric}), {status}", flush=True)
    summary = {"space": population["space"], "population": str(args.population),
               "epochs": args.epochs, "data": args.data, "resolution": args.resolution,
               "fused": args.fused, "models": results}
    (out / RESULTS).write_text(json.dumps(summary, indent=1) + "\n")
    errors = np.array([r["error"] for r in results])
    if len(errors):
        print(f"{population['space']}: {len(errors)} models, error min {errors.min():.4f} "
              f"median {np.median(errors):.4f} -> {out / RESULTS}")
    return 0


# ---------------------------------------------------------------------------
# edf
# ---------------------------------------------------------------------------


def load_results(path: str | Path) -> dict:
    """A ``designspace train`` output folder (or its results.json)."""
    path = Path(path)
    file = path / RESULTS if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
        for model in results["models"]:
            float(model["error"]), int(model["complexity"]["flops"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise StudyError(f"{file} is not a results file of `designspace train`: {error}") \
            from None
    if not results["models"]:
        raise StudyError(f"{file} has no trained models")
    return results


def _labels(args, populations: list[dict]) -> list[str]:
    if args.labels:
        if len(args.labels) != len(populations):
            raise StudyError(f"--labels: {len(args.labels)} labels for {len(populations)} "
                             f"populations")
        return list(args.labels)
    return [p["space"] for p in populations]


CURVE_HEADER = ("population", "model", "error", "complexity", "weight", "edf", "normalized_edf")
SUMMARY_HEADER = ("population", "n", "min_error", "median_error", "normalized_mean_error",
                  "ks", "ks_low", "ks_high", "normalized_ks", "normalized_ks_low",
                  "normalized_ks_high")


def edf_tables(populations: list[dict], labels: list[str], normalize: str = "flops",
               bins: int = 5, resamples: int = 1000, seed: int = 0) -> tuple[list, list]:
    """(curve rows, summary rows) of trained populations (``designspace train`` results).

    Curve rows (:data:`CURVE_HEADER`): each model, by error, with its complexity, its
    normalization weight and the raw and normalized EDFs just after its error. Summary rows
    (:data:`SUMMARY_HEADER`): per population, and its KS distances to the first population
    (raw and normalized, with 95% bootstrap intervals; empty for the first itself).
    """
    errors = [np.array([m["error"] for m in p["models"]], dtype=float) for p in populations]
    cost = [np.array([m["complexity"][normalize] for m in p["models"]], dtype=float)
            for p in populations]
    # bins shared by all: every population is reweighted to the same complexity distribution
    edges = complexity_bin_edges(np.concatenate(cost), bins)
    weights = [complexity_weights(c, edges) for c in cost]
    curves, summary = [], []
    for index, (label, p, e, c, w) in enumerate(zip(labels, populations, errors, cost, weights)):
        after = np.nextafter(e, np.inf)  # F just after each model's own error
        raw, normalized = error_edf(e, after), error_edf(e, after, w)
        for i in np.argsort(e, kind="stable"):
            curves.append([label, p["models"][i]["id"], float(e[i]), int(c[i]), float(w[i]),
                           float(raw[i]), float(normalized[i])])
        row = [label, len(e), float(e.min()), float(np.median(e)),
               float(np.average(e, weights=w))]
        if index == 0:  # the baseline: no distance to itself
            summary.append(row + [None] * 6)
            continue
        for ks in (ks_bootstrap(errors[0], e, resamples=resamples, seed=seed),
                   ks_bootstrap(errors[0], e, weights[0], w, resamples=resamples, seed=seed)):
            row += [ks.distance, ks.low, ks.high]
        summary.append(row)
    return curves, summary


def _write_csv(path: Path, header, rows) -> None:
    def cell(value):
        if value is None:
            return ""
        return f"{value:.6g}" if isinstance(value, float) else value
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([cell(v) for v in row] for row in rows)


def run_edf(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise StudyError(f"--out must name a .png file (the CSVs go beside it), got {out}")
    from .bench.report import require_matplotlib
    try:
        plt = require_matplotlib()  # before any work, so that a missing one fails at once
    except RuntimeError as error:
        raise StudyError(f"designspace edf: {error}") from None
    populations = [load_results(path) for path in args.results]
    labels = _labels(args, populations)
    try:
        curves, summary = edf_tables(populations, labels, args.normalize, args.bins,
                                     args.resamples, args.seed)
    except ValueError as error:
        raise StudyError(f"designspace edf: {error}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    curves_path, summary_path = out.with_suffix(".csv"), out.with_name(out.stem + "-summary.csv")
    _write_csv(curves_path, CURVE_HEADER, curves)
    _write_csv(summary_path, SUMMARY_HEADER, summary)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for column, (ax, title) in enumerate(zip(axes, (
            "error EDF", f"normalized error EDF ({args.bins} {args.normalize} bins)"))):
        for index, (label, row) in enumerate(zip(labels, summary)):
            points = [c for c in curves if c[0] == label]
            x = [points[0][2]] + [c[2] for c in points]
            y = [0.0] + [c[5 + column] for c in points]
            ks = row[5 + 3 * column: 8 + 3 * column]
            text = (f"{label} (n={row[1]})" if index == 0 else
                    f"{label}: KS {ks[0]:.2f} [{ks[1]:.2f}, {ks[2]:.2f}]")
            ax.step(x, y, where="post", label=text)
        metric = sorted({m["metric"] for p in populations for m in p["models"]})
        ax.set_title(title)
        ax.set_xlabel(f"error (1 - {'/'.join(metric)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title=f"KS to {labels[0]}, 95% bootstrap")
    axes[0].set_ylabel("share of models with a lower error")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    for row in summary:
        print(f"{row[0]}: n={row[1]} error min {row[2]:.4f} median {row[3]:.4f}" + (
            f"; KS to {labels[0]} {row[5]:.3f} [{row[6]:.3f}, {row[7]:.3f}], normalized "
            f"{row[8]:.3f} [{row[9]:.3f}, {row[10]:.3f}]" if row[5] is not None else ""))
    print(f"wrote {out}, {curves_path}, {summary_path}")
    return 0


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


def _band(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import add_arguments as add_train_arguments
    steps = parser.add_subparsers(dest="step", required=True, metavar="step")

    sample = steps.add_parser("sample", help="draw a population of a design space into JSON")
    sample.add_argument("--space", required=True, choices=SPACE_NAMES)
    sample.add_argument("--n", type=int, required=True, help="models to draw")
    sample.add_argument("--seed", type=int, default=0)
    for key, what in (("flops", "multiply-adds"), ("params", "parameters"),
                      ("acts", "activations")):
        sample.add_argument(f"--{key}", type=_band, nargs=2, metavar=("LOW", "HIGH"),
                            help=f"keep models with {what} in [LOW, HIGH]")
    sample.add_argument("--resolution", type=int, default=224,
                        help="input size the complexity is counted at (default 224)")
    sample.add_argument("--num-classes", type=int, default=1000,
                        help="classifier outputs the complexity is counted with (default 1000)")
    sample.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="override a range of the space: JSON, or low:high[:step] for "
                             "integers (e.g. --set depths=1:4 --set widths=8:128:8)")
    sample.add_argument("--out", required=True, help="the population JSON file to write")
    sample.set_defaults(step_run=run_sample)

    train = steps.add_parser(
        "train", help="train every model of a population (the train command's options)")
    train.add_argument("population", help="a JSON file written by `designspace sample`")
    add_train_arguments(train, choose_model=False)
    train.add_argument("--out", default=None,
                       help="the study folder, one subfolder per model (default: the population "
                            "file's path without .json); rerunning skips finished models and "
                            "resumes an interrupted one")
    train.set_defaults(step_run=run_train, resolution=None, model=None, params=None)

    edf = steps.add_parser("edf", help="plot error EDFs of trained populations (PNG + CSV)")
    edf.add_argument("results", nargs="+",
                     help="`designspace train` output folders (the first is the baseline)")
    edf.add_argument("--labels", nargs="+", help="one label per population")
    edf.add_argument("--normalize", choices=("flops", "params", "acts"), default="flops",
                     help="the complexity the normalized EDF evens out (default flops)")
    edf.add_argument("--bins", type=int, default=5, help="log-spaced complexity bins")
    edf.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    edf.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    edf.add_argument("--out", required=True, help="the PNG to write; CSVs go beside it")
    edf.set_defaults(step_run=run_edf)


def run(args: argparse.Namespace) -> int:
    try:
        return args.step_run(args)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
