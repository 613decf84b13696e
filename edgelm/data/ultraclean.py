"""UltraClean (MiniCPM4): a fastText quality classifier, and filtering shards with it.

- `train_filter`: positives (seed data verified to help) and negatives (raw or junk text) are
  normalised (`normalize.py`) and fed to fastText with the paper's settings: dim 256, lr 0.1, word
  n-grams 3, minCount 5, 3 epochs.
- `filter_shards`: score every document, keep those with P(high quality) >= threshold. Documents
  stream through in batches, so memory is bounded by the batch size times the number of workers.
  `engine="local"` uses worker processes; `engine="ray"` runs the same scorer on Ray Data (one
  actor per worker, the classifier loaded once each), so it scales out to a cluster unchanged. Both
  return records in input order, so their outputs are byte-for-byte comparable.
- `iterate`: label documents with the current classifier, the training set of the next round.
"""

import multiprocessing as mp
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgelm.data.io import batched, check_inputs, iter_all, iter_records, write_jsonl
from edgelm.data.normalize import to_words

HQ, LQ = "__label__hq", "__label__lq"
SCORE = "quality_score"  # field added to every written record
# MiniCPM4 §UltraClean; the paper gives no bucket count: fastText's 2M default makes a 2 GB model at dim 256.
FASTTEXT_ARGS = {"dim": 256, "lr": 0.1, "wordNgrams": 3, "minCount": 5, "epoch": 3, "bucket": 100_000}
BINS = 20  # score histogram bins over [0, 1]
ENGINES = ("local", "ray")


def _fasttext():
    try:
        import fasttext
    except ImportError as e:
        raise ValueError("UltraClean needs fastText: pip install 'edgelm[data]'") from e
    return fasttext


def load_tokenizer(path: str | Path | None):
    """The model's tokenizer from a llama2c .bin or an HF folder (None: plain words)."""
    if path is None:
        return None
    from edgelm.tokenizer import Tokenizer

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such tokenizer file or folder")
    return Tokenizer.from_llama2c(path) if path.suffix == ".bin" else Tokenizer.from_hf_folder(path)


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (a probability), got {threshold}")


# ---- training ----------------------------------------------------------------------------------


def parse_label(value, where: str) -> int:
    """A record's label -> 1 (high quality) or 0; ValueError for a missing or unknown label."""
    table = {1: 1, 0: 0, "1": 1, "0": 0, "hq": 1, "lq": 0, "pos": 1, "neg": 0}  # True == 1, False == 0
    try:
        return table[value.lower() if isinstance(value, str) else value]
    except (KeyError, TypeError):
        raise ValueError(
            f"{where}: unlabelled or unknown label {value!r}; use 1/0, hq/lq or pos/neg"
        ) from None


def labelled_examples(pos, neg, labelled, text_field: str = "text") -> list[tuple[int, str]]:
    """(label, text) from positive files, negative files and labelled JSONL files ("label" field)."""
    examples = []
    for label, paths in ((1, pos), (0, neg)):
        for p in check_inputs(paths) if paths else []:
            before = len(examples)
            examples += [(label, r[text_field]) for r in iter_records(p, text_field)]
            if len(examples) == before:
                raise ValueError(f"{p}: no documents (empty training file)")
    for p in check_inputs(labelled) if labelled else []:
        for i, r in enumerate(iter_records(p, text_field), 1):
            examples.append((parse_label(r.get("label"), f"{p} record {i}"), r[text_field]))
    return examples


def check_classes(examples: list[tuple[int, str]]) -> None:
    num_pos = sum(label for label, _ in examples)
    if num_pos == 0 or num_pos == len(examples):
        raise ValueError(
            f"training needs both classes; got {num_pos} positive and {len(examples) - num_pos} negative "
            "documents (give --pos and --neg files, or labelled files with both labels)"
        )


