"""The benchmark harness: the traffic / roofline arithmetic by hand, and the CPU smoke mode
end to end in a tiny configuration (rows, CSV, markdown, providers). Not a timing test."""
import contextlib
import csv
import io
import sys
import time

import pytest
import torch

from regnet_kernels.__main__ import build_parser, main
from regnet_kernels.bench import cli, report, traffic
from regnet_kernels.bench.cases import block_cases, op_cases
from regnet_kernels.bench.providers import make_step, prepare
from regnet_kernels.bench.shapes import BlockShape, block_shapes
from regnet_kernels.bench.timing import Timing, time_cpu_per_call
from regnet_kernels.complexity import complexity
from regnet_kernels.design import BlockSpec


THREADS = torch.get_num_threads()


def block(w_in, w_out, stride, se_width, size, w_b=64, group_width=16):
    spec = BlockSpec(0, 1, w_in, w_out, stride, group_width, se_width)
    return BlockShape("test", "rest", spec, w_b, size, 1)


def test_fused_conv_a_bytes_and_flops_by_hand():
    shape = block(64, 64, 1, 0, 8)
    # reads x (64 x 8 x 8) and writes a (64 x 8 x 8): 8192 elements per image; batch 2 in
    # fp16; weights 64 x 64 fp16 plus fp32 scale and shift for 64 channels.
    cost = traffic.fused_layer_cost(shape, "a", batch=2, elem=2)
    assert cost.bytes == 8192 * 2 * 2 + 64 * 64 * 2 + 8 * 64
    assert cost.flops == 2 * (64 * 64 * 8 * 8) * 2
    assert cost.launches == 1


def test_grouped_conv_b_macs_by_hand():
    shape = block(64, 64, 2, 0, 8)  # 4 groups of 16, stride 2: 4 x 4 output
    assert traffic.layer_macs(shape, "b") == 9 * 16 * 64 * 4 * 4


def test_x_block_identity_eager_vs_fused_by_hand():
    shape = block(64, 64, 1, 0, 8)
    t = 64 * 8 * 8  # every tensor of this block has 4096 elements per image
    # eager: conv a (2t), BN (2t), ReLU (2t), conv b, BN, ReLU (6t), conv c (2t), BN (2t),
    # add (3t), ReLU (2t); fused: conv a (x, a), conv b (a, b), conv c (b, x, out)
    assert traffic.eager_block_elements(shape) == (21 * t, 10)
    assert traffic.fused_block_elements(shape) == (7 * t, 3)


def test_y_block_projection_launches_and_strided_shortcut():
    shape = block(32, 64, 2, 8, 8)
    ho = 4
    _, eager_launches = traffic.eager_block_elements(shape)
    elements, fused_launches = traffic.fused_block_elements(shape)
    assert (eager_launches, fused_launches) == (18, 4)
    # conv c reads b, x at the projection's stride, and writes the output
    assert traffic.fused_layer_elements(shape, "c") == 64 * ho * ho + 32 * ho * ho + 64 * ho * ho


def test_regnety_8gf_traffic_near_the_estimate():
    t = traffic.model_traffic("regnety_8gf", 224, "bf16")
    assert 230e6 < t.eager_bytes < 290e6  # docs/performance.md: ~260 MB / image eager
    assert 65e6 < t.fused_bytes < 85e6    # ~75 MB / image fused
    depth = sum(s.count for s in block_shapes("regnety_8gf"))
    assert t.fused_launches == 1 + 4 * depth + 2  # stem, 4 per Y block, pool and classifier
    assert t.flops == 2 * complexity("regnety_8gf")["flops"]
    assert t.weight_bytes == 2 * complexity("regnety_8gf")["params"]


def test_roofline_floor():
    cost = traffic.Cost(bytes=4_300_000_000, flops=1_000_000_000_000)
    # 1 ms to move the bytes at 4.3 TB/s, 1.27 ms to do the FLOP at 790 TFLOP/s
    assert traffic.roofline_floor_s(cost, 4.3e12, 790e12) == pytest.approx(1e12 / 790e12)
    assert traffic.roofline_floor_s(cost, 4.3e12, None) == pytest.approx(1e-3)
    assert traffic.roofline_floor_s(cost, None, None) is None


def test_speedup_against_best_baseline_and_reasons():
    group = dict(level="op", case="c", mode="eval", dtype="fp32", batch=1)
    rows = [dict(group, provider="eager", status="ok", ms=4.0),
            dict(group, provider="eager_cl", status="ok", ms=2.0),
            dict(group, provider="cpu", status="ok", ms=1.0),
            dict(group, provider="triton", status="unavailable", reason="no GPU")]
    report.add_speedups(rows)
    assert [r.get("speedup") for r in rows] == [0.5, 1.0, 2.0, None]
    assert "[1] triton: no GPU" in report.markdown_table(rows)


