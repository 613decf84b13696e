"""Tokenizer contracts: ids equal `transformers` (or llama2.c / llama.cpp where those differ),
decode round-trips, streaming equals decode, chat templates render as in transformers."""

import struct
from pathlib import Path

import pytest
import tokenizers
import transformers
from jinja2.exceptions import TemplateError

from edgelm.formats.gguf import read_gguf
from edgelm.tokenizer import Tokenizer

MODELS = Path("/work/shared/models")
SMOL_DIR = MODELS / "smollm2-135m-instruct"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES_HF = MODELS / "stories260K" / "hf"
STORIES_BIN = MODELS / "stories260K" / "tok512.bin"

# Texts without digits: the SmolLM2 GGUF must give transformers' ids exactly.
TEXTS = [
    "Hello, world!",
    "def add(a, b):\n    return a + b  # sum\n",
    "naïve café 東京 Привет",
    "👋🏽🎉 party time",
    "  lots   of    spaces  ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "<|im_start|>user\nhi<|im_end|>",
    "I'm sure they'll've done it, isn't it?",
    "emoji in a word: caf👋é and ZWJ 👩‍👩‍👧",
    " ",
    "",
]
# Texts with digits (\p{N}): llama.cpp's "smollm" rule isolates each one, like SmolLM2's own
# tokenizer.json (Digits(individual_digits=True)); transformers' GGUF loader does not.
DIGIT_TEXTS = ["2024", "Call 555-0199 at 10:30.", "pi = 3.14159", "x²³ and ½ cup", "a1b22c333"]

STORIES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park with her dog, Max.",
    'One day, Tom said, "Look at the big red ball!" and they ran to get it.',
    "The sun was hot. They were happy and tired.\nThe end.",
    "Mom gave her 3 apples and a café au lait.",
    "  two leading spaces, and a tab\there",
    "A bird sang: \u201chello\u201d \u2014 and flew 東 away 😊",
]

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_metadata():
    return read_gguf(SMOL_DIR / SMOL_FILE).metadata


@pytest.fixture(scope="module")
def smol(smol_metadata):
    return Tokenizer.from_gguf_metadata(smol_metadata)


@pytest.fixture(scope="module")
def smol_hf():
    return transformers.AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE)


@pytest.fixture(scope="module")
def stories():
    return Tokenizer.from_hf_folder(STORIES_HF)


@pytest.fixture(scope="module")
def stories_hf():
    return transformers.AutoTokenizer.from_pretrained(STORIES_HF)


@pytest.fixture(scope="module")
def llama2c():
    return Tokenizer.from_llama2c(STORIES_BIN)


# --- SmolLM2 GGUF (byte-level BPE, pre-tokenizer "smollm") -----------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_matches_transformers(smol, smol_hf, text):
    assert smol.encode(text) == smol_hf.encode(text)
    assert smol.encode(text, add_special_tokens=False) == smol_hf.encode(
        text, add_special_tokens=False
    )
    ids = smol_hf.encode(text)
    assert smol.decode(ids) == smol_hf.decode(ids)
    skipped = smol_hf.decode(ids, skip_special_tokens=True)
    assert smol.decode(ids, skip_special_tokens=True) == skipped


def test_gguf_splits_digits_like_llama_cpp(smol, smol_hf):
    ids = smol.encode("2024")
    assert len(ids) == 4
    assert [smol.decode([i]) for i in ids] == ["2", "0", "2", "4"]
    # Reference: transformers' tokenizer with SmolLM2's original pre-tokenizer put back.
    original = tokenizers.Tokenizer.from_str(smol_hf.backend_tokenizer.to_str())
    original.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in DIGIT_TEXTS:
        assert smol.encode(text) == original.encode(text).ids, text
    # "½" is \p{N}: isolated, it leaves its space as a token of its own ("Ġ" alone, id 216).
    assert smol.encode(" ½")[0] == smol.encode(" ")[0] != smol_hf.encode(" ½")[0]


def test_gguf_special_tokens(smol, smol_hf):
    assert smol.vocab_size == len(smol_hf) == 49152
    assert (smol.bos_token_id, smol.pad_token_id) == (1, 2)
    assert smol.eos_token_ids == [2, 0]  # <|im_end|> (the file's eos), then <|endoftext|>
    # The file says add_bos_token = False and transformers agrees: no BOS is added.
    assert not smol.add_bos and not smol_hf.add_bos_token
    assert smol.encode("hi") == smol.encode("hi", add_special_tokens=False) == smol_hf.encode("hi")
    assert smol.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]


