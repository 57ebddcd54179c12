"""The standard RegNet models and every name people use for them.

Canonical names:
  * ``regnetx_200mf`` ... ``regnetx_32gf``, ``regnety_200mf`` ... ``regnety_32gf``: the
    paper's networks (pycls configurations, "pycls" rounding); ``regnety_128gf`` (torchvision,
    timm), ``regnety_64gf`` and ``regnety_256gf`` (timm's ``regnety_640``, ``regnety_2560``,
    the SEER models), with the same rounding.
  * ``regnet_x_400mf`` ... ``regnet_y_128gf``: torchvision's builders ("torchvision" rounding),
    which differ from the paper's networks for X-400MF, Y-800MF and Y-8GF.

Aliases (looked up case-insensitively): the pycls names (``RegNetY-8.0GF``), dotted spellings
(``regnetx_1.6gf``, ``regnetx_4.0gf``), timm names (``regnety_080``, ``regnety_1280``) and timm's
torchvision variants (``regnety_080_tv``).
"""
from __future__ import annotations

import dataclasses
import difflib

from .design import AnyNetParams, RegNetParams

Y_SE_RATIO = 0.25

# (family, size as pycls writes it, d, w0, wa, wm, g); b = 1 and stem 32 throughout.
_PAPER_CONFIGS = (
    ("X", "200MF", 13, 24, 36.44, 2.49, 8),
    ("X", "400MF", 22, 24, 24.48, 2.54, 16),
    ("X", "600MF", 16, 48, 36.97, 2.24, 24),
    ("X", "800MF", 16, 56, 35.73, 2.28, 16),
    ("X", "1.6GF", 18, 80, 34.01, 2.25, 24),
    ("X", "3.2GF", 25, 88, 26.31, 2.25, 48),
    ("X", "4.0GF", 23, 96, 38.65, 2.43, 40),
    ("X", "6.4GF", 17, 184, 60.83, 2.07, 56),
    ("X", "8.0GF", 23, 80, 49.56, 2.88, 120),
    ("X", "12GF", 19, 168, 73.36, 2.37, 112),
    ("X", "16GF", 22, 216, 55.59, 2.1, 128),
    ("X", "32GF", 23, 320, 69.86, 2.0, 168),
    ("Y", "200MF", 13, 24, 36.44, 2.49, 8),
    ("Y", "400MF", 16, 48, 27.89, 2.09, 8),
    ("Y", "600MF", 15, 48, 32.54, 2.32, 16),
    ("Y", "800MF", 14, 56, 38.84, 2.4, 16),
    ("Y", "1.6GF", 27, 48, 20.71, 2.65, 24),
    ("Y", "3.2GF", 21, 80, 42.63, 2.66, 24),
    ("Y", "4.0GF", 22, 96, 31.41, 2.24, 64),
    ("Y", "6.4GF", 25, 112, 33.22, 2.27, 72),
    ("Y", "8.0GF", 17, 192, 76.82, 2.19, 56),
    ("Y", "12GF", 19, 168, 73.36, 2.37, 112),
    ("Y", "16GF", 18, 200, 106.23, 2.48, 112),
    ("Y", "32GF", 20, 232, 115.89, 2.53, 232),
    ("Y", "64GF", 20, 352, 147.48, 2.4, 328),  # timm only (SEER); no pycls config
    ("Y", "128GF", 27, 456, 160.83, 2.52, 264),  # torchvision/timm only; no pycls config
    ("Y", "256GF", 27, 640, 230.83, 2.53, 373),  # timm only (SEER); no pycls config
)

# The models torchvision ships, as (family, size).
_TORCHVISION_MODELS = (
    ("X", "400MF"), ("X", "800MF"), ("X", "1.6GF"), ("X", "3.2GF"),
    ("X", "8.0GF"), ("X", "16GF"), ("X", "32GF"),
    ("Y", "400MF"), ("Y", "800MF"), ("Y", "1.6GF"), ("Y", "3.2GF"),
    ("Y", "8.0GF"), ("Y", "16GF"), ("Y", "32GF"), ("Y", "128GF"),
)

