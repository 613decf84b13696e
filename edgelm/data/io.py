"""Streaming document I/O: JSONL, Parquet and plain-text shards read in bounded batches.

A document is a dict with a text field ("text" by default). Plain-text files hold one document per
line; JSONL one JSON object per line; Parquet is read a row group slice at a time (pyarrow).
"""

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def check_inputs(paths: Iterable[str | Path]) -> list[Path]:
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no input files given")
    for p in paths:
        if not p.is_file():
            raise ValueError(f"{p}: no such file")
        if p.suffix not in SUFFIXES:
            raise ValueError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return paths


def iter_records(path: Path, text_field: str = "text", batch_size: int = 1024) -> Iterator[dict]:
    """Documents of one file, streamed; ValueError naming the line of a malformed record."""
    if path.suffix == ".parquet":
        yield from _iter_parquet(path, text_field, batch_size)
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = {text_field: line.rstrip("\n")} if path.suffix == ".txt" else _parse(line, path, num)
            _check_text(record, text_field, f"{path}:{num}")
            yield record


def _parse(line: str, path: Path, num: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{num}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{num}: expected a JSON object per line")
    return record


def _check_text(record: dict, text_field: str, where: str) -> None:
    if not isinstance(record.get(text_field), str):
        raise ValueError(f"{where}: record has no string field {text_field!r} (choose it with --text-field)")


def _iter_parquet(path: Path, text_field: str, batch_size: int) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (choose it with --text-field)")
    for batch in pf.iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


def iter_all(paths: list[Path], text_field: str = "text") -> Iterator[dict]:
    for p in paths:
        yield from iter_records(p, text_field)


def batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def write_jsonl(records: Iterable[dict], f) -> None:
    for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
