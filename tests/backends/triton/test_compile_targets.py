"""Every Triton kernel compiles for Hopper (sm_90) on this machine, GPU or not; its dots
become tensor-core instructions (fp64 dots: DMMA, mma.sync f64); and the conv kernels' SASS
meets the bar the GPU speed rests on: no spills, 16-byte cp.async loads of channel runs
whenever a group's channels come in 8s, and 3x3 main loops under 600 instructions per K step.

The interpreter accepts kernels the GPU compiler rejects (a 16-bit dot with K = 8, say), so
this is the CPU machine's guard for the GPU build. The conv kernels' specializations are
the real ones: their launchers run on meta tensors at the standard models' shapes under
`bench.capture` (recorded, not run); the elementwise kernels' are listed by hand. Both
compile in `bench.static`'s worker processes (no TRITON_INTERPRET there; results cached).
"""
import json

import pytest
import torch

from regnet_kernels.bench import static
from regnet_kernels.bench.capture import capture_launches

# Shared memory per block on sm_90 (227 KiB).
SM90_MAX_SHARED = 232448
GROUP_WIDTHS = [8, 16, 24, 40, 48, 56, 64, 72, 80, 112, 120, 128, 168, 232, 264]
# Dense 1x1 widths (conv a / c and shortcuts): narrow to wide.
DENSE_WIDTHS = [24, 152, 2016]
BATCH = 32
# The bar for a 3x3 conv's main loop (SASS instructions per K step, i.e. per iteration).
MAX_3X3_LOOP = 600
DOT_KERNELS = {"_conv_bn_act_kernel", "_conv1x1_gate_residual_kernel",
               "_conv_dgrad_kernel", "_conv_wgrad_kernel"}
ELEMENTWISE_KERNELS = {"_se_excite_kernel", "_se_squeeze_kernel", "_bn_finalize_kernel",
                       "_bn_merge_kernel",
                       "_bn_running_update_kernel", "_bn_add_relu_kernel",
                       "_bn_act_backward_kernel"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}


def meta_activation(n, c, h, w, dtype):
    return torch.empty(n, c, h, w, device="meta", dtype=dtype).to(
        memory_format=torch.channels_last)


