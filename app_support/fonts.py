"""Pick an installed CJK font for matplotlib by name, so Chinese labels do not come out as boxes.

matplotlib's default DejaVu Sans has no CJK glyphs. Debian's fonts-noto-cjk (installed by
`make system-deps`) gives "Noto Sans CJK SC"; the others are fallbacks seen on other systems.
"""

from __future__ import annotations

from functools import lru_cache

# Preferred first: Simplified Chinese forms match the data.
CJK_FONT_NAMES = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Heiti SC",
    "Noto Sans CJK JP",
)
# File-name hints for fonts installed after matplotlib built its font cache.
_FILE_HINTS = ("notosanscjk", "wqy", "sourcehansans", "msyh", "simhei", "pingfang")


def _installed_names() -> set[str]:
    from matplotlib import font_manager

    return {entry.name for entry in font_manager.fontManager.ttflist}


def _add_system_cjk_files() -> None:
    """Register CJK font files matplotlib's cached font list does not know yet."""
    from matplotlib import font_manager

    for path in font_manager.findSystemFonts():
        if any(hint in path.lower().replace("-", "").replace("_", "") for hint in _FILE_HINTS):
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):  # an unreadable font file is not our problem
                continue


@lru_cache(maxsize=1)
def cjk_font_name() -> str | None:
    """The first installed font of CJK_FONT_NAMES, or None if there is none."""
    names = _installed_names()
    found = next((name for name in CJK_FONT_NAMES if name in names), None)
    if found is None:
        _add_system_cjk_files()
        names = _installed_names()
        found = next((name for name in CJK_FONT_NAMES if name in names), None)
    return found


def use_cjk_font() -> str | None:
    """Make matplotlib draw with the CJK font (DejaVu Sans kept as fallback); returns its name."""
    import matplotlib

    name = cjk_font_name()
    if name:
        matplotlib.rcParams["font.family"] = "sans-serif"
        matplotlib.rcParams["font.sans-serif"] = [name, "DejaVu Sans"]
    # The CJK fonts lack U+2212 (the minus matplotlib draws on negative ticks).
    matplotlib.rcParams["axes.unicode_minus"] = False
    return name
