"""Command line: ``python -m regnet_kernels <command>``.

Each command is a ``run_<command>(args) -> int`` function plus one entry in
:func:`build_parser`; add a command by writing both.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .complexity import complexity, stage_output_sizes
from .zoo import UnknownModelError, list_models, zoo_entry


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells
    )


def run_list(args: argparse.Namespace) -> int:
    """Print every canonical model name with its rounding rule and aliases."""
    rows = []
    for name in list_models():
        entry = zoo_entry(name)
        rows.append((name, entry.params.rounding, ", ".join(entry.aliases) or "-"))
    print(_table(("model", "rounding", "aliases"), rows))
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print a model's design parameters, stage table and complexity."""
    entry = zoo_entry(args.model)
    p = entry.params
    rows = []
    for stage, size in zip(p.stages(), stage_output_sizes(p, args.resolution)):
        # The first block's SE reads the stage input, so its width differs from the rest's.
        se_widths = dict.fromkeys(stage.se_width(b) for b in range(min(stage.depth, 2)))
        rows.append((
            stage.index + 1, stage.depth, stage.width, stage.group_width, stage.groups,
            "/".join(map(str, se_widths)) if p.se_ratio else "-", f"{size}x{size}",
        ))
    counts = complexity(p, args.resolution)
    print(f"{entry.name} (aliases: {', '.join(entry.aliases) or '-'})")
    print(f"rounding rule: {p.rounding}")
    print(
        f"d={p.depth} w0={p.w0} wa={p.wa} wm={p.wm} g={p.group_width} "
        f"b={p.bottleneck_ratio} se_ratio={p.se_ratio} stem={p.stem_width}"
    )
    print()
    print(_table(("stage", "depth", "width", "group width", "groups", "SE width", "output"), rows))
    print()
    print(f"params: {counts['params'] / 1e6:.3f} M")
    size = args.resolution
    print(f"flops:  {counts['flops'] / 1e9:.3f} GF (multiply-adds at {size}x{size})")
    print(f"acts:   {counts['acts'] / 1e6:.3f} M")
    return 0


def run_env(args: argparse.Namespace) -> int:
    """Print versions, devices and which fused-op backends can run here (and why not)."""
    from .ops.dispatch import environment_report
    print(environment_report())
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Time the fused ops, blocks and models against the baselines (or print the traffic model)."""
    from .bench.cli import run
    return run(args)


def run_train(args: argparse.Namespace) -> int:
    """Train a RegNet (alone or one rank under torchrun); see regnet_kernels/train.py."""
    from .train import run
    return run(args)


def run_designspace(args: argparse.Namespace) -> int:
    """Sample, train and compare design-space populations; see regnet_kernels/design_study.py."""
    from .design_study import run
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m regnet_kernels", description="RegNet models and fused kernels."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    list_parser = commands.add_parser("list", help="the standard models, aliases and rounding rule")
    list_parser.set_defaults(run=run_list)

    info_parser = commands.add_parser("info", help="stage table and complexity of a model")
    info_parser.add_argument("model", help="any model name, e.g. regnety_8gf, RegNetY-8.0GF")
    info_parser.add_argument("--resolution", type=int, default=224, help="input size (default 224)")
    info_parser.set_defaults(run=run_info)

    from .bench.cli import add_arguments as add_bench_arguments
    bench_parser = commands.add_parser(
        "bench", help="benchmarks: fused ops, blocks and models against eager / torch.compile")
    add_bench_arguments(bench_parser)
    bench_parser.set_defaults(run=run_bench)

    from .train import add_arguments as add_train_arguments
    train_parser = commands.add_parser(
        "train", help="train a RegNet (pycls recipe; DDP under torchrun), checkpoint, resume")
    add_train_arguments(train_parser)
    train_parser.set_defaults(run=run_train)

    from .design_study import add_arguments as add_study_arguments
    study_parser = commands.add_parser(
        "designspace", help="design-space study: sample populations, train them, plot error EDFs")
    add_study_arguments(study_parser)
    study_parser.set_defaults(run=run_designspace)

    env_parser = commands.add_parser(
        "env", help="versions, devices and the usable backends (builds the C++ extension)")
    env_parser.set_defaults(run=run_env)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UnknownModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
