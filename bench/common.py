"""Small helpers shared by the CPU benchmarks: memory readings, the tiny trained model, printing."""

from __future__ import annotations

import os
import resource
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def set_threads(n: int) -> int:
    """Pin torch's intra-op threads (0 keeps torch's default, one per core).

    On a small box shared with other jobs, two OpenMP threads per process oversubscribe the cores:
    every op then waits at a barrier for a descheduled thread, which slows large batched ops far
    more than small ones and turns a fair comparison into a lottery. One thread per process keeps
    both ways on the same footing (measured: docs in bench/README.md).
    """
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def current_rss_mb() -> float | None:
    """Resident set size now (Linux /proc; None elsewhere). torch tensors live outside tracemalloc's view."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process image.

    Linux VmHWM first: ru_maxrss survives exec, so a child started from a big parent would report
    the parent's size (the kernel carries the forking process's high-water mark over exec).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def percentile(values: list[float], q: float) -> float:
    """Percentile with linear interpolation between samples (statistics.quantiles, inclusive); q in 1..99."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def machine_line() -> str:
    import platform

    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    load_text = f", load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (1/5/15 min)" if load else ""
    return (
        f"machine: {platform.machine()} {os.cpu_count()} CPU(s), torch {torch.__version__} "
        f"using {torch.get_num_threads()} thread(s){load_text}"
    )


def print_comparison(rows: list[tuple[str, str, str]], label_width: int, column_width: int) -> None:
    """A baseline | ours table: one (label, baseline value, ours value) row per line, values already formatted."""
    print(f"\n{'':{label_width}}{'baseline':>{column_width}}{'ours':>{column_width}}")
    for label, baseline, ours in rows:
        print(f"{label:{label_width}}{baseline:>{column_width}}{ours:>{column_width}}")


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "SHORT"


def refuse_invalid(problems: list[str]) -> None:
    """Stop with every problem of a benchmark's config at once, before anything slow starts."""
    if problems:
        raise SystemExit("invalid benchmark config:\n  - " + "\n  - ".join(problems))


def parse_checked(config_class, argv, description: str):
    """A benchmark's config from flags (core.config.parse_config), checked by its validate()."""
    from core.config import parse_config

    cfg = parse_config(config_class, argv, description)
    cfg.validate()
    return cfg