def conv_launches(dtype):
    """Call the conv launchers on meta tensors at the standard models' shapes, in
    `dtype`: the group widths below as grouped 3x3s (eval with the SE squeeze, training
    forward with the BN prologue, dgrad and wgrad with their prologues), the dense 1x1
    widths, the stem and the block-end kernel with and without a projection. The
    launches are captured (see `captured_launches`), not run."""
    import importlib
    cba = importlib.import_module("regnet_kernels.backends.triton.conv_bn_act")
    grad = importlib.import_module("regnet_kernels.backends.triton.conv_grad")
    tail = importlib.import_module("regnet_kernels.backends.triton.conv1x1_gate_residual")
    vec = torch.float64 if dtype == torch.float64 else torch.float32

    def v(*shape):
        return torch.empty(*shape, device="meta", dtype=vec)

    # bf16: every other standard group width plus regnety_8gf's 56 (both ends, widths
    # aligned to 16 and not: each CIN_G / COUT_G path); fp16: three.
    widths = (sorted(set(GROUP_WIDTHS[::2]) | {56}) if dtype == torch.bfloat16
              else GROUP_WIDTHS[::7])
    shapes = [(3, cpg, 2, 14 if cpg % 2 else 28) for cpg in widths]       # grouped 3x3
    shapes += [(1, c, 1, 56) for c in (DENSE_WIDTHS if dtype == torch.bfloat16
                                       else DENSE_WIDTHS[:1])]         # dense 1x1
    for k, cpg, groups, size in shapes:
        c = cpg * groups
        x = meta_activation(BATCH, c, size, size, dtype)
        w = torch.empty(c, cpg, k, k, device="meta", dtype=dtype)
        for stride in (1, 2) if k == 3 else (1,):
            o = (size - 1) // stride + 1
            dy = meta_activation(BATCH, c, o, o, dtype)
            cba._launch(x, w, stride, groups, scale=v(c), shift=v(c), relu=True,
                        squeeze=k == 3)
            cba._launch(x, w, stride, groups, stats=True, in_scale=v(c), in_shift=v(c),
                        in_relu=True, gate=v(BATCH, c) if k == 1 else None)
            grad._dgrad_launch(dy, w, size, size, stride, groups, dy, v(c), v(c), v(c),
                               None, None, None)
            grad._wgrad_launch(x, dy, k, stride, groups, v(c), v(c), True,
                               v(BATCH, c) if k == 1 else None, dy, v(c), v(c), v(c),
                               None, None, None)
    if dtype == torch.bfloat16:  # raw-output variants: frozen BN, dgrad/wgrad without prologue
        x = meta_activation(BATCH, 112, 14, 14, dtype)
        w = torch.empty(112, 56, 3, 3, device="meta", dtype=dtype)
        cba._launch(x, w, 1, 2, stats=False, in_scale=v(112), in_shift=v(112), in_relu=True)
        grad._dgrad_launch(x, w, 14, 14, 1, 2, *(None,) * 7)
        grad._wgrad_launch(x, x, 3, 1, 2, None, None, False, None, *(None,) * 7)
        grad._dgrad_launch(x, w, 14, 14, 1, 2, x, v(112), v(112), v(112), x, v(112), v(112))
    stem = meta_activation(BATCH, 3, 224, 224, dtype)
    sw = torch.empty(32, 3, 3, 3, device="meta", dtype=dtype)
    cba._launch(stem, sw, 2, 1, scale=v(32), shift=v(32), relu=True)
    for c_in, c_out, size in ((168, 168, 56), (2016, 2016, 7)):
        x = meta_activation(BATCH, c_in, size, size, dtype)
        w = torch.empty(c_out, c_in, 1, 1, device="meta", dtype=dtype)
        tail._launch(x, w, v(c_out), v(c_out), v(BATCH, c_in), x, None, None, None, 1)
        tail._launch(x, w, v(c_out), v(c_out), None, x, None, None, None, 1)
    x = meta_activation(BATCH, 448, 28, 28, dtype)
    r = meta_activation(BATCH, 168, 56, 56, dtype)
    tail._launch(x, torch.empty(448, 448, 1, 1, device="meta", dtype=dtype), v(448), v(448),
                 v(BATCH, 448), r, torch.empty(448, 168, 1, 1, device="meta", dtype=dtype),
                 v(448), v(448), 2)


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
                        dict(AFFINE=affine, BLOCK_T=tiles["finalize"].BLOCK_T,
                             BLOCK_C=tiles["finalize"].BLOCK_C)))
        out.append(("_bn_merge_kernel", dtype, dict(BLOCK_T=tiles["finalize"].MERGE_BLOCK_T,
                                                    BLOCK_C=tiles["finalize"].MERGE_BLOCK_C)))
        for cumulative in (False, True):
            out.append(("_bn_running_update_kernel", dtype,
                        dict(CUMULATIVE=cumulative, BLOCK_C=tiles["finalize"].BLOCK_C)))
    return out


# The elementwise kernels' pointer arguments in the accumulation dtype: fp32 whatever the
# activations' dtype, fp64 for fp64 ones; other non-pointer arguments are i32 except these.
VECTOR_POINTERS = {"scale_ptr", "shift_ptr", "pscale_ptr", "pshift_ptr", "gate_ptr", "sums_ptr",
                   "in_scale_ptr", "in_shift_ptr", "m2_ptr", "sum_ptr", "gamma_ptr", "beta_ptr",
                   "rmean_ptr", "rvar_ptr", "mean_ptr", "inv_std_ptr", "rscale_ptr",
                   "rshift_ptr", "dy_a_ptr", "dy_b_ptr", "dy_c_ptr", "mask_scale_ptr",
                   "mask_shift_ptr", "dw_ptr", "stats_ptr", "part_ptr", "dgate_ptr"}
SPECIAL_ARGS = {"nbt_ptr": "*i64", "eps": "fp64", "momentum": "fp64"}


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


