"""Reading a compiled kernel without running it: SASS, ptxas's report, occupancy.

Pure functions over text (a ``nvdisasm`` / ``cuobjdump -sass`` listing, a ``ptxas -v`` log)
plus thin wrappers that run NVIDIA's tools on a cubin. The static report
(`regnet_kernels.bench.static`) uses them for every kernel it compiles, and a test can assert
properties of a rewritten kernel with them, e.g.::

    stats = analyse_sass(disassemble(kernel.asm["cubin"]))
    assert stats.loads.get("LDGSTS.128") and stats.mma_kind == "wgmma"
    assert stats.main_loop and stats.main_loop.instructions < 200 and not stats.main_loop.local

What is counted (static counts: each instruction once, however often it runs):
- loads by kind: ``LDG.<bytes>`` (global loads and their width: 16 = LDG.E.128, 8, 4, 2 =
  16-bit, 1), ``LDGSTS.<bytes>`` (cp.async, global to shared, its width), ``UTMALDG`` (TMA
  bulk tensor loads), ``LDS`` / ``LDSM`` (shared loads, ldmatrix), ``LDL`` (local memory);
  stores ``STG.<bytes>``, ``STS``, ``STL``, ``UTMASTG``;
- MMAs: ``HGMMA`` (Hopper wgmma, one per warpgroup), ``HMMA`` (mma.sync), ``DMMA`` (fp64),
  ``IMMA``; the kind is "wgmma", "mma.sync", "dmma" or "none";
- the main loop: the innermost loop (a backward branch and its target) that contains MMA
  instructions (else the largest innermost loop): its instruction count (what a warp issues
  per iteration, branches not taken included), its MMAs and its local-memory accesses (spills
  in the loop are the expensive ones).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------


def find_tool(name: str) -> str:
    """Path of an NVIDIA tool (nvdisasm, cuobjdump, ptxas, cu++filt): Triton's bundled copy
    first (it matches the ptxas Triton compiles with), then the CUDA toolkit, then PATH."""
    candidates = []
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:  # pragma: no cover - the C++ parts still work
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if home:
            candidates.append(Path(home) / "bin" / name)
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (looked in triton's bundled tools, CUDA_HOME, "
                            "/usr/local/cuda and PATH)")


def _with_cubin_file(cubin: bytes, args: list[str], tool: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        proc = subprocess.run([find_tool(tool), *args, path], capture_output=True, text=True,
                              check=True)
        return proc.stdout
    finally:
        os.unlink(path)


def disassemble(cubin: bytes) -> str:
    """The SASS of every function of a cubin (``nvdisasm``, with labels for branch targets)."""
    return _with_cubin_file(cubin, [], "nvdisasm")


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage``: per function REG, STACK, SHARED (static),
    LOCAL, ... as integers."""
    out = _with_cubin_file(cubin, ["--dump-resource-usage"], "cuobjdump")
    usage, current = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return usage


# ---------------------------------------------------------------------------
# ptxas -v
# ---------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_PROPS = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
                    r"(?P<ld>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """Per entry function of a ``ptxas -v`` log: registers, spill_stores, spill_loads (bytes),
    stack (bytes) and static smem (bytes)."""
    kernels = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        entry = _ENTRY.search(block)
        if not entry:
            continue
        props, used, smem = _PROPS.search(block), _USED.search(block), _SMEM.search(block)
        kernels[entry["name"]] = {
            "arch": entry["arch"],
            "registers": int(used["regs"]) if used else None,
            "spill_stores": int(props["st"]) if props else None,
            "spill_loads": int(props["ld"]) if props else None,
            "stack": int(props["stack"]) if props else None,
            "static_smem": int(smem["smem"]) if smem else 0,
        }
    return kernels


def triton_ptxas(capability: int = 90) -> str:
    """The ptxas Triton compiles with for a compute capability (Triton ships two: sm_90 and
    up use ``ptxas-blackwell``), else the first ptxas found."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(capability).path
    except Exception:  # noqa: BLE001 - an older / newer Triton: any ptxas will do
        return find_tool("ptxas")