def test_gguf_chat_template_matches_transformers(smol, smol_hf):
    system = {"role": "system", "content": "Be brief."}
    chats = [CHAT, [system, *CHAT, {"role": "assistant", "content": "Paris."}]]
    for chat in chats:
        for gen in (True, False):
            want = smol_hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert smol.apply_chat_template(chat, add_generation_prompt=gen) == want
    prompt = smol.apply_chat_template(CHAT)
    ids = smol.encode(prompt, add_special_tokens=False)
    assert ids == smol_hf.encode(prompt, add_special_tokens=False)
    assert ids[-4:] == [1, *smol.encode("assistant\n", add_special_tokens=False)]


# --- Round trip and streaming ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["smol", "stories", "llama2c"])
def test_round_trip(name, request):
    tok = request.getfixturevalue(name)
    texts = TEXTS + DIGIT_TEXTS if name == "smol" else STORIES
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("name", ["smol", "stories", "llama2c"])
def test_streaming_equals_decode(name, request):
    tok = request.getfixturevalue(name)
    for text in TEXTS + DIGIT_TEXTS + STORIES:
        ids = tok.encode(text)
        for skip in (False, True):
            stream = tok.detokenizer(skip_special_tokens=skip)
            chunks = [stream.add_token(i) for i in ids] + [stream.finalize()]
            assert "".join(chunks) == stream.text == tok.decode(ids, skip), (text, chunks)
            assert not any("\ufffd" in c for c in chunks), (text, chunks)


def test_streaming_holds_back_partial_characters(smol):
    ids = smol.encode("東京👋🏽🎉", add_special_tokens=False)
    stream = smol.detokenizer()
    assert len(ids) > 5  # several of these tokens end inside a character
    emitted = [stream.add_token(i) for i in ids]
    assert "" in emitted and "".join(emitted) == "東京👋🏽🎉"


def test_streaming_with_context_keeps_leading_space(stories):
    prompt = stories.encode("Once upon a time")
    full = stories.encode("Once upon a time there was a dog")
    assert full[: len(prompt)] == prompt
    stream = stories.detokenizer(context=prompt)
    new = full[len(prompt) :]
    text = "".join(stream.add_token(i) for i in new) + stream.finalize()
    assert text == " there was a dog"  # a fresh detokenizer would drop the first space


# --- stories260K: Hugging Face folder and llama2.c tokenizer.bin -----------------------------


def test_hf_folder_matches_transformers(stories, stories_hf):
    for text in STORIES + ["", "<s>hello</s>"]:
        ids = stories_hf.encode(text)
        assert stories.encode(text) == ids
        assert stories.encode(text, add_special_tokens=False) == stories_hf.encode(
            text, add_special_tokens=False
        )
        assert stories.decode(ids) == stories_hf.decode(ids)
        assert stories.decode(ids, True) == stories_hf.decode(ids, skip_special_tokens=True)


def test_hf_folder_bos_once(stories):
    assert stories.add_bos and stories.bos_token_id == 1 and stories.eos_token_ids == [2]
    ids = stories.encode("Once upon a time")
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids[1:] == stories.encode("Once upon a time", add_special_tokens=False)
    assert stories.encode("") == [1]


def test_llama2c_matches_hf_folder(llama2c, stories):
    assert llama2c.vocab_size == stories.vocab_size == 512
    assert llama2c.add_bos and llama2c.bos_token_id == 1 and llama2c.eos_token_ids == [2]
    for text in STORIES + ["", "x"]:
        ids = stories.encode(text)
        assert llama2c.encode(text) == ids, text
        assert llama2c.decode(ids, skip_special_tokens=True) == text


def test_llama2c_matches_reference_encoder(llama2c):
    pieces, scores = _read_raw_llama2c(STORIES_BIN)
    for text in STORIES + [""]:
        ids = _llama2c_encode(pieces, scores, text)
        assert llama2c.encode(text) == ids, text
        assert llama2c.decode(ids, skip_special_tokens=True) == _llama2c_decode(pieces, ids) == text


def test_gguf_sentencepiece_vocab(stories):
    # A "llama" (sentencepiece) GGUF carrying the stories260K vocabulary must tokenize like it.
    pieces, scores = _read_raw_llama2c(STORIES_BIN)
    tokens = ["<unk>", "<s>", "</s>"] + [p.decode().replace(" ", "\u2581") for p in pieces[3:]]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    tok = Tokenizer.from_gguf_metadata(metadata)
    assert tok.add_bos and tok.eos_token_ids == [2]
    for text in STORIES + ["", "<s>hi</s>"]:
        assert tok.encode(text) == stories.encode(text), text
        assert tok.decode(stories.encode(text)) == stories.decode(stories.encode(text))


