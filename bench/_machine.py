"""What every bench prints above its table: the machine, the load on it, the command that made the numbers."""

from __future__ import annotations

import os
import platform
import shlex
import sys


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header() -> str:
    """Lines naming the machine, torch/transformers versions, the load average and the command."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return "\n".join([
        f"machine: {cpu_name()}, {os.cpu_count()} cores, GPU: {gpu}; {platform.system()} {platform.release()}",
        f"software: python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
        f", {torch.get_num_threads()} torch threads",
        f"load average (1/5/15 min) at the end: {load}",
        f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}",
    ])


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table (markdown-compatible)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