def ptxas_verbose(ptx: str, arch: str = "sm_90a", extra: tuple[str, ...] = ()) -> str:
    """Run ``ptxas -v`` on PTX (Triton's ptxas and flags: -lineinfo, --regAllocOptLevel=2)
    and return its log; the cubin is thrown away."""
    capability = int(re.sub(r"\D", "", arch) or 90)
    with tempfile.TemporaryDirectory(prefix="rk_ptxas_") as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([triton_ptxas(capability), "-lineinfo", "-v", "--regAllocOptLevel=2",
                               *extra, f"--gpu-name={arch}", str(src), "-o",
                               str(Path(tmp) / "k.o")], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ptxas failed:\n{proc.stderr[-2000:]}")
        return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# SASS
# ---------------------------------------------------------------------------

_INSTR = re.compile(r"/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P\w+\s+)?(?P<op>[A-Z][A-Z0-9_]*"
                    r"(?:\.[A-Za-z0-9_]+)*)(?P<rest>[^;]*);")
_LABEL = re.compile(r"^\s*(?P<label>\.L_\w+):")
_FUNC = re.compile(r"^\s*\.text\.(?P<name>\S+):|^\s*(?P<name2>[A-Za-z_$][\w$]*):\s*$")
_TARGET = re.compile(r"`\((?P<label>\.L_\w+)\)")
_BRANCHES = ("BRA", "BRX", "JMP", "JMX")

MMA_KINDS = {"HGMMA": "wgmma", "HMMA": "mma.sync", "DMMA": "dmma", "IMMA": "imma",
             "IGMMA": "wgmma", "QGMMA": "wgmma"}


@dataclass
class Instr:
    """One SASS instruction: its address, opcode with modifiers, operands, branch target."""

    addr: int
    op: str
    operands: str
    predicated: bool
    target: int | None = None

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class Loop:
    """A loop of the SASS: [start, end] addresses (end = the backward branch)."""

    start: int
    end: int
    instructions: int = 0
    mma: int = 0
    local: int = 0        # LDL + STL in the loop
    loads: dict = field(default_factory=dict)       # kind -> count, as SassStats.loads
    mma_shapes: dict = field(default_factory=dict)  # "HGMMA.64x128x16" -> count

    def load_bytes_per_thread(self) -> int:
        """Global bytes one thread loads per iteration (LDG and LDGSTS widths)."""
        return sum(int(k.split(".")[1]) * n for k, n in self.loads.items()
                   if k.split(".")[0] in ("LDG", "LDGSTS"))

    def macs_per_iteration(self, num_warps: int) -> int:
        """Multiply-adds a CTA of ``num_warps`` warps does per iteration: every warp issues
        each MMA; an HGMMA's shape is a warpgroup's (4 warps), an HMMA's a warp's."""
        total = 0
        for shape, n in self.mma_shapes.items():
            macs = mma_macs(shape) or 0
            per_group = 4 if shape.startswith(("HGMMA", "IGMMA", "QGMMA")) else 1
            total += n * macs * num_warps // per_group
        return total


@dataclass
class SassStats:
    """Static counts of one function's SASS (see the module docstring)."""

    instructions: int
    loads: dict            # kind -> static count (LDG.16, LDGSTS.16, UTMALDG, LDS, LDSM, LDL...)
    stores: dict           # STG.<bytes>, STS, STL, UTMASTG...
    mma: dict              # HGMMA / HMMA / DMMA... -> static count
    mma_shapes: dict       # e.g. "HGMMA.64x128x16.F32.BF16" -> count
    local_bytes: dict      # {"load": bytes of LDL, "store": bytes of STL} (static)
    loops: list
    main_loop: Loop | None

    @property
    def mma_kind(self) -> str:
        """"wgmma", "mma.sync", "dmma", "imma" or "none" (the most frequent kind)."""
        if not self.mma:
            return "none"
        return MMA_KINDS.get(max(self.mma, key=self.mma.get), "other")

    def load_kinds(self) -> str:
        """A short description: e.g. "LDG16x4 cp.async16x8 LDSMx8 LDSx2"."""
        names = {"LDGSTS": "cp.async", "UTMALDG": "TMA"}
        parts = []
        for kind, n in sorted(self.loads.items()):
            base, _, width = kind.partition(".")
            parts.append(f"{names.get(base, base)}{width}x{n}")
        return " ".join(parts)


def _width(op: str, default: int = 4) -> int:
    """Bytes per thread of a memory instruction from its modifiers."""
    mods = op.split(".")[1:]
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("16", 2), ("U8", 1),
                      ("S8", 1), ("32", 4)):
        if mod in mods:
            return size
    return default


