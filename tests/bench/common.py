"""What the benchmarks share: timing one run, and the command line of a plot script."""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path


def timed(work: Callable[[], object]) -> float:
    """Seconds `work` takes, the garbage collector held off (it would bill one run for another's garbage)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    finally:
        gc.enable()


def compile_c(name: str, declarations: str, source: str, directory: Path):
    """A reference C loop built with cffi into `directory` (a temporary one: never kept) and
    imported from there: its (ffi, lib). cffi releases the GIL around each call."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(declarations)
    builder.set_source(name, source, extra_compile_args=["-O2"])
    library = builder.compile(tmpdir=str(directory))
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib


def save_figure(figure, png: Path) -> None:
    """Lay the figure out, write it as a PNG and free it."""
    import matplotlib.pyplot as plt  # only the plot scripts need it

    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)


def plot_command(draw: Callable[[dict, Path], None], usage: str | None, argv: list[str] | None = None) -> int:
    """`python -m tests.bench.plot_X REPORT.json OUT.png`: draw the report, say where."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(usage, file=sys.stderr)
        return 2
    source, png = map(Path, args)
    draw(json.loads(source.read_text()), png)
    print(f"wrote {png}", file=sys.stderr)
    return 0
