"""Decode-step A/B of two builds of edgelm's kernels in one process: the current source's build
against an earlier build's .so (e.g. ~/.cache/edgelm/kernels/edgelm_cpu_<hash>/*.so from a
previous commit), alternating rounds, medians. Noise on a small shared CPU is larger than most
kernel changes between separate runs; side by side in one process it is not.

    python benchmarks/kernel_ab.py OLD.so [--quant int8|gguf|int4] [--rounds 4] [--steps 60] [--old-int8 rows]

--old-int8 rows: the old build's int8 kernels take row-major int8 (before the 8-row tiles); the
script then hands them `codes()` instead of the tiled buffer.
"""

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

from edgelm import kernels
from edgelm.backends.native import NativeExecutor
from edgelm.config import set_threads
from edgelm.hub import default_model_path
from edgelm.kernels import llama as fast
from edgelm.quant import linear as qlinear


def load_so(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old_so")
    p.add_argument("--quant", default="int8", help="int8, int4 or gguf (the file's own types)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--old-int8", choices=["rows", "tiles"], default="rows")
    args = p.parse_args()
    set_threads(args.threads)
    builds = {"new": kernels.ext(), "old": load_so(args.old_so)}
    ex = NativeExecutor(str(default_model_path()), threads=args.threads, quant=args.quant)  # "gguf": the file's own types
    int8 = [m for m in ex.model.modules() if isinstance(m, qlinear.Int8Linear)]
    buffers = {"new": [m.qweight for m in int8]}
    buffers["old"] = [m.codes().contiguous() for m in int8] if args.old_int8 == "rows" else buffers["new"]

    def use(which: str) -> None:
        for m, q in zip(int8, buffers[which]):
            m.qweight = q
        kernels.ext = lambda: builds[which]  # every handle and decoder is rebuilt from this build
        fast._DECODERS.clear()
        kernels._HANDLES.clear()

    ids = list(range(100, 228))
    ms = {"old": [], "new": []}
    for _ in range(args.rounds):
        for which in ("old", "new"):
            use(which)
            token, times = int(ex.prefill(ids).argmax()), []
            for _ in range(args.steps):
                t = time.perf_counter()
                token = int(ex.decode(token).argmax())
                times.append(time.perf_counter() - t)
            ms[which].append(statistics.median(times[5:]) * 1e3)
    old, new = statistics.median(ms["old"]), statistics.median(ms["new"])
    print(f"{args.quant}: ms per decode step, rounds {ms}")
    print(f"old {old:.2f} ms, new {new:.2f} ms: new is {old / new:.2f}x")


if __name__ == "__main__":
    main()
