"""UltraClean's text normalisation, applied before training and before scoring.

Rules (MiniCPM4 §UltraClean): collapse blank lines and runs of spaces, strip diacritics, lowercase.
`to_words` then gives the single line of space-separated words fastText reads; with a tokenizer the
words are the model's token pieces instead, so the classifier sees what the model will see.
"""

import re
import unicodedata

_SPACES = re.compile(r"[^\S\n]+")  # whitespace except newlines
_BLANK_LINES = re.compile(r"\n{2,}")


def normalize(text: str, lowercase: bool = True) -> str:
    """Strip diacritics (NFKD, drop combining marks), collapse spaces and blank lines, lowercase
    (a no-op for scripts without case, so one rule serves English and Chinese)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n", "\n".join(lines)).strip()
    return text.lower() if lowercase else text


def to_words(text: str, tokenizer=None) -> str:
    """Normalised text as one line of words (fastText treats a newline as the end of an example)."""
    text = normalize(text)
    if tokenizer is None:
        return text.replace("\n", " ")
    ids = tokenizer.encode(text, add_special_tokens=False)
    return " ".join(p for p in (tokenizer.id_to_token(i) for i in ids) if p and not p.isspace())