def test_rounds_combine_to_the_median_and_their_range():
    rounds = [Timing(ms, ms, ms, None) for ms in (3.0, 1.0, 2.0)]
    assert cli._combine(rounds) == Timing(2.0, 1.0, 3.0, None)


def test_rounds_interleave_the_providers(monkeypatch):
    """--repeat N: the providers take turns, round after round (one provider's rounds are
    not back to back, so a load change on a shared machine hits every provider alike), and a
    provider that cannot run (freezing in a training step) says why instead of a time."""
    order, provider_of = [], {}

    def fake_measure(step, config):
        order.append(provider_of[step])
        return Timing(1.0, 1.0, 1.0, None)

    real_make_step = cli.make_step

    def tagged_make_step(prepared, *args):
        step = real_make_step(prepared, *args)
        provider_of[step] = prepared.provider
        return step

    monkeypatch.setattr(cli, "_measure", fake_measure)
    monkeypatch.setattr(cli, "make_step", tagged_make_step)
    argv = ["bench", "--cpu-smoke", "--level", "block", "--model", "regnetx_200mf",
            "--resolution", "32", "--op-batch", "2", "--mode", "train", "--threads", "1",
            "--provider", "eager,eager_cl,compile_freeze", "--repeat", "3"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    assert order == ["eager", "eager_cl"] * 3 * len(block_cases("regnetx_200mf", 32))
    assert "compile_freeze: Inductor's freezing is for inference" in printed.getvalue()


def test_compile_freeze_provider_computes_the_reference():
    """compile_freeze: torch.compile with Inductor's freezing for this compilation only (the
    global config untouched), the same results as eager."""
    case = op_cases("regnetx_200mf", 32)[0]  # the stem: conv, BN, ReLU
    ref, frozen = (prepare(case, p, "fp32", "eval", "cpu") for p in ("eager", "compile_freeze"))
    with torch.no_grad():
        want = make_step(ref, case, 2, "fp32", "eval", "cpu")()
        got = make_step(frozen, case, 2, "fp32", "eval", "cpu")()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch._inductor.config.freezing


def test_traffic_command(capsys):
    assert main(["bench", "--traffic", "regnety_8gf"]) == 0
    out = capsys.readouterr().out
    assert "| regnety_8gf | 261.3 | 74.5 |" in out


def test_printed_command_reproduces_the_config():
    args = build_parser().parse_args(["bench", "--cpu-smoke", "--batch", "3", "--threads", "1",
                                      "--cpu-time", "--repeat", "2"])
    config = cli.make_config(args)
    again = build_parser().parse_args(config.command().split()[3:])
    assert cli.make_config(again) == config


def test_fused_cpu_cases_compute_what_their_baselines_compute():
    """The harness times like against like: same weights, same inputs, same results."""
    from regnet_kernels.ops import cpp
    ok, reason = cpp.available()
    if not ok:
        pytest.skip(reason.splitlines()[0])
    for case in op_cases("regnety_400mf", 32) + block_cases("regnety_400mf", 32):
        ref, fused = (prepare(case, p, "fp32", "eval", "cpu") for p in ("eager", "cpu"))
        with torch.no_grad():
            want = make_step(ref, case, 2, "fp32", "eval", "cpu")()
            got = make_step(fused, case, 2, "fp32", "eval", "cpu")()
        if isinstance(want, tuple):  # conv b with the SE squeeze: the mean vs per-tile sums
            (want, mean), (got, sums) = want, got
            hw = got.shape[2] * got.shape[3]
            torch.testing.assert_close(sums.sum(1) / hw, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-4, atol=1e-5,
                                   msg=case.name)


def test_plot_without_matplotlib_fails_before_the_sweep(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="matplotlib"):
        main(["bench", "--cpu-smoke", "--plot", "--csv", str(tmp_path / "rows.csv")])
    assert not (tmp_path / "rows.csv").exists()


def test_smoke_run_writes_no_files_unless_asked(tmp_path, monkeypatch, capsys):
    """A smoke run in a checkout leaves it as it was: rows in a CSV only with --csv."""
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--cpu-smoke", "--level", "op", "--op", "se_excite", "--model",
            "regnety_400mf", "--resolution", "32", "--op-batch", "1", "--min-run-time", "0.005",
            "--threads", "1", "--provider", "eager"]
    assert main(argv) == 0
    assert list(tmp_path.rglob("*")) == []
    assert "smoke run: no CSV written" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The CPU smoke mode, tiny: the SE ops, blocks and whole regnety_400mf at 32x32."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--cpu-smoke", "--model", "regnety_400mf", "--models", "regnety_400mf",
            "--level", "op,block,model", "--op", "se_excite", "--resolution", "32",
            "--batch", "1", "--op-batch", "1", "--min-run-time", "0.005", "--repeat", "2",
            "--threads", "1",
            "--csv", str(out / "smoke.csv"), "--markdown", str(out / "smoke.md")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(argv)
    return status, out, printed.getvalue()