# --- GGUF pre-tokenizer families ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt2", ["Hello", " 12345", "!!"]),
        ("smollm", ["Hello", " ", "1", "2", "3", "4", "5", "!!"]),
        ("llama-bpe", ["Hello", " ", "123", "45", "!!"]),
        ("qwen2", ["Hello", " ", "1", "2", "3", "4", "5", "!!"]),
    ],
)
def test_gguf_pre_tokenizer_families(pre, pieces):
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": alphabet,
        "tokenizer.ggml.merges": [],
    }
    tok = Tokenizer.from_gguf_metadata(metadata)
    splits = tok._backend.pre_tokenizer.pre_tokenize_str("Hello 12345!!")
    assert [tok.decode([tok.token_to_id(c) for c in s]) for s, _ in splits] == pieces
    assert tok.decode(tok.encode("Hello 12345!!")) == "Hello 12345!!"
    assert tok.add_bos is False  # no BOS token in this vocabulary


# --- Chat templates ---------------------------------------------------------------------------

FEATURE_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ m.role }}] {{ m.content | trim }} {{ m | tojson }}
  {% if loop.last %}(last){% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{% generation %}{{ ns.n }}{% endgeneration %}
{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}{{ flavour }}"""


def test_chat_template_features_match_transformers(stories_hf):
    tok = Tokenizer.from_hf_folder(STORIES_HF)
    tok.chat_template = FEATURE_TEMPLATE
    chat = [
        {"role": "system", "content": "  Sé breve \u2014 東京 "},
        {"role": "skip", "content": "ignored"},
        {"role": "user", "content": "Hi", "name": None},
    ]
    tools = [{"name": "f", "description": "déjà"}]
    for gen in (True, False):
        kwargs = {"add_generation_prompt": gen, "tools": tools, "flavour": "vanilla"}
        want = stories_hf.apply_chat_template(
            chat, chat_template=FEATURE_TEMPLATE, tokenize=False, **kwargs
        )
        assert tok.apply_chat_template(chat, **kwargs) == want


def test_chat_template_raise_exception():
    tok = Tokenizer.from_hf_folder(STORIES_HF)
    tok.chat_template = "{{ raise_exception('user first') if messages[0].role != 'user' }}"
    with pytest.raises(TemplateError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_no_chat_template(stories, llama2c):
    for tok in (stories, llama2c):
        assert tok.chat_template is None
        with pytest.raises(ValueError, match="no chat template"):
            tok.apply_chat_template(CHAT)


# --- Bad input --------------------------------------------------------------------------------


def test_unknown_gguf_model():
    with pytest.raises(ValueError, match=r"'bert' is not supported.*\['gpt2', 'llama'\]"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": []})


def test_unknown_gguf_pre_tokenizer():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}
    metadata["tokenizer.ggml.pre"] = "martian"
    with pytest.raises(ValueError, match="'martian'.*not supported.*smollm"):
        Tokenizer.from_gguf_metadata(metadata)


def test_bad_gguf_special_id():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}
    metadata["tokenizer.ggml.eos_token_id"] = 7
    with pytest.raises(ValueError, match="eos token id 7 is outside the vocabulary"):
        Tokenizer.from_gguf_metadata(metadata)


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_bad_llama2c_file(tmp_path):
    bad = tmp_path / "tokenizer.bin"
    bad.write_bytes(struct.pack("<ifi", 8, 0.0, 100) + b"short")
    with pytest.raises(ValueError, match="not a llama2.c tokenizer.bin"):
        Tokenizer.from_llama2c(bad)


# --- llama2.c reference (run.c's encode/decode, transcribed) ---------------------------------


def _read_raw_llama2c(path: Path) -> tuple[list[bytes], list[float]]:
    raw = path.read_bytes()
    pieces, scores, offset = [], [], 4
    while offset < len(raw):
        score, length = struct.unpack_from("<fi", raw, offset)
        pieces.append(raw[offset + 8 : offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    return pieces, scores


def _llama2c_encode(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
    """BOS, a dummy " " prefix, one id per code point (or byte + 3), then repeatedly merge the
    adjacent pair whose concatenation scores highest (leftmost on ties)."""
    lookup = {p: i for i, p in enumerate(pieces)}
    ids = [1] + ([lookup[b" "]] if text else [])
    for ch in text:
        b = ch.encode()
        ids += [lookup[b]] if b in lookup else [x + 3 for x in b]
    while True:
        best, best_score = None, -1e10
        for k in range(len(ids) - 1):
            i = lookup.get(pieces[ids[k]] + pieces[ids[k + 1]])
            if i is not None and scores[i] > best_score:
                best, best_score = (k, i), scores[i]
        if best is None:
            return ids
        ids[best[0] : best[0] + 2] = [best[1]]


def _llama2c_decode(pieces: list[bytes], ids: list[int]) -> str:
    out, prev = b"", None
    for i in ids:
        piece = pieces[i]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]  # BOS strips the dummy prefix's space
        if piece.startswith(b"<0x") and len(piece) == 6:
            piece = bytes([int(piece[3:5], 16)])
        if i != 1:
            out += piece
        prev = i
    return out.decode("utf-8", errors="replace")
