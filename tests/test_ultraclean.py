"""UltraClean on real text: normalisation rules; a fastText classifier (the paper's settings) trained
on documentation prose (positives) against shuffled, garbled and boilerplate text (negatives) ranks
held-out documents with AUC >= 0.9 (3 epochs at lr 0.1 need ~6.7K short documents: fewer learn
little); filtering keeps the same documents in every engine (one process, worker processes, Ray
Data on a local cluster; JSONL and Parquet); re-labelling for the next round; bad input."""

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("fasttext", reason="UltraClean needs fastText (pip install 'edgelm[data]')")

from edgelm.cli import main
from edgelm.data import Classifier, filter_shards, iterate, normalize, to_words, train_filter
from edgelm.data.report import write_report
from edgelm.data.ultraclean import load_tokenizer

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "python-library-docs.txt"
BOILERPLATE = [
    "Click here to subscribe",
    "Accept all cookies",
    "All rights reserved",
    "Home | About | Contact",
    "Sign up for our newsletter",
    "Log in",
    "Privacy Policy",
    "Terms of Service",
    "Share on Facebook",
    "Buy now and save",
    "Free shipping on orders over $50",
    "Read more",
    "Next page",
    "Advertisement",
    "Follow us on Twitter",
    "Copyright",
    "You may also like",
    "Limited time offer",
    "Skip to content",
]


def documents(text: str, size: int = 400) -> list[str]:
    """Consecutive paragraphs merged until each document has `size` characters."""
    docs, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= size:
            docs.append(cur)
            cur = ""
    return docs