def _mem_kind(op: str) -> tuple[str, str] | None:
    """("load" | "store", kind) of a memory instruction, or None."""
    base = op.split(".")[0]
    if base in ("LDG", "LDGSTS"):
        return "load", f"{base}.{_width(op)}"
    if base in ("LDS", "LDSM", "LDL", "UTMALDG", "LDC", "ULDC", "LD"):
        if base in ("LDC", "ULDC"):
            return None  # constant bank (kernel arguments): not memory traffic
        return "load", base
    if base == "STG":
        return "store", f"STG.{_width(op)}"
    if base in ("STS", "STL", "UTMASTG", "ST", "STSM", "RED", "ATOM", "ATOMG", "REDG"):
        return "store", base
    return None


def parse_sass(text: str, function: str | None = None) -> list[Instr]:
    """The instructions of one function of a SASS listing (``function`` None: the first one;
    a listing of one kernel has one). Branch targets are resolved to addresses."""
    funcs: dict[str, list[tuple[str, object]]] = {}
    current = None
    for line in text.splitlines():
        f = re.match(r"^\s*\.text\.(?P<name>\S+?):?\s*$", line) or \
            re.match(r"^\s*\.section\s+\.text\.(?P<name>[^,\s]+)", line)
        if f:
            current = f["name"]
            funcs.setdefault(current, [])
            continue
        if current is None:
            # cuobjdump -sass: "Function : name"
            m = re.match(r"^\s*Function\s*:\s*(?P<name>\S+)", line)
            if m:
                current = m["name"]
                funcs.setdefault(current, [])
            continue
        m = re.match(r"^\s*Function\s*:\s*(?P<name>\S+)", line)
        if m:
            current = m["name"]
            funcs.setdefault(current, [])
            continue
        label = _LABEL.match(line)
        if label:
            funcs[current].append(("label", label["label"]))
            continue
        ins = _INSTR.search(line)
        if ins:
            funcs[current].append(("ins", ins))
    if not funcs:
        raise ValueError("no function found in the SASS listing")
    if function is None:
        items = next(iter(funcs.values()))
    else:
        matches = [k for k in funcs if k == function or k.endswith(function)]
        if not matches:
            raise KeyError(f"no function {function!r} in the listing ({', '.join(funcs)})")
        items = funcs[matches[0]]
    labels, instrs, pending = {}, [], []
    for kind, item in items:
        if kind == "label":
            pending.append(item)
            continue
        addr = int(item["addr"], 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append(Instr(addr, item["op"], item["rest"].strip(), bool(item["pred"])))
    for lab in pending:  # a label after the last instruction
        labels[lab] = (instrs[-1].addr + 16) if instrs else 0
    for ins in instrs:
        if ins.base in _BRANCHES:
            t = _TARGET.search(ins.operands)
            if t and t["label"] in labels:
                ins.target = labels[t["label"]]
            else:
                hexaddr = re.search(r"0x([0-9a-f]+)", ins.operands)
                if hexaddr:
                    ins.target = int(hexaddr.group(1), 16)
    return instrs


def function_names(text: str) -> list[str]:
    """The functions of a SASS listing (nvdisasm ``.text.<name>`` sections)."""
    names = re.findall(r"^\s*\.text\.(\S+?):?\s*$", text, flags=re.M)
    names += re.findall(r"^\s*Function\s*:\s*(\S+)", text, flags=re.M)
    return list(dict.fromkeys(names))


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every backward branch's loop [target, branch], with its counts."""
    loops = []
    for ins in instrs:
        if ins.base in _BRANCHES and ins.target is not None and ins.target <= ins.addr:
            if ins.target == ins.addr:
                continue  # the "BRA self" trap after EXIT
            body = [i for i in instrs if ins.target <= i.addr <= ins.addr]
            loop = Loop(ins.target, ins.addr, len(body))
            loads, shapes = Counter(), Counter()
            for i in body:
                if i.base in MMA_KINDS:
                    loop.mma += 1
                    shapes[".".join(i.op.split(".")[:2])] += 1
                if i.base in ("LDL", "STL"):
                    loop.local += 1
                kind = _mem_kind(i.op)
                if kind and kind[0] == "load":
                    loads[kind[1]] += 1
            loop.loads, loop.mma_shapes = dict(loads), dict(shapes)
            loops.append(loop)
    return loops


def _innermost(loops: list[Loop]) -> list[Loop]:
    return [lp for lp in loops
            if not any(o is not lp and lp.start <= o.start and o.end <= lp.end
                       and (o.start, o.end) != (lp.start, lp.end) for o in loops)]


def main_loop(loops: list[Loop]) -> Loop | None:
    """The innermost loop with MMAs (the most MMAs, then the longest): one that contains
    no other loop if there is such a loop with MMAs (a fallback path whose MMA loop
    nests an element-wise load loop is not the main loop), else the innermost among the
    loops with MMAs; without MMAs in any loop, the longest innermost loop; None without
    loops."""
    if not loops:
        return None
    with_mma = [lp for lp in loops if lp.mma]
    if with_mma:
        leaves = [lp for lp in _innermost(loops) if lp.mma]
        inner = leaves or _innermost(with_mma)
        return max(inner, key=lambda lp: (lp.mma, lp.instructions))
    return max(_innermost(loops), key=lambda lp: lp.instructions)


def analyse_sass(text: str, function: str | None = None) -> SassStats:
    """Counts of one function of a SASS listing (see the module docstring)."""
    instrs = parse_sass(text, function)
    loads, stores, mma, shapes = Counter(), Counter(), Counter(), Counter()
    local = {"load": 0, "store": 0}
    for ins in instrs:
        if ins.base in MMA_KINDS:
            mma[ins.base] += 1
            shapes[".".join(ins.op.split(".")[:4])] += 1
        kind = _mem_kind(ins.op)
        if kind:
            (loads if kind[0] == "load" else stores)[kind[1]] += 1
        if ins.base == "LDL":
            local["load"] += _width(ins.op)
        elif ins.base == "STL":
            local["store"] += _width(ins.op)
    loops = find_loops(instrs)
    return SassStats(len(instrs), dict(loads), dict(stores), dict(mma), dict(shapes), local,
                     loops, main_loop(loops))


def mma_macs(shape: str) -> int | None:
    """Multiply-adds of one MMA instruction per warp (HMMA) or warpgroup (HGMMA) from its
    shape modifier, e.g. "HGMMA.64x128x16.F32.BF16" -> 131072, "HMMA.16816.F32.BF16" -> 4096."""
    parts = shape.split(".")
    if len(parts) < 2:
        return None
    dims = parts[1]
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", dims)
    if m:
        a, b, c = map(int, m.groups())
        return a * b * c
    m = re.fullmatch(r"(\d{2})(\d)(\d{1,2})", dims)  # HMMA.16816: m16 n8 k16; .1688: m16n8k8
    if m:
        a, b, c = map(int, m.groups())
        return a * b * c
    m = re.fullmatch(r"884", dims)  # DMMA.884: m8n8k4
    if m:
        return 8 * 8 * 4
    return None


# ---------------------------------------------------------------------------
# Occupancy
# ---------------------------------------------------------------------------

#: Per-SM limits of sm_90 (CUDA programming guide, compute capability 9.0; HOPPER.md).
SM90_LIMITS = {"regs_per_sm": 65536, "regs_per_thread": 255, "reg_alloc_unit": 256,
               "max_warps_per_sm": 64, "max_ctas_per_sm": 32,
               "smem_per_sm": 228 * 1024, "smem_per_cta": 227 * 1024,
               "smem_reserved_per_cta": 1024}


def ctas_per_sm(registers: int, shared: int, num_warps: int,
                limits: dict = SM90_LIMITS) -> tuple[int, str]:
    """Resident CTAs per SM and what limits it ("regs", "smem", "warps", "ctas").

    Registers are allocated per warp in units of 256 (``registers`` per thread rounded up to
    8); each CTA's shared memory gets 1 KB reserved on top. 0 CTAs: the kernel cannot launch.
    """
    regs_per_warp = -(-max(registers, 1) * 32 // limits["reg_alloc_unit"]) * limits["reg_alloc_unit"]
    by_regs = (limits["regs_per_sm"] // regs_per_warp) // num_warps
    per_cta_smem = shared + limits["smem_reserved_per_cta"]
    by_smem = limits["smem_per_sm"] // per_cta_smem if shared <= limits["smem_per_cta"] else 0
    by_warps = limits["max_warps_per_sm"] // num_warps
    bounds = {"regs": by_regs, "smem": by_smem, "warps": by_warps,
              "ctas": limits["max_ctas_per_sm"]}
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter], limiter
