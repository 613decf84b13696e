"""UltraClean filter throughput (docs/s): one process, 2 worker processes, Ray Data with 2 actors
on a local 2-CPU cluster; the same shards, in one run, medians of --repeat runs. Checks that every
engine keeps exactly the same documents.

Corpus: python-library-docs.txt cut into ~400-character documents, half of them garbled (words
shuffled, characters scrambled or boilerplate, as in tests/test_ultraclean.py), repeated --copies
times over 4 JSONL shards. Classifier: fastText with the paper's settings on the first 2 MB.

    python benchmarks/ultraclean.py --copies 4 --repeat 3
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_ultraclean import TEXT, documents, junk, write_jsonl

from edgelm.data import filter_shards, train_filter


def build(root: Path, copies: int) -> tuple[Path, list[Path]]:
    text, rng = TEXT.read_text(), random.Random(0)
    train = documents(text[:2_000_000], 150)
    pos, neg = train[: len(train) // 2], [junk(d, rng) for d in train[len(train) // 2 :]]
    clf = train_filter(
        root / "clf.bin", [write_jsonl(root / "p.jsonl", pos)], [write_jsonl(root / "n.jsonl", neg)]
    )
    docs = [d if i % 2 else junk(d, rng) for i, d in enumerate(documents(text))] * copies
    quarter = -(-len(docs) // 4)
    return clf, [
        write_jsonl(root / f"shard{i}.jsonl", docs[i * quarter : (i + 1) * quarter]) for i in range(4)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import ray

    root = Path(tempfile.mkdtemp(prefix="ultraclean-bench-"))
    clf, shards = build(root, args.copies)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s (not counted)", file=sys.stderr)
    settings = {
        "local, 1 process": ("local", 1),
        "local, 2 processes": ("local", 2),
        "Ray Data, 2 actors": ("ray", 2),
    }
    rates, outputs = {k: [] for k in settings}, {}
    for _ in range(args.repeat):
        for name, (engine, workers) in settings.items():
            out = root / f"{engine}{workers}.jsonl"
            r = filter_shards(
                clf, shards, out, engine=engine, workers=workers, batch_size=512, progress=False
            )
            rates[name].append(r.docs_per_s)
            outputs[name] = out.read_bytes()
    assert len(set(outputs.values())) == 1, "engines kept different documents"
    base = statistics.median(rates["local, 1 process"])
    print(f"{r.num_kept + r.num_dropped} documents, {r.num_kept} kept (identical in every engine)\n")
    print("| engine | docs/s (median) | vs 1 process |\n|---|---|---|")
    for name, rs in rates.items():
        print(f"| {name} | {statistics.median(rs):.0f} | {statistics.median(rs) / base:.2f}x |")
    ray.shutdown()


if __name__ == "__main__":
    main()