def train_filter(
    out: str | Path,
    pos: Iterable = (),
    neg: Iterable = (),
    labelled: Iterable = (),
    *,
    tokenizer=None,
    text_field: str = "text",
    threads: int = 1,
    seed: int = 0,
    **overrides,
) -> Path:
    """Train the quality classifier and save it to `out` (fastText .bin); returns the path.
    `overrides` change the paper's fastText settings (e.g. epoch=10); threads=1 is deterministic."""
    examples = labelled_examples(list(pos), list(neg), list(labelled), text_field)
    check_classes(examples)
    fasttext = _fasttext()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        for label, text in examples:
            f.write(f"{HQ if label else LQ} {to_words(text, tokenizer)}\n")
    try:
        args = {**FASTTEXT_ARGS, **overrides, "thread": threads, "seed": seed, "verbose": 0}
        model = fasttext.train_supervised(input=f.name, **args)
    finally:
        os.unlink(f.name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_model(str(out))
    return out


# ---- scoring -----------------------------------------------------------------------------------


class Classifier:
    """A trained quality classifier: `score(texts)` -> P(high quality) per text."""

    def __init__(self, path: str | Path, tokenizer_path: str | Path | None = None):
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such classifier (train one with `edgelm data train-filter`)")
        self.model = _fasttext().load_model(str(path))
        if HQ not in self.model.get_labels():
            raise ValueError(f"{path}: not an UltraClean classifier (no {HQ} label)")
        self.tokenizer = load_tokenizer(tokenizer_path)

    def score(self, texts: list[str]) -> list[float]:
        lines = [to_words(t, self.tokenizer) for t in texts]
        # f.multilinePredict, not .predict: fasttext 0.9.3's predict breaks under numpy 2 (copy=False).
        labels, probs = self.model.f.multilinePredict(lines, 2, 0.0, "strict")
        return [float(dict(zip(ls, ps)).get(HQ, 0.0)) for ls, ps in zip(labels, probs)]


_worker_clf: Classifier | None = None  # one per worker process, loaded once by the pool initializer


def _init_worker(path, tokenizer_path) -> None:
    global _worker_clf
    _worker_clf = Classifier(path, tokenizer_path)


def _score_in_worker(texts: list[str]) -> list[float]:
    return _worker_clf.score(texts)


def score_local(clf_args: tuple, records: Iterator[dict], text_field: str, workers: int, batch_size: int):
    """(record, score) in input order; at most 2 batches per worker are in flight (bounded memory)."""
    if workers == 1:
        clf = Classifier(*clf_args)
        for batch in batched(records, batch_size):
            yield from zip(batch, clf.score([r[text_field] for r in batch]))
        return
    with mp.get_context("fork").Pool(workers, _init_worker, clf_args) as pool:
        pending = deque()
        for batch in batched(records, batch_size):
            pending.append((batch, pool.apply_async(_score_in_worker, ([r[text_field] for r in batch],))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        for done, result in pending:
            yield from zip(done, result.get())


class _RayScorer:
    """A Ray Data actor: loads the classifier once, adds the score column to each pyarrow batch."""

    def __init__(self, path, tokenizer_path, text_field: str):
        self.clf, self.text_field = Classifier(path, tokenizer_path), text_field

    def __call__(self, batch):
        import pyarrow as pa

        scores = self.clf.score(batch.column(self.text_field).to_pylist())
        return batch.append_column(SCORE, pa.array(scores, pa.float64()))


def _ray_read(paths: list[Path]):
    """One Ray Data read over all the files, so the rows keep the files' order (a union of
    reads would interleave them)."""
    import ray.data

    if len({p.suffix for p in paths}) > 1:
        raise ValueError(
            "--engine ray reads one file type per run; got " + ", ".join(sorted({p.suffix for p in paths}))
        )
    files, suffix = [str(p) for p in paths], paths[0].suffix
    # Reads ask for no CPU: the scorer actors hold one each, and on a cluster with exactly
    # `workers` CPUs a read waiting for a free CPU would never run (a deadlock).
    kw = {"num_cpus": 0}
    if suffix == ".parquet":
        return ray.data.read_parquet(files, **kw)
    if suffix == ".txt":
        return ray.data.read_text(files, **kw)
    return ray.data.read_json(files, lines=True, **kw)


def score_ray(clf_args: tuple, paths: list[Path], text_field: str, workers: int, batch_size: int):
    """The same (record, score) stream, computed by `workers` Ray Data actors, in input order."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ValueError("--engine ray needs Ray Data: pip install 'edgelm[data]'") from e
    if not ray.is_initialized():  # a local cluster; connect to a real one with RAY_ADDRESS
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = _ray_read(paths).map_batches(
        _RayScorer,
        fn_constructor_args=(*clf_args, text_field),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        for row in batch.to_pylist():
            yield row, row.pop(SCORE)


# ---- filtering ---------------------------------------------------------------------------------


@dataclass
class FilterReport:
    threshold: float
    engine: str
    num_kept: int = 0
    num_dropped: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)  # counts over [0, 1] in BINS bins
    seconds: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return (self.num_kept + self.num_dropped) / self.seconds if self.seconds else 0.0

    def add(self, score: float, kept: bool) -> None:
        self.histogram[min(int(score * BINS), BINS - 1)] += 1
        self.num_kept, self.num_dropped = self.num_kept + kept, self.num_dropped + (not kept)


def scored_stream(classifier, inputs, text_field, engine, workers, batch_size, tokenizer_path):
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if workers < 1 or batch_size < 1:
        raise ValueError(f"workers and batch size must be positive, got {workers} and {batch_size}")
    paths = check_inputs(inputs)
    clf_args = (str(classifier), tokenizer_path)
    Classifier(*clf_args)  # fail here, not inside a worker, on a bad classifier
    if engine == "ray":
        return score_ray(clf_args, paths, text_field, workers, batch_size)
    return score_local(clf_args, iter_all(paths, text_field), text_field, workers, batch_size)


def filter_shards(
    classifier: str | Path,
    inputs: Iterable,
    out: str | Path,
    threshold: float = 0.5,
    *,
    engine: str = "local",
    workers: int = 1,
    batch_size: int = 512,
    text_field: str = "text",
    tokenizer_path: str | Path | None = None,
    progress: bool = True,
) -> FilterReport:
    """Write the documents scoring >= threshold to `out` (JSONL, with their score); returns counts."""
    from tqdm import tqdm

    check_threshold(threshold)
    stream = scored_stream(classifier, inputs, text_field, engine, workers, batch_size, tokenizer_path)
    report, start = FilterReport(threshold, engine), time.perf_counter()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record, score in tqdm(stream, desc=f"filter ({engine})", unit="doc", disable=not progress):
            report.add(score, score >= threshold)
            if score >= threshold:
                write_jsonl([{**record, SCORE: score}], f)
    report.seconds = time.perf_counter() - start
    return report


def iterate(
    classifier: str | Path,
    inputs: Iterable,
    out: str | Path,
    threshold: float = 0.5,
    *,
    next_classifier: str | Path | None = None,
    text_field: str = "text",
    tokenizer_path: str | Path | None = None,
    workers: int = 1,
) -> tuple[int, int]:
    """Label every document with the current classifier (JSONL with "label" and the score): the
    next round's training set; also train `next_classifier` on it if given. Returns (pos, neg)."""
    check_threshold(threshold)
    stream = scored_stream(classifier, inputs, text_field, "local", workers, 512, tokenizer_path)
    num_pos = num = 0
    with open(out, "w", encoding="utf-8") as f:
        for record, score in stream:
            label = int(score >= threshold)
            num_pos, num = num_pos + label, num + 1
            write_jsonl([{text_field: record[text_field], "label": label, SCORE: score}], f)
    if next_classifier is not None:
        train_filter(
            next_classifier, labelled=[out], text_field=text_field, tokenizer=load_tokenizer(tokenizer_path)
        )
    return num_pos, num - num_pos
