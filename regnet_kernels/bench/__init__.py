"""Benchmark harness: one implementation behind ``python -m regnet_kernels bench``,
``benchmarks/run.py``, the pytest-benchmark files ``benchmarks/bench_*.py`` and the first GPU
call ``benchmarks/gpu_first_call.sh`` (its steps: `first_call`).

Modules: `shapes` (the distinct layer shapes of a model), `traffic` (bytes / FLOP each op,
block and network must move and do; the roofline), `cases` (reference module, inputs and fused
equivalent per level), `providers` (eager, channels_last, torch.compile, fused Triton / CUDA /
CPU), `timing` (CUDA events via do_bench, torch.utils.benchmark on CPU), `machine` (device and
versions), `report` (markdown, CSV, plots), `cli` (options, presets, the run loop).
"""
