"""The static kernel report (`python -m regnet_kernels bench --static`): the launch capture,
the SASS analysis and the command, without a GPU.

- The capture on meta tensors records exactly the launches the model makes when it really
  runs (here under the Triton interpreter, on a tiny RegNetY): same kernels, same count.
- The SASS analysis finds the loads, MMAs and main loop of a small matmul compiled for
  sm_90 (in a subprocess without TRITON_INTERPRET), and parses hand-written listings.
- The command runs end to end on a small model and writes markdown and CSV with the sums.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from regnet_kernels.bench import sass
from regnet_kernels.bench.capture import capture_model, short_layer
from regnet_kernels.bench.static import predict

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depth=3, w0=24, wa=24, wm=2.0, group_width=8, se_ratio=0.25)


def _tools_present() -> bool:
    try:
        for tool in ("nvdisasm", "ptxas"):
            sass.find_tool(tool)
        import triton  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True


needs_tools = pytest.mark.skipif(not _tools_present(), reason="triton / NVIDIA tools missing")


# ---------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------


def _interpreted_launches(model, x, mode):
    """Kernel names of every launch when the model really runs (under the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction
    names = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        if mode == "eval":
            model.eval()
            with torch.no_grad():
                model(x)
        else:
            model.train()
            out = model(x)
            out.backward(torch.randn_like(out))
    finally:
        InterpretedFunction.run = original
    return names


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="compares with the interpreter's real launches (CPU machines)")
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_capture_records_every_launch(mode):
    from regnet_kernels import RegNetParams
    from regnet_kernels.models.fused import fused_model

    params = RegNetParams(**TINY)
    torch.manual_seed(0)
    model = fused_model(params, backend="triton", num_classes=10)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    real = _interpreted_launches(model, x, mode)
    launches, recorder = capture_model(params, 2, "fp32", (mode,), resolution=32)
    captured = [launch.kernel_name for launch in launches]
    assert Counter(captured) == Counter(real)
    assert captured == real  # the same order too
    assert not recorder.unknown_flop_ops
    # every launch knows its op and layer; the convs carry FLOPs
    assert all(launch.op and launch.layer for launch in launches)
    conv_calls = {id(l.op_call) for l in launches if l.op.startswith("conv")}
    assert conv_calls and all(l.op_call.flops > 0 for l in launches if id(l.op_call) in conv_calls)
    if mode == "train":
        assert {l.phase for l in launches} == {"forward", "backward"}
        assert {"conv_dgrad", "conv_wgrad"} <= {l.op for l in launches}


def test_capture_specializes_like_triton():
    """Pointers typed from dtypes with 16-byte alignment attributes, ints equal to 1 as
    constexprs, grids evaluated, bytes of distinct tensors; no memory allocated."""
    launches, _ = capture_model("regnetx_200mf", 256, "bf16", ("eval",))
    stem = launches[0]
    assert stem.layer == "stem" and stem.op == "conv_bn_act"
    assert stem.signature["x_ptr"] == "*bf16" and stem.signature["scale_ptr"] == "*fp32"
    assert stem.attrs["x_ptr"] == [["tt.divisibility", 16]]
    assert all(v == "constexpr" for k, v in stem.signature.items() if k in stem.constexprs)
    assert stem.options["num_warps"] in (4, 8) and "num_stages" in stem.options
    assert stem.ctas > 1000
    # input 256x3x224x224 + output 256x32x112x112 in bf16 (+ small vectors)
    assert 2 * 256 * (3 * 224 * 224 + 32 * 112 * 112) <= stem.bytes < 1.01 * 2 * 256 * (
        3 * 224 * 224 + 32 * 112 * 112) + 4096
    assert short_layer("trunk_output.block2.block2-0") == "s2.b1"
    assert [l.layer for l in launches[1:4]] == ["s1.b1"] * 3


# ---------------------------------------------------------------------------
# SASS
# ---------------------------------------------------------------------------

LISTING = textwrap.dedent("""\
    .text.k:
            /*0000*/                   LDC R1, c[0x0][0x28] ;
            /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
            /*0020*/                   LDG.E.U16 R8, desc[UR4][R2.64] ;
    .L_x_0:
            /*0030*/                   LDGSTS.E.BYPASS.128 [R23], desc[UR12][R16.64], P0 ;
            /*0040*/                   LDSM.16.M88.4 R28, [R8] ;
            /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;
    .L_x_1:
            /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
            /*0070*/                   STL [R1], R5 ;
            /*0080*/              @P1 BRA `(.L_x_1) ;
            /*0090*/              @!P0 BRA `(.L_x_0) ;
            /*00a0*/                   STG.E.64 desc[UR4][R2.64], R4 ;
            /*00b0*/                   EXIT ;
    .L_x_2:
            /*00c0*/                   BRA `(.L_x_2);
    """)


