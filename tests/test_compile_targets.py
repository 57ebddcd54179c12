"""Every Triton kernel compiles for Hopper (sm_90) on this machine, GPU or not,
and its dots become tensor-core instructions (fp64 dots: DMMA, mma.sync f64).

The interpreter accepts kernels the GPU compiler rejects (a 16-bit dot with
K = 8, say), so this is the CPU machine's guard for the GPU build. Compilation
runs in a subprocess without TRITON_INTERPRET: under the interpreter the
kernels are not compilable objects.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

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
    check), plus a few in fp16 and fp32, and fp64 (its own, capped tiles)."""
    seen = set()
    for cpg in GROUP_WIDTHS:
        for hw in SPATIAL:
            for squeeze in (False, True):
                rows = hw if squeeze else BATCH * hw
                seen.add((3, squeeze, conv_tiles(rows, cpg, 9 * cpg)))
    for c in DENSE_WIDTHS:
        seen.add((1, False, conv_tiles(BATCH * 56 * 56, c, c)))
    seen.add((3, False, conv_tiles(BATCH * 112 * 112, 32, 27)))  # stem
    eval_mode = dict(IN_AFFINE=False, IN_RELU=False, HAS_GATE=False, AFFINE=True, RELU=True,
                     STATS=False, DOT_PRECISION="tf32")
    variants = []
    for k, squeeze, (bm, bn, bk) in sorted(seen):
        c = dict(eval_mode, KSIZE=k, SQUEEZE=squeeze, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        variants.append(("bf16", c))
        if not squeeze:  # training: previous BN + ReLU in the prologue, BN partials out
            variants.append(("bf16", dict(c, STATS=True, IN_AFFINE=True, IN_RELU=True,
                                          HAS_GATE=k == 1)))
            if k == 3:  # an eval-mode BN in a training model: the raw output only
                variants.append(("bf16", dict(c, AFFINE=False, RELU=False, IN_AFFINE=True,
                                              IN_RELU=True)))
    for dtype in ("fp16", "fp32"):
        for _, c in (variants[0], variants[1], variants[-1]):
            variants.append((dtype, c))
    fp64 = {(3, squeeze, conv_tiles(BATCH * hw, cpg, 9 * cpg, torch.float64))
            for cpg in (8, 264) for hw in (7 * 7, 56 * 56) for squeeze in (False, True)}
    fp64.add((1, False, conv_tiles(BATCH * 56 * 56, 2016, 2016, torch.float64)))
    for k, squeeze, (bm, bn, bk) in sorted(fp64):
        c = dict(eval_mode, KSIZE=k, SQUEEZE=squeeze, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 DOT_PRECISION="ieee")
        variants.append(("fp64", c))
        if not squeeze:
            variants.append(("fp64", dict(c, STATS=True, IN_AFFINE=True, IN_RELU=True,
                                          HAS_GATE=True)))
    return variants


def gate_residual_variants(conv_tiles):
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for gate, project in ((True, True), (False, False), (True, False)):
            out.append((dtype, dict(HAS_GATE=gate, PROJECT=project, BLOCK_M=64, BLOCK_N=128,
                                    BLOCK_K=64, DOT_PRECISION="tf32")))
    bm, bn, bk = conv_tiles(BATCH * 28 * 28, 2016, 2016, torch.float64)
    for gate, project in ((True, True), (False, False)):
        out.append(("fp64", dict(HAS_GATE=gate, PROJECT=project, BLOCK_M=bm, BLOCK_N=bn,
                                 BLOCK_K=bk, DOT_PRECISION="ieee")))
    return out


def se_excite_variants(tiles):
    return [(dtype, dict(zip(("BLOCK_S", "BLOCK_C"), tiles(s))))
            for dtype in ("bf16", "fp32", "fp64") for s in (6, 58, 378, 726)]


def elementwise_variants(tiles):
    """(dtype, constexprs) for the memory-bound training kernels."""
    out = []
    for dtype in ("bf16", "fp16", "fp32", "fp64"):
        for hw, c in ((56 * 56, 224), (7 * 7, 2016)):
            bm, bc = tiles["squeeze"](hw, c)
            out.append(("_se_squeeze_kernel", dtype, dict(BLOCK_M=bm, BLOCK_C=bc)))
        for shortcut, project in ((False, False), (True, False), (True, True)):
            out.append(("_bn_add_relu_kernel", dtype, dict(HAS_SHORTCUT=shortcut, PROJECT=project,
                                                           BLOCK_M=64, BLOCK_C=64)))
        for hw, c in ((56 * 56, 224), (7 * 7, 2016)):
            bm, bc = tiles["bn_act_backward"](hw, c)
            base = dict(G_PER_TILE=False, AFFINE=True, RELU=True, HAS_GATE=True,
                        EXTERNAL_MASK=False, WRITE_DV=True, REDUCE=False, BLOCK_M=bm, BLOCK_C=bc)
            for over in ({}, dict(G_PER_TILE=True, HAS_GATE=False),
                         dict(AFFINE=False, RELU=False, HAS_GATE=False, WRITE_DV=False, REDUCE=True),
                         dict(AFFINE=False, HAS_GATE=False, EXTERNAL_MASK=True)):
                out.append(("_bn_act_backward_kernel", dtype, dict(base, **over)))
    for dtype in ("fp32", "fp64"):  # the statistics' dtype
        for affine in (False, True):
            out.append(("_bn_finalize_kernel", dtype,
                        dict(AFFINE=affine, BLOCK_C=tiles["finalize"])))
        for cumulative in (False, True):
            out.append(("_bn_running_update_kernel", dtype,
                        dict(CUMULATIVE=cumulative, BLOCK_C=tiles["finalize"])))
    return out


def conv_grad_variants(dgrad_geometry, wgrad_geometry):
    """dgrad / wgrad variants: bf16 over the tiles the heuristics pick for the standard
    models' shapes (both strides, prologues on), plus fp16 / fp32 samples and fp64."""
    dgrad, wgrad = set(), set()
    shapes = [(3, cpg, cpg, hw) for cpg in GROUP_WIDTHS for hw in SPATIAL]   # grouped 3x3
    shapes += [(1, c, c, 56 * 56) for c in DENSE_WIDTHS]                     # dense 1x1
    shapes += [(3, 3, 32, 224 * 224)]                                        # stem (stride 2)
    for k, cin_g, cout_g, hw in shapes:
        side = math.isqrt(hw)
        for stride in (1, 2):
            o = (side - 1) // stride + 1
            dgrad.add((k, dgrad_geometry(BATCH, side, side, cin_g, cout_g, k, stride)[2]))
            wgrad.add((k, wgrad_geometry(BATCH, o, o, cout_g, cin_g, k, 1)[0]))
    # fp32 with a prologue takes half-deep K steps (shared memory): the largest tiles
    fp32_prologue = {
        "_conv_dgrad_kernel": dgrad_geometry(BATCH, 56, 56, 64, 64, 3, 1, torch.float32,
                                             prologue=True)[2],
        "_conv_wgrad_kernel": wgrad_geometry(BATCH, 56, 56, 264, 264, 3, 1, torch.float32,
                                             prologue=True)[0]}
    # fp64: capped tiles for a wide and a narrow group, prologues on (True) or off
    fp64 = {
        "_conv_dgrad_kernel": lambda c, prologue: dgrad_geometry(
            BATCH, 56, 56, c, c, 3, 1, torch.float64, prologue)[2],
        "_conv_wgrad_kernel": lambda c, prologue: wgrad_geometry(
            BATCH, 56, 56, c, c, 3, 1, torch.float64, prologue)[0]}
    dy_prologue = dict(PROLOGUE=True, HAS_MASK=True)
    out = {"_conv_dgrad_kernel": [], "_conv_wgrad_kernel": []}
    for name, seen, extra in (
            ("_conv_dgrad_kernel", dgrad, {}),
            ("_conv_wgrad_kernel", wgrad, dict(IN_AFFINE=True, IN_RELU=True, HAS_GATE=True))):
        for k, (bm, bn, bk) in sorted(seen):
            c = dict(KSIZE=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION="tf32",
                     **dy_prologue, **extra)
            out[name].append(("bf16", c))
        plain = {key: False for key in (*dy_prologue, *extra)}
        samples = [out[name][0][1], out[name][-1][1]]
        out[name] += [(dtype, dict(c, **off)) for dtype in ("fp16", "fp32") for c in samples
                      for off in ({}, plain) if dtype == "fp16" or off]
        bm, bn, bk = fp32_prologue[name]
        out[name] += [("fp32", dict(c, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)) for c in samples[-1:]]
        for c_g in (264, 8):
            for off in ({}, plain):
                bm, bn, bk = fp64[name](c_g, not off)
                out[name].append(("fp64", dict(samples[-1], **off, BLOCK_M=bm, BLOCK_N=bn,
                                               BLOCK_K=bk, DOT_PRECISION="ieee")))
    return out


# Pointer arguments in the accumulation dtype: fp32 whatever the activations'
# dtype, fp64 for fp64 ones; other non-pointer arguments are i32 except these.
VECTOR_POINTERS = {"scale_ptr", "shift_ptr", "pscale_ptr", "pshift_ptr", "gate_ptr", "sums_ptr",
                   "in_scale_ptr", "in_shift_ptr", "m2_ptr", "sum_ptr", "gamma_ptr", "beta_ptr",
                   "rmean_ptr", "rvar_ptr", "mean_ptr", "inv_std_ptr", "rscale_ptr",
                   "rshift_ptr", "dy_a_ptr", "dy_b_ptr", "dy_c_ptr", "mask_scale_ptr",
                   "mask_shift_ptr", "dw_ptr", "stats_ptr", "part_ptr", "dgate_ptr"}
SPECIAL_ARGS = {"nbt_ptr": "*i64", "eps": "fp64", "momentum": "fp64"}
DOT_KERNELS = {"_conv_bn_act_kernel", "_conv1x1_gate_residual_kernel",
               "_conv_dgrad_kernel", "_conv_wgrad_kernel"}


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in SPECIAL_ARGS:
            sig[name] = SPECIAL_ARGS[name]
        elif name.endswith("_ptr"):
            vector = "fp64" if dtype == "fp64" else "fp32"
            sig[name] = "*" + (vector if name in VECTOR_POINTERS else dtype)
        else:
            sig[name] = "i32"
    return sig


def compile_all():
    """Compile every variant; return one record per compiled kernel."""
    import importlib
    import pkgutil

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import regnet_kernels.ops as ops_pkg
    from regnet_kernels.ops._implicit_gemm import conv_tiles, launch_config
    from regnet_kernels.ops.bn_act_backward import _tiles as bn_act_tiles
    from regnet_kernels.ops.bn_finalize import BLOCK_C as finalize_block
    from regnet_kernels.ops.conv_grad import dgrad_geometry, wgrad_geometry
    from regnet_kernels.ops.se_excite import _squeeze_tiles
    from regnet_kernels.ops.se_excite import _tiles as se_tiles

    variants = {
        "_conv_bn_act_kernel": conv_bn_act_variants(conv_tiles),
        "_conv1x1_gate_residual_kernel": gate_residual_variants(conv_tiles),
        "_se_excite_kernel": se_excite_variants(se_tiles),
        **conv_grad_variants(dgrad_geometry, wgrad_geometry),
    }
    for name, dtype, constexprs in elementwise_variants(
            {"squeeze": _squeeze_tiles, "finalize": finalize_block,
             "bn_act_backward": bn_act_tiles}):
        variants.setdefault(name, []).append((dtype, constexprs))
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
                if "BLOCK_N" in constexprs else {"num_warps": 4}
            rec = {"kernel": name, "dtype": dtype, "constexprs": constexprs}
            # every kernel accumulates in ACC_DTYPE (not JSON: added here, not in the record)
            full = dict(constexprs, ACC_DTYPE=tl.float64 if dtype == "fp64" else tl.float32)
            try:
                k = triton.compile(ASTSource(fn, signature(fn, dtype, full), full),
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
    every = DOT_KERNELS | {"_se_excite_kernel", "_se_squeeze_kernel", "_bn_finalize_kernel",
                           "_bn_running_update_kernel", "_bn_add_relu_kernel",
                           "_bn_act_backward_kernel"}
    assert every <= {r["kernel"] for r in records[1:]}
    assert every <= {r["kernel"] for r in records[1:] if r["dtype"] == "fp64"}


def test_kernels_compile_for_sm90(records):
    failed = [r for r in records[1:] if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)[:6000]


def test_dots_use_tensor_cores(records):
    for r in records[1:]:
        if r["kernel"] in DOT_KERNELS:
            assert r["mma"], r  # fp64: mma.sync m8n8k4 f64 (Hopper has no fp64 wgmma)
            # 16-bit tiles of 64+ rows use Hopper's wgmma; with N = 8 (group width 8)
            # triton 3.7 picks mma.sync and 3.9 wgmma m64n8k16: tensor cores either way.
            c = r["constexprs"]
            if r["dtype"] in ("bf16", "fp16") and c["BLOCK_M"] >= 64 and c["BLOCK_N"] >= 16:
                assert r["wgmma"], r


def test_shared_memory_fits_sm90(records):
    for r in records[1:]:
        assert r["shared"] <= SM90_MAX_SHARED, r


if __name__ == "__main__":
    print(json.dumps(compile_all()))