# Those whose torchvision widths differ from the paper's; timm calls them "<timm name>_tv".
_TORCHVISION_DIFFERS = (("X", "400MF"), ("Y", "800MF"), ("Y", "8.0GF"))


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A standard model: its canonical name, parameters, and the other names it goes by."""

    name: str
    params: RegNetParams
    aliases: tuple[str, ...]


class UnknownModelError(KeyError, ValueError):
    """An unknown model name; the message suggests the closest known names.

    A KeyError (a failed lookup) and a ValueError (a bad argument), so either catches it.
    """

    def __str__(self) -> str:
        return str(self.args[0])


def _size_slug(size: str) -> str:
    """'1.6GF' -> '1_6gf', '8.0GF' -> '8gf', '200MF' -> '200mf'."""
    return size.lower().replace(".0", "").replace(".", "_")


def _timm_digits(size: str) -> str:
    """timm spells a size as GF x 10 in (at least) three digits: '200MF' -> '002'."""
    gigaflops = float(size[:-2]) / (1000 if size.endswith("MF") else 1)
    return f"{round(gigaflops * 10):03d}"


def _build_zoo() -> dict[str, ZooEntry]:
    zoo: dict[str, ZooEntry] = {}
    for family, size, depth, w0, wa, wm, g in _PAPER_CONFIGS:
        f = family.lower()
        key = (family, size)
        pycls_params = RegNetParams(
            depth, w0, wa, wm, g, se_ratio=Y_SE_RATIO if family == "Y" else 0.0
        )
        paper_aliases = {
            f"RegNet{family}-{size}",  # pycls
            f"regnet{f}_{size.lower()}",  # dotted: regnetx_1.6gf, regnetx_4.0gf
            f"regnet{f}_{_timm_digits(size)}",  # timm
        }
        paper_name = f"regnet{f}_{_size_slug(size)}"
        paper_aliases.discard(paper_name)
        zoo[paper_name] = ZooEntry(paper_name, pycls_params, tuple(sorted(paper_aliases)))
        if key in _TORCHVISION_MODELS:
            tv_name = f"regnet_{f}_{_size_slug(size)}"
            differs = key in _TORCHVISION_DIFFERS
            tv_aliases = (f"regnet{f}_{_timm_digits(size)}_tv",) if differs else ()
            tv_params = dataclasses.replace(pycls_params, rounding="torchvision")
            zoo[tv_name] = ZooEntry(tv_name, tv_params, tv_aliases)
    # List the paper's models first, then torchvision's (a stable sort keeps each group's order).
    return dict(sorted(zoo.items(), key=lambda item: item[0].startswith("regnet_")))


_ZOO = _build_zoo()
# Every accepted spelling, lowercased, -> canonical name.
_LOOKUP = {
    spelling.lower(): entry.name
    for entry in _ZOO.values()
    for spelling in (entry.name, *entry.aliases)
}


def list_models() -> list[str]:
    """The canonical names of all standard models: the paper's, then torchvision's."""
    return list(_ZOO)


def canonical_name(name: str) -> str:
    """The canonical name for any accepted spelling; raises UnknownModelError otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a model name is a str such as 'regnety_400mf', got {name!r} "
                        f"({type(name).__name__})")
    key = name.strip().lower()
    if key in _LOOKUP:
        return _LOOKUP[key]
    close = difflib.get_close_matches(key, _LOOKUP, n=8, cutoff=0.6)
    suggestions = list(dict.fromkeys(_LOOKUP[c] for c in close))[:3]
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
    raise UnknownModelError(f"unknown model {name!r}{hint} (see `python -m regnet_kernels list`)")


def zoo_entry(name: str) -> ZooEntry:
    """The standard model called ``name`` (any accepted spelling)."""
    return _ZOO[canonical_name(name)]


def model_params(name: str) -> RegNetParams:
    """The :class:`RegNetParams` of a standard model (any accepted spelling)."""
    return zoo_entry(name).params


def resolve_params(
    name_or_params: str | RegNetParams | AnyNetParams,
) -> RegNetParams | AnyNetParams:
    """Accept either a model name or parameters (RegNetParams, or AnyNetParams of a
    design-space sample); return parameters."""
    if isinstance(name_or_params, (RegNetParams, AnyNetParams)):
        return name_or_params
    if not isinstance(name_or_params, str):
        raise TypeError(f"expected a model name such as 'regnety_400mf', RegNetParams or "
                        f"AnyNetParams, got "
                        f"{name_or_params!r} ({type(name_or_params).__name__})")
    return model_params(name_or_params)