def test_sass_listing_analysis():
    stats = sass.analyse_sass(LISTING)
    assert stats.instructions == 13
    assert stats.loads == {"LDG.16": 1, "LDG.2": 1, "LDGSTS.16": 1, "LDSM": 1}
    assert stats.stores == {"STL": 1, "STG.8": 1}
    assert stats.mma == {"HGMMA": 2} and stats.mma_kind == "wgmma"
    assert stats.local_bytes == {"load": 0, "store": 4}
    assert len(stats.loops) == 2  # the trap "BRA self" is no loop
    loop = stats.main_loop  # the innermost loop with MMAs
    assert (loop.start, loop.end, loop.instructions, loop.mma, loop.local) == (0x60, 0x80, 3, 1, 1)
    assert loop.macs_per_iteration(num_warps=8) == 2 * 64 * 128 * 16
    assert "cp.async16x1" in stats.load_kinds() and "LDG16x1" in stats.load_kinds()


def test_ptxas_log_and_occupancy():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    56 bytes stack frame, 56 bytes spill stores, 48 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size\n")
    assert sass.parse_ptxas_log(log)["k"] == {"arch": "sm_90a", "registers": 255,
                                              "spill_stores": 56, "spill_loads": 48,
                                              "stack": 56, "static_smem": 0}
    assert sass.ctas_per_sm(255, 24 * 1024, 4) == (2, "regs")      # 256 regs x 128 threads
    assert sass.ctas_per_sm(128, 100 * 1024, 4) == (2, "smem")
    assert sass.ctas_per_sm(24, 0, 8) == (8, "warps")
    assert sass.ctas_per_sm(32, 0, 1) == (32, "ctas")
    assert sass.mma_macs("HMMA.16816.F32.BF16") == 16 * 8 * 16


def test_model_bounds():
    analysis = {"ok": True, "registers": 128, "shared": 32 * 1024, "instructions": 300,
                "mma_kind": "wgmma", "loop": {"instructions": 50, "macs_per_iteration":
                                             64 * 128 * 64, "local": 0}}
    # a big memory-bound launch: the memory term and the roofline floor agree
    mem = predict(13200, 4, int(4.3e9), 0, dict(analysis, loop=None), "bf16")
    assert mem["limiter"] == "memory" and mem["predicted_us"] == pytest.approx(1003, rel=1e-3)
    assert mem["floor_us"] == pytest.approx(1000)
    # a GEMM: iterations from the FLOPs, MMA time with the padding
    ctas = 132 * 4 * 10  # 4 CTAs per SM (128 registers x 4 warps), 10 waves
    macs = ctas * 8 * 64 * 128 * 64
    gemm = predict(ctas, 4, 10 ** 6, 2 * macs, analysis, "bf16")
    assert gemm["iterations"] == 8 and gemm["mma_util"] == pytest.approx(1.0)
    assert gemm["mma_us"] == pytest.approx(2 * macs / 790e12 * 1e6)
    assert gemm["waves"] == pytest.approx(10.0)
    assert gemm["predicted_us"] > gemm["floor_us"]


_MATMUL = '''
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def mm(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + (k + rk)[None, :])
        y = tl.load(b + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(x, y, acc)
    tl.store(c + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))

sig = {"a": "*bf16", "b": "*bf16", "c": "*bf16", "M": "i32", "N": "i32", "K": "i32",
       "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 4, 5)}
k = triton.compile(ASTSource(mm, sig, {"BM": 64, "BN": 64, "BK": 32}, aligned),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
open(sys.argv[1], "wb").write(k.asm["cubin"])
open(sys.argv[2], "w").write(k.asm["ptx"])
'''