def elementwise_specs():
    """(dtype name, spec) of the hand-listed elementwise variants."""
    import importlib

    # the modules, not the functions of the same names that the package exports
    bn_act_backward, bn_add_relu, bn_finalize, se_excite = (
        importlib.import_module(f"regnet_kernels.backends.triton.{name}")
        for name in ("bn_act_backward", "bn_add_relu", "bn_finalize", "se_excite"))
    modules = {"_se_excite_kernel": se_excite, "_se_squeeze_kernel": se_excite,
               "_bn_act_backward_kernel": bn_act_backward, "_bn_add_relu_kernel": bn_add_relu,
               "_bn_finalize_kernel": bn_finalize, "_bn_running_update_kernel": bn_finalize,
               "_bn_merge_kernel": bn_finalize}
    variants = [("_se_excite_kernel", dtype, c) for dtype, c in se_excite_variants(
        se_excite._tiles)]
    variants += elementwise_variants({"squeeze": se_excite._squeeze_tiles,
                                      "finalize": bn_finalize,
                                      "bn_act_backward": bn_act_backward._tiles})
    for name, dtype, constexprs in variants:
        fn = getattr(modules[name], name)
        full = dict(constexprs, ACC_DTYPE="tl.fp64" if dtype == "fp64" else "tl.fp32")
        warps = 4  # the launchers' default; these two choose theirs
        if name == "_se_excite_kernel":
            warps = se_excite._num_warps(constexprs["BLOCK_S"], constexprs["BLOCK_C"])
        elif name == "_bn_act_backward_kernel":
            warps = bn_act_backward._num_warps(constexprs["BLOCK_M"], constexprs["BLOCK_C"])
        yield dtype, {"module": modules[name].__name__, "name": name,
                      "signature": signature(fn, dtype, full), "constexprs": full,
                      "attrs": {}, "options": {"num_warps": warps}}


def conv_specs():
    """(dtype name, spec) of every distinct conv specialization the launchers make."""
    seen = set()
    for name, dtype in DTYPES.items():
        with capture_launches() as recorder:
            conv_launches(dtype)
        for launch in recorder.launches:
            if launch.spec_key() not in seen:
                seen.add(launch.spec_key())
                yield name, launch.spec()


def tuning_candidate_specs():
    """A grouped 3x3 eval conv and its dgrad under every tuning candidate's options."""
    from regnet_kernels.backends.triton.tuning import CANDIDATES

    def launches():
        import importlib
        cba = importlib.import_module("regnet_kernels.backends.triton.conv_bn_act")
        grad = importlib.import_module("regnet_kernels.backends.triton.conv_grad")
        x = meta_activation(BATCH, 896, 14, 14, torch.bfloat16)
        w = torch.empty(896, 56, 3, 3, device="meta", dtype=torch.bfloat16)
        v = torch.empty(896, device="meta")
        cba._launch(x, w, 1, 16, scale=v, shift=v, relu=True, squeeze=True)
        grad._dgrad_launch(x, w, 14, 14, 1, 16, x, v, v, v, None, None, None)

    with capture_launches() as recorder:
        launches()
    for launch in recorder.launches:
        for options in CANDIDATES:
            yield "bf16", dict(launch.spec(), options=dict(launch.options, **options))


@pytest.fixture(scope="module")
def records():
    specs = list(conv_specs()) + list(elementwise_specs()) + list(tuning_candidate_specs())
    results = static.run_jobs([{"kind": "triton", "spec": spec, "capability": 90}
                               for _, spec in specs], workers=2)
    return [dict(result, kernel=spec["name"], dtype=dtype, constexprs=spec["constexprs"],
                 options=spec["options"]) for (dtype, spec), result in zip(specs, results)]


def show(r):
    keep = ("kernel", "dtype", "constexprs", "options", "registers", "spill_stores", "stack",
            "shared", "load_kinds", "loop", "error")
    return json.dumps({k: r.get(k) for k in keep}, default=str)[:3000]


def test_every_kernel_has_compile_variants(records):
    compiled = {r["kernel"] for r in records}
    assert DOT_KERNELS | ELEMENTWISE_KERNELS <= compiled
    assert DOT_KERNELS | ELEMENTWISE_KERNELS <= {r["kernel"] for r in records
                                                 if r["dtype"] == "fp64"}
    import importlib
    import pkgutil

    import regnet_kernels.backends.triton as triton_pkg
    defined = {name for mod in pkgutil.iter_modules(triton_pkg.__path__)
               for name in vars(importlib.import_module(f"{triton_pkg.__name__}.{mod.name}"))
               if name.startswith("_") and name.endswith("_kernel")}
    assert defined == compiled, "a kernel without compile variants, or a stale name here"


