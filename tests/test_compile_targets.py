"""Every Triton kernel compiles for Hopper (sm_90) on this machine, GPU or not,
and its dots become tensor-core instructions.

The interpreter accepts kernels the GPU compiler rejects (a 16-bit dot with
K = 8, say), so this is the CPU machine's guard for the GPU build. Compilation
runs in a subprocess without TRITON_INTERPRET: under the interpreter the
kernels are not compilable objects.
"""
import json
import os
import subprocess
import sys

import pytest

# Shared memory per block on sm_90 (227 KiB).
SM90_MAX_SHARED = 232448
GROUP_WIDTHS = [8, 16, 24, 40, 48, 56, 64, 72, 80, 112, 120, 128, 168, 232, 264]
# Dense 1x1 widths (conv a / c and shortcuts): narrow to wide.
DENSE_WIDTHS = [24, 152, 2016]
SPATIAL = [112 * 112, 56 * 56, 28 * 28, 14 * 14, 7 * 7]
BATCH = 32


def conv_bn_act_variants(conv_tiles):
    """(dtype, constexprs) for the tile configs the heuristic picks across the
    standard models' shapes, in bf16 (the GPU dtype the interpreter cannot
    check), plus a few in fp16 and fp32."""
    seen = set()
    for cpg in GROUP_WIDTHS:
        for hw in SPATIAL:
            for squeeze in (False, True):
                rows = hw if squeeze else BATCH * hw
                seen.add((3, squeeze, conv_tiles(rows, cpg, 9 * cpg)))
    for c in DENSE_WIDTHS:
        seen.add((1, False, conv_tiles(BATCH * 56 * 56, c, c)))
    seen.add((3, False, conv_tiles(BATCH * 112 * 112, 32, 27)))  # stem
    variants = []
    for k, squeeze, (bm, bn, bk) in sorted(seen):
        c = dict(KSIZE=k, RELU=True, SQUEEZE=squeeze, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 DOT_PRECISION="tf32")
        variants.append(("bf16", c))
    for dtype in ("fp16", "fp32"):
        for c in (variants[0][1], variants[-1][1]):
            variants.append((dtype, c))
    return variants


def gate_residual_variants():
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for gate, project in ((True, True), (False, False), (True, False)):
            out.append((dtype, dict(HAS_GATE=gate, PROJECT=project, BLOCK_M=64, BLOCK_N=128,
                                    BLOCK_K=64, DOT_PRECISION="tf32")))
    return out


def se_excite_variants(tiles):
    return [(dtype, dict(zip(("BLOCK_S", "BLOCK_C"), tiles(s))))
            for dtype in ("bf16", "fp32") for s in (6, 58, 378, 726)]


FP32_POINTERS = {"scale_ptr", "shift_ptr", "pscale_ptr", "pshift_ptr", "gate_ptr", "sums_ptr"}


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ("fp32" if name in FP32_POINTERS else dtype)
        else:
            sig[name] = "i32"
    return sig


def compile_all():
    """Compile every variant; return one record per compiled kernel."""
    import importlib
    import pkgutil

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import regnet_kernels.ops as ops_pkg
    from regnet_kernels.ops._implicit_gemm import conv_tiles, launch_config
    from regnet_kernels.ops.se_excite import _tiles as se_tiles

    variants = {
        "_conv_bn_act_kernel": conv_bn_act_variants(conv_tiles),
        "_conv1x1_gate_residual_kernel": gate_residual_variants(),
        "_se_excite_kernel": se_excite_variants(se_tiles),
    }
    kernels = {}
    for mod in pkgutil.iter_modules(ops_pkg.__path__):
        m = importlib.import_module(f"regnet_kernels.ops.{mod.name}")
        for name, obj in vars(m).items():
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
                kernels[name] = obj
    records = [{"missing_variants": sorted(set(kernels) - set(variants))}]
    target = GPUTarget("cuda", 90, 32)
    for name, fn in sorted(kernels.items()):
        for dtype, constexprs in variants.get(name, []):
            opts = launch_config(constexprs["BLOCK_M"], constexprs["BLOCK_N"]) \
                if "BLOCK_M" in constexprs else {"num_warps": 8}
            rec = {"kernel": name, "dtype": dtype, "constexprs": constexprs}
            try:
                k = triton.compile(ASTSource(fn, signature(fn, dtype, constexprs), constexprs),
                                   target=target, options=opts)
                ptx = k.asm["ptx"]
                rec.update(ok=True, wgmma="wgmma" in ptx, mma="mma" in ptx,
                           shared=k.metadata.shared)
            except Exception as e:  # reported by the test, with the variant
                rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
            records.append(rec)
    return records


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_has_compile_variants(records):
    assert records[0]["missing_variants"] == []
    assert {r["kernel"] for r in records[1:]} == {
        "_conv_bn_act_kernel", "_conv1x1_gate_residual_kernel", "_se_excite_kernel"}


def test_kernels_compile_for_sm90(records):
    failed = [r for r in records[1:] if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)[:6000]


def test_dots_use_tensor_cores(records):
    for r in records[1:]:
        if r["kernel"] != "_se_excite_kernel":
            assert r["mma"], r
            if r["dtype"] != "fp32" and r["constexprs"]["BLOCK_M"] >= 64:
                assert r["wgmma"], r


def test_shared_memory_fits_sm90(records):
    for r in records[1:]:
        assert r["shared"] <= SM90_MAX_SHARED, r


if __name__ == "__main__":
    print(json.dumps(compile_all()))