@needs_tools
def test_sass_of_a_compiled_matmul(tmp_path):
    script = tmp_path / "mm.py"
    script.write_text(_MATMUL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cubin, ptx = tmp_path / "mm.cubin", tmp_path / "mm.ptx"
    proc = subprocess.run([sys.executable, str(script), str(cubin), str(ptx)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = sass.analyse_sass(sass.disassemble(cubin.read_bytes()))
    assert stats.mma_kind == "wgmma"
    assert stats.loads.get("LDGSTS.16")          # 16-byte cp.async
    loop = stats.main_loop
    assert loop is not None and loop.mma >= 1 and loop.local == 0
    assert loop.macs_per_iteration(num_warps=4) == 64 * 64 * 32
    assert loop.instructions < 200
    report = sass.parse_ptxas_log(sass.ptxas_verbose(ptx.read_text()))["mm"]
    assert report["spill_stores"] == 0 and 0 < report["registers"] <= 255
    assert sass.resource_usage(cubin.read_bytes())["mm"]["REG"] == report["registers"]


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


@needs_tools
def test_static_command_end_to_end(tmp_path):
    md, out_csv = tmp_path / "r.md", tmp_path / "r.csv"
    env = dict(os.environ, REGNET_KERNELS_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "regnet_kernels", "bench", "--static", "regnetx_200mf",
         "--batch", "2", "--resolution", "64", "--mode", "eval", "--no-cuda-sources",
         "--markdown", str(md), "--csv", str(out_csv)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stderr and "captured" in proc.stderr  # progress lines
    text = md.read_text()
    assert "model, not a measurement; calibrate with the first GPU run" in text
    assert "## eval: per launch" in text and "## Model totals" in text
    assert "| **total** |" in text and "img/s" in text
    rows = list(csv.DictReader(out_csv.open()))
    assert rows and all(r["mode"] == "eval" for r in rows)
    assert sum(int(r["count"]) for r in rows) == 40  # 1 stem + 13 X blocks x 3
    assert all(r["registers"] and r["predicted_us"] and not r["error"] for r in rows)
    # tensor cores everywhere: wgmma, mma.sync for tiles under 64 rows (batch 2 at 64x64)
    kinds = {r["mma_kind"] for r in rows if r["op"].startswith("conv")}
    assert "wgmma" in kinds and kinds <= {"wgmma", "mma.sync"}


# ---------------------------------------------------------------------------
# The CUDA backend's eval forward (kernel figures stubbed: nvcc's are the slow part)
# ---------------------------------------------------------------------------


def _stub_cuda_kernel(vector_loop_mma: int) -> dict:
    loop = {"instructions": 250, "mma": vector_loop_mma, "local": 0, "loads": {},
            "mma_shapes": {"HMMA.16816.F32.BF16": vector_loop_mma},
            "macs_per_iteration": vector_loop_mma * 2048, "load_bytes_per_thread": 64}
    element = dict(loop, instructions=900)
    return {"registers": 128, "shared": 1024, "instructions": 3000, "mma_kind": "mma.sync",
            "spill_stores": 0, "spill_loads": 0, "load_kinds": "cp.async16x4",
            "loop": loop, "element_loop": element}


@pytest.mark.parametrize("model,launches", [("regnety_200mf", 1 + 13 * 4),
                                            ("regnetx_200mf", 1 + 13 * 3)])
def test_cuda_eval_report_maps_every_eval_op(model, launches):
    """Every eval op call becomes one CUDA launch row of mode eval-cuda with a prediction;
    the 3-channel stem takes the element-wise loop (longer), the blocks the cp.async one."""
    from regnet_kernels.bench import cuda_launches as CL
    from regnet_kernels.bench.static import CUDA_EVAL_MODE, cuda_eval_report
    flags = ("true", "false")
    names = ([f"conv_bn_act_kernel<bf16,Tile<{bm},{bn},{wm},{wn}>,{v}>"
              for (bm, bn), (wm, wn) in CL.CONV_TILES.items() for v in flags]
             + [f"conv1x1_gate_residual_kernel<bf16,Tile<{bm},{bn},{wm},{wn}>,{p},{v}>"
                for (bm, bn), (wm, wn) in CL.GATE_TILES.items() for p in flags for v in flags]
             + ["se_excite_kernel<bf16>"])
    compiled = {"kernels": {CL.kernel_key(n): _stub_cuda_kernel(16) for n in names}}
    rows = cuda_eval_report(model, 8, "bf16", resolution=64, compiled=compiled)
    assert sum(r["count"] for r in rows) == launches
    assert all(r["mode"] == CUDA_EVAL_MODE and r["predicted_us"] > 0 and not r["error"]
               for r in rows)
    stem = [r for r in rows if r["layers"] == "stem"]
    assert len(stem) == 1 and stem[0]["tile"].endswith("(element path)")
    assert stem[0]["loop_instructions"] == 900
    assert all(r["loop_instructions"] == 250 for r in rows if r["op"] != "se_excite"
               and r["layers"] != "stem")
    if model.startswith("regnety"):
        assert {r["op"] for r in rows} == {"conv_bn_act", "conv_bn_act_squeeze", "se_excite",
                                          "conv1x1_gate_residual"}
    # a kernel the compiled sources lack is an error row, not a silent zero
    del compiled["kernels"][CL.kernel_key("se_excite_kernel<bf16>")]
    rows = cuda_eval_report(model, 8, "bf16", resolution=64, compiled=compiled)
    if model.startswith("regnety"):
        missing = [r for r in rows if r["op"] == "se_excite"]
        assert missing and all("not found" in r["error"] and r["predicted_us"] is None
                               for r in missing)