def test_smoke_rows_csv_and_table(smoke):
    status, out, printed = smoke
    assert status == 0
    assert torch.get_num_threads() == THREADS  # --threads 1 is restored after the run
    with open(out / "smoke.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == report.FIELDS
    assert {r["level"] for r in rows} == {"op", "block", "model"}
    providers = {r["provider"] for r in rows}
    assert {"eager", "eager_cl", "cpu", "triton", "cuda"} <= providers
    for row in rows:
        if row["provider"] in ("eager", "eager_cl"):
            assert row["status"] == "ok" and float(row["ms"]) > 0, row
        if row["provider"] in ("triton", "cuda"):  # no GPU here: a reason, not a crash
            assert row["status"] == "unavailable" and row["reason"], row
    assert "| level | case |" in printed and "command: `python -m regnet_kernels bench" in printed
    assert (out / "smoke.md").read_text().strip() == printed.strip()


def test_smoke_plot(smoke, tmp_path):
    pytest.importorskip("matplotlib")
    _, out, _ = smoke
    written = report.plot(out / "smoke.csv", tmp_path)
    assert {p.name for p in written} == {"smoke-models.png", "smoke-ops.png"}
    assert all(p.stat().st_size > 0 for p in written)


def test_ddp_training_step_on_two_cpu_ranks(capsys, tmp_path):
    """bench --mode train --ddp 2 on the CPU: two gloo ranks time a DDP step of the fused
    model and of eager channels_last; the table has both, with positive times."""
    out = tmp_path / "ddp.md"
    assert main(["bench", "--mode", "train", "--ddp", "2", "--device", "cpu", "--models",
                 "regnetx_200mf", "--batch", "2", "--resolution", "32", "--ddp-steps", "1",
                 "--threads", "1", "--markdown", str(out)]) == 0
    table = capsys.readouterr().out
    assert "2 rank(s) on cpu (gloo)" in table and table.strip() == out.read_text().strip()
    rows = {line.split("|")[1].strip(): float(line.split("|")[2])
            for line in table.splitlines() if line.startswith("| eager_cl") or
            line.startswith("| fused")}
    assert rows.keys() == {"eager_cl", "fused"} and all(ms > 0 for ms in rows.values())
    with pytest.raises(SystemExit, match="use it with --mode train"):
        main(["bench", "--mode", "eval", "--ddp", "2", "--device", "cpu"])


def test_per_call_rounds_rotate_the_providers(monkeypatch):
    """--per-call: a warm-up call each, then every round calls each provider once, the order
    rotated by one each round; each row is the median of its calls, with their quartiles."""
    order = []
    real_make_step = cli.make_step

    def tagged_make_step(prepared, *args):
        step = real_make_step(prepared, *args)
        return lambda: order.append(prepared.provider) or step()

    monkeypatch.setattr(cli, "make_step", tagged_make_step)
    argv = ["bench", "--cpu-smoke", "--level", "block", "--model", "regnetx_200mf",
            "--resolution", "32", "--op-batch", "2", "--mode", "eval", "--threads", "1",
            "--provider", "eager,eager_cl,cpu", "--repeat", "4", "--per-call"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    per_case = ["eager", "eager_cl", "cpu",  # warm-up
                "eager", "eager_cl", "cpu", "eager_cl", "cpu", "eager",
                "cpu", "eager", "eager_cl", "eager", "eager_cl", "cpu"]
    assert order == per_case * len(block_cases("regnetx_200mf", 32))
    assert "--per-call" in printed.getvalue() and "| ok |" in printed.getvalue()


def test_per_call_timing_medians_and_failures():
    calls = {"slow": 0, "broken": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)

    def broken():
        calls["broken"] += 1
        if calls["broken"] > 2:  # the warm-up and the first round pass
            raise RuntimeError("boom")

    out = time_cpu_per_call({"slow": slow, "broken": broken}, rounds=5)
    assert calls == {"slow": 6, "broken": 3}
    assert isinstance(out["broken"], RuntimeError)
    assert 2.0 <= out["slow"].low_ms <= out["slow"].median_ms <= out["slow"].high_ms


def test_per_call_needs_the_cpu_and_a_round(monkeypatch):
    monkeypatch.setattr(cli, "_resolve_device", lambda args: "cuda")
    with pytest.raises(SystemExit, match="--per-call"):
        main(["bench", "--per-call", "--repeat", "5"])
    with pytest.raises(SystemExit, match="--repeat must be at least 1"):
        main(["bench", "--cpu-smoke", "--repeat", "0"])