def test_kernels_compile_for_sm90(records):
    failed = [show(r) for r in records if not r["ok"]]
    assert not failed, "\n".join(failed)[:6000]


def test_dots_use_tensor_cores(records):
    for r in records:
        if r["kernel"] in DOT_KERNELS:
            # fp64: DMMA (mma.sync m8n8k4 f64; Hopper has no fp64 wgmma)
            assert r["mma_kind"] in ("wgmma", "mma.sync", "dmma"), show(r)
            # 16-bit tiles of 64+ rows use Hopper's wgmma; with N = 8 (group width 8)
            # triton 3.7 picks mma.sync and 3.9 wgmma m64n8k16: tensor cores either way.
            c = r["constexprs"]
            if r["dtype"] in ("bf16", "fp16") and c["BLOCK_M"] >= 64 and c["BLOCK_N"] >= 16:
                assert r["mma_kind"] == "wgmma", show(r)


def test_shared_memory_fits_sm90(records):
    for r in records:
        assert r["shared"] <= SM90_MAX_SHARED, show(r)


def test_no_spills(records):
    """No kernel of the activations' GPU dtypes spills (ptxas's spill bytes; no local
    memory in the SASS)."""
    for r in records:
        if r["dtype"] in ("bf16", "fp16"):
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, show(r)
            assert not r["local_bytes"]["load"] and not r["local_bytes"]["store"], show(r)


def channel_runs(r) -> int:
    """Channels a conv kernel loads as one contiguous run from its activation input."""
    c = r["constexprs"]
    return c.get("CIN_G") if r["kernel"] != "_conv_dgrad_kernel" else c.get("COUT_G")


def test_conv_loads_are_16_byte_async(records):
    """Channel runs of 8 x 16 bits load with 16-byte cp.async (LDGSTS.128) in the main loop.
    Where the compiler unrolled a short constant loop (nothing to pipeline: one K step of a
    narrow 1x1), they still load 16 bytes at a time."""
    for r in records:
        runs = channel_runs(r) if r["kernel"] in DOT_KERNELS else None
        if r["dtype"] in ("bf16", "fp16") and runs and runs % 8 == 0:
            if r["loop"]:
                assert r["loop"]["loads"].get("LDGSTS.16"), show(r)
            else:
                assert r["loads"].get("LDGSTS.16") or r["loads"].get("LDG.16"), show(r)


def test_3x3_main_loops_are_short(records):
    """At most MAX_3X3_LOOP instructions per K step: the main loop's body, or, where the
    compiler unrolled the constant 9 x chunks loop (narrow groups), the whole kernel per
    step."""
    for r in records:
        c = r["constexprs"]
        if (r["kernel"] in DOT_KERNELS and r["dtype"] in ("bf16", "fp16")
                and c.get("KSIZE") == 3 and (channel_runs(r) or 0) >= 8):
            if r["loop"]:
                assert r["loop"]["mma"] and r["loop"]["local"] == 0, show(r)
                assert r["loop"]["instructions"] <= MAX_3X3_LOOP, show(r)
            else:
                steps = 9 * -(-channel_runs(r) // c["BLOCK_K"])
                assert r["instructions"] <= MAX_3X3_LOOP * steps, show(r)


@pytest.mark.parametrize("model", ["regnety_8gf", "regnetx_400mf"])
def test_no_recompile_per_batch_size(model):
    """The fused model's eval forward and training step specialize the same kernels at
    batch 64 and 256 (row counts are not specialized on; tiles follow the per-image
    shapes), so a new batch size compiles nothing new."""
    from regnet_kernels.bench.capture import capture_model

    def specializations(batch):
        launches, _ = capture_model(model, batch, "bf16", ("eval", "train"))
        return {launch.spec_key() for launch in launches}

    assert specializations(64) == specializations(256)
