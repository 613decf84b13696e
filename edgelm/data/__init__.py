"""UltraClean-style data filtering (MiniCPM4): normalise text, train a fastText quality classifier,
score and filter JSONL/Parquet shards locally or on Ray Data, and re-label for the next round."""

from edgelm.data.normalize import normalize, to_words
from edgelm.data.ultraclean import Classifier, FilterReport, filter_shards, iterate, train_filter

__all__ = ["Classifier", "FilterReport", "filter_shards", "iterate", "normalize", "to_words", "train_filter"]