def junk(doc: str, rng: random.Random) -> str:
    """A negative made from a real document: words shuffled, characters garbled, or boilerplate."""
    words = doc.split()
    kind = rng.randrange(3)
    if kind == 0:
        rng.shuffle(words)
        return " ".join(words)
    if kind == 1:
        return " ".join("".join(rng.sample(w, len(w))) + rng.choice(["", "#", "&", "zx"]) for w in words)
    return " ".join(
        f"{rng.choice(BOILERPLATE)} {rng.randrange(2000, 2030)}" for _ in range(len(words) // 4 + 1)
    )


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Train on short documents from the first 2 MB (negatives made from its second half); hold
    out positives from 2.0-2.5 MB and negatives made from the text after 2.5 MB."""
    root, text = tmp_path_factory.mktemp("ultraclean"), TEXT.read_text()
    train, held = documents(text[:2_000_000], 150), documents(text[2_000_000:2_500_000])[:400]
    rng = random.Random(0)
    pos, neg = train[: len(train) // 2], [junk(d, rng) for d in train[len(train) // 2 :]]
    held_neg = [junk(d, rng) for d in documents(text[2_500_000:])[:400]]
    files = {"pos": write_jsonl(root / "pos.jsonl", pos), "neg": write_jsonl(root / "neg.jsonl", neg)}
    files["clf"] = train_filter(root / "clf.bin", [files["pos"]], [files["neg"]])
    mixed = [t for pair in zip(held, held_neg) for t in pair]  # alternate, so both engines see both
    files["shard0"] = write_jsonl(root / "shard0.jsonl", mixed[:400])
    files["shard1"] = write_jsonl(root / "shard1.jsonl", mixed[400:])
    return root, files, held, held_neg


def auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a random positive > a random negative), ties half (Mann-Whitney U / n1 n2)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_normalize_rules():
    text = "  Café   NAÏVE\tnaïve  \n\n\n\nÉcole  d'été \n  \n Second"
    assert normalize(text) == "cafe naive naive\necole d'ete\nsecond"
    assert normalize("Ünïcödé", lowercase=False) == "Unicode"


def test_words_from_the_model_tokenizer():
    tok = load_tokenizer(TEXT.parents[1] / "models" / "stories260K" / "tok512.bin")
    words = to_words("Once upon a TIME,  Café", tok)  # normalised first, then split into pieces
    assert words == "\u2581on ce \u2581upon \u2581a \u2581time , \u2581c a f e"


def test_classifier_ranks_heldout_documents(corpus):
    _, files, held, held_neg = corpus
    clf = Classifier(files["clf"])
    assert auc(clf.score(held), clf.score(held_neg)) >= 0.9


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_worker_processes_keep_the_same_documents(corpus):
    root, files, _, _ = corpus
    shards = [files["shard0"], files["shard1"]]
    one = filter_shards(files["clf"], shards, root / "one.jsonl", progress=False)
    two = filter_shards(files["clf"], shards, root / "two.jsonl", workers=2, batch_size=64, progress=False)
    assert 200 < one.num_kept < 700 and one.num_kept + one.num_dropped == 800
    assert read(root / "one.jsonl") == read(root / "two.jsonl")
    assert (two.num_kept, two.histogram) == (one.num_kept, one.histogram)
    js, png = write_report(one, root / "report")
    assert json.loads(js.read_text())["num_kept"] == one.num_kept and png.read_bytes()[:4] == b"\x89PNG"


def test_parquet_shards_match_jsonl(corpus):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    root, files, _, _ = corpus
    pq.write_table(pa.Table.from_pylist(read(files["shard0"])), root / "shard0.parquet")
    filter_shards(files["clf"], [root / "shard0.parquet"], root / "pq.jsonl", progress=False)
    filter_shards(files["clf"], [files["shard0"]], root / "js.jsonl", progress=False)
    assert read(root / "pq.jsonl") == read(root / "js.jsonl")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray path needs ray[data] (pip install 'edgelm[data]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_keeps_exactly_the_local_documents(corpus, ray_cluster):
    root, files, _, _ = corpus
    shards = [files["shard0"], files["shard1"]]
    local = filter_shards(files["clf"], shards, root / "local.jsonl", progress=False)
    remote = filter_shards(
        files["clf"], shards, root / "ray.jsonl", engine="ray", workers=2, batch_size=100, progress=False
    )
    assert read(root / "ray.jsonl") == read(root / "local.jsonl")
    assert (remote.num_kept, remote.num_dropped) == (local.num_kept, local.num_dropped)


def test_iterate_relabels_and_trains_next_round(corpus):
    root, files, _, _ = corpus
    pos, neg = iterate(
        files["clf"], [files["shard0"]], root / "round2.jsonl", next_classifier=root / "clf2.bin"
    )
    labels = [r["label"] for r in read(root / "round2.jsonl")]
    assert (pos, neg) == (sum(labels), len(labels) - sum(labels)) and pos > 0 and neg > 0
    assert Classifier(root / "clf2.bin").score(["a"])[0] >= 0


def test_cli_filter_writes_report(corpus):
    root, files, _, _ = corpus
    out = root / "cli.jsonl"
    assert (
        main(["data", "filter", str(files["shard0"]), "--classifier", str(files["clf"]), "--out", str(out)])
        == 0
    )
    assert (root / "cli.jsonl.report.png").exists() and read(out)


def test_bad_inputs(corpus, tmp_path):
    _, files, _, _ = corpus
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no documents"):
        train_filter(tmp_path / "x.bin", [files["pos"]], [empty])
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", ["some text"])
    with pytest.raises(ValueError, match="unlabelled"):
        train_filter(tmp_path / "x.bin", labelled=[unlabelled])
    with pytest.raises(ValueError, match="both classes"):
        train_filter(tmp_path / "x.bin", pos=[files["pos"]])
    for threshold in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
            filter_shards(files["clf"], [files["shard0"]], tmp_path / "o.jsonl", threshold, progress=False)
    with pytest.raises(ValueError, match="no string field"):
        filter_shards(files["clf"], [files["pos"]], tmp_path / "o.jsonl", text_field="body", progress=False)
    assert (
        main(
            [
                "data",
                "filter",
                str(files["shard0"]),
                "--classifier",
                str(files["clf"]),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--threshold",
                "2",
            ]
        )
        == 2
    )
