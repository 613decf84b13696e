"""Text <-> token ids for every checkpoint format edgelm loads, plus chat templates and streaming.

Every source becomes one Hugging Face `tokenizers.Tokenizer` (Rust, fast), so encoding and decoding
share a single code path:

- a Hugging Face folder ships its `tokenizer.json`, used as is;
- a GGUF file stores the vocabulary as metadata; we rebuild the tokenizer by hand, following the
  rules llama.cpp (`src/llama-vocab.cpp`) applies to the same keys, so ids match llama.cpp's;
- a llama2.c `tokenizer.bin` holds (score, piece) pairs; its greedy "merge the best-scoring pair"
  loop is a BPE whose merges are ranked by the score of the merged piece.

Chat templates render with jinja2 exactly as `transformers` renders them, and `StreamingDetokenizer`
turns a stream of ids into text without ever emitting half a UTF-8 character.
"""

import functools
import json
import struct
from datetime import datetime
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

SPIECE_SPACE = "\u2581"  # "▁", sentencepiece's visible space

# Token texts that end a turn in common chat formats. llama.cpp stops on these too (its "EOG" set)
# even when the file names another eos, so a chat model cannot run on past its own turn.
EOG_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|return|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
)

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4  # 5 unused, 6 byte


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Build one with `from_hf_folder`, `from_gguf_metadata` or `from_llama2c`. `encode` adds BOS only
    when the model asks for it (`add_bos`); `eos_token_ids` lists every id that ends generation.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = _unique(eos_token_ids or [])
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        # bos_token / eos_token / unk_token / pad_token texts, handed to chat templates as HF does.
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        probe = backend.encode("", add_special_tokens=True).ids
        self._add_bos = bos_token_id is not None and probe[:1] == [bos_token_id]

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def add_bos(self) -> bool:
        """Whether `encode(text)` prepends BOS (read off the post-processor, so it cannot drift)."""
        return self._add_bos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids; special-token texts (`<|im_start|>`) become their ids. A rendered chat
        template already holds its BOS text, so encode it with `add_special_tokens=False`."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]  # accepts tensors and numpy arrays too
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render `messages` with the model's jinja chat template, as `transformers` would.

        Keyword arguments (`tools`, `documents`, `enable_thinking`, ...) reach the template as
        variables, overriding the special-token ones (`bos_token`, `eos_token`) of the same name.
        """
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (the model was not trained for chat); "
                "encode the prompt text directly instead"
            )
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        # Like transformers: drop None fields (OpenAI clients send content=None), which many
        # templates would otherwise print as "None".
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self._special_tokens, **kwargs}
        template = _compile_template(self.chat_template)
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def detokenizer(
        self, context: list[int] | None = None, skip_special_tokens: bool = False
    ) -> "StreamingDetokenizer":
        """A fresh streaming decoder; see `StreamingDetokenizer` for `context` (the prompt ids)."""
        return StreamingDetokenizer(self, context, skip_special_tokens)

    def save(self, folder: str | Path) -> None:
        """Write a Hugging Face tokenizer folder (`tokenizer.json`, `tokenizer_config.json`,
        `generation_config.json`) that `from_hf_folder` and transformers read back the same way."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config = {**self._special_tokens, "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_ids}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """Load a Hugging Face folder: `tokenizer.json`, plus when present `tokenizer_config.json`,
        `generation_config.json` / `config.json` (eos ids) and `chat_template.jinja` / `.json`."""
        return _load_hf_folder(cls, Path(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, object]) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes (`read_gguf(path).metadata`)."""
        return _load_gguf(cls, metadata)

    @classmethod
    def from_llama2c(cls, path: str | Path) -> "Tokenizer":
        """Load a llama2.c `tokenizer.bin` (BOS 1, EOS 2, byte tokens at 3..258)."""
        return _load_llama2c(cls, Path(path))


class StreamingDetokenizer:
    """Turn ids into text one token at a time, as vLLM does (prefix_offset / read_offset).

    A token may end halfway through a UTF-8 character (byte-level BPE, byte-fallback pieces), and
    some decoders change how a token reads depending on its neighbours (sentencepiece drops the
    space of the first piece). So we decode a short window -- the tokens of the last emitted chunk
    (`ids[prefix:read]`) plus the unread ones -- and emit what the unread tokens add, holding it
    back while it ends in U+FFFD. Work per token is the window size, not the sequence length, and
    the emitted chunks joined equal `tokenizer.decode(all_ids)`.

    `context` (e.g. the prompt) is read but not emitted: the first new token is then decoded after
    its last few tokens, so it keeps the leading space a sentencepiece decoder would strip.
    """

    # How many context tokens the first window reaches back (vLLM's INITIAL_..._OFFSET).
    CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        context: list[int] | None = None,
        skip_special_tokens: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(context or [])
        self._read = len(self._ids)  # tokens before this one have been emitted (or were context)
        self._prefix = max(self._read - self.CONTEXT_TOKENS, 0)  # start of the decode window
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", never a partial character)."""
        self._ids.append(token_id)
        prefix_text, new_text = self._window()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return self._emit(new_text[len(prefix_text) :])

    def finalize(self) -> str:
        """Flush what is held back (an unfinished character comes out as U+FFFD, as in decode)."""
        prefix_text, new_text = self._window()
        return self._emit(new_text[len(prefix_text) :])

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        window = self._ids[self._prefix :]
        prefix_text = decode(window[: self._read - self._prefix], self._skip_special)
        return prefix_text, decode(window, self._skip_special)

    def _emit(self, chunk: str) -> str:
        self._prefix, self._read = self._read, len(self._ids)
        self.text += chunk
        return chunk


# ---------------------------------------------------------------------------------------------
# Chat templates: the same jinja environment transformers builds (utils/chat_template_utils.py).


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # HF's override: jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # HF templates may wrap assistant turns in {% generation %} for training masks; the tag
        # must parse, and renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# ---------------------------------------------------------------------------------------------
# Hugging Face folder


def _load_hf_folder(cls: type[Tokenizer], path: Path) -> Tokenizer:
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ValueError(
            f"{path}: no tokenizer.json; edgelm reads fast-tokenizer folders only. Convert with "
            "transformers: AutoTokenizer.from_pretrained(src).save_pretrained(dst)"
        )
    backend = tokenizers.Tokenizer.from_file(str(file))
    config = _read_json(path / "tokenizer_config.json")
    names = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token")}
    names["pad_token"] = _token_text(config.get("pad_token"))
    _add_named_specials(backend, names.values())
    _apply_bos_eos_flags(backend, config, names)
    model_cfg = _read_json(path / "config.json")
    gen_cfg = _read_json(path / "generation_config.json")
    bos = _first_id(backend.token_to_id(names["bos_token"] or ""), model_cfg.get("bos_token_id"))
    eos = [backend.token_to_id(names["eos_token"] or "")]
    eos += _as_list(gen_cfg.get("eos_token_id")) + _as_list(model_cfg.get("eos_token_id"))
    specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
    eos += [backend.token_to_id(t) for t in EOG_TEXTS if t in specials]
    pad = _first_id(backend.token_to_id(names["pad_token"] or ""), model_cfg.get("pad_token_id"))
    return cls(
        backend,
        bos_token_id=bos,
        eos_token_ids=[i for i in eos if i is not None],
        pad_token_id=pad,
        chat_template=_hf_chat_template(path, config),
        special_tokens=names,
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    # tokenizer_config.json spells a special token as "<s>" or as {"content": "<s>", ...}.
    return value.get("content") if isinstance(value, dict) else value


def _add_named_specials(backend: tokenizers.Tokenizer, texts) -> None:
    # transformers registers bos/eos/... as special added tokens when tokenizer.json did not, so
    # they match whole and `skip_special_tokens` drops them; do the same.
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in texts if t and t not in added and backend.token_to_id(t) is not None]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _apply_bos_eos_flags(backend: tokenizers.Tokenizer, config: dict, names: dict) -> None:
    # transformers rebuilds the post-processor from `add_bos_token` / `add_eos_token` when the
    # config states either; otherwise tokenizer.json's post-processor alone decides. Following the
    # same rule is what keeps BOS from being added twice (or not at all).
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    bos, eos = names["bos_token"], names["eos_token"]
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    backend.post_processor = _template_processor(
        (bos, backend.token_to_id(bos)) if add_bos else None,
        (eos, backend.token_to_id(eos)) if add_eos else None,
    )


def _hf_chat_template(path: Path, config: dict) -> str | None:
    # Same precedence as transformers: chat_template.jinja, chat_template.json, tokenizer_config.
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template")
    template = template if template is not None else config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


# ---------------------------------------------------------------------------------------------
# GGUF metadata

# Pre-tokenizer regexes, as llama.cpp's llm_tokenizer_bpe applies them: each splits every piece
# the previous one produced, keeping matches and the text between them (Split "isolated").
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2_SPLIT,),
    "digits+gpt2": (r"\p{N}", _GPT2_SPLIT),  # every digit alone, then GPT-2
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
# `tokenizer.ggml.pre` name -> regex family, from llama.cpp's llama_vocab::impl::load.
_PRE_FAMILY = {
    "default": "default",
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), "gpt2"),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        "digits+gpt2",
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe", "lfm2"),
        "llama3",
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), "qwen2"),
}


def _load_gguf(cls: type[Tokenizer], meta: dict[str, object]) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    builders = {"gpt2": _gguf_byte_level, "llama": _gguf_sentencepiece}
    if kind not in builders:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported; supported tokenizer.ggml.model "
            f"values: {sorted(builders)} (gpt2 = byte-level BPE, llama = sentencepiece BPE)"
        )
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens: the file has no vocabulary")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    ids = _gguf_special_ids(meta, kind)
    for i in (ids["bos"], ids["eos"], ids["unk"]):
        if i is not None and types[i] == TOKEN_NORMAL:
            types[i] = TOKEN_CONTROL  # older files leave them untyped; they must still match whole
    backend, add_bos = builders[kind](meta, tokens, types, ids)
    _add_gguf_added_tokens(backend, tokens, types)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos)) and ids["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    backend.post_processor = _template_processor(
        (tokens[ids["bos"]], ids["bos"]) if add_bos else None,
        (tokens[ids["eos"]], ids["eos"]) if add_eos else None,
    )
    return cls(
        backend,
        bos_token_id=ids["bos"],
        eos_token_ids=_gguf_eos_ids(meta, tokens, types, ids["eos"]),
        pad_token_id=ids["pad"],
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens={f"{k}_token": tokens[i] for k, i in ids.items() if i is not None},
    )


def _gguf_special_ids(meta: dict, kind: str) -> dict[str, int | None]:
    spm = kind == "llama"  # llama.cpp's defaults for sentencepiece: <unk> 0, <s> 1, </s> 2
    ids = {
        "bos": meta.get("tokenizer.ggml.bos_token_id", 1 if spm else None),
        "eos": meta.get("tokenizer.ggml.eos_token_id", 2 if spm else None),
        "unk": meta.get("tokenizer.ggml.unknown_token_id", 0 if spm else None),
        "pad": meta.get("tokenizer.ggml.padding_token_id"),
    }
    n = len(meta["tokenizer.ggml.tokens"])
    for name, i in ids.items():
        if i is not None and not 0 <= i < n:
            raise ValueError(f"GGUF {name} token id {i} is outside the vocabulary (0..{n - 1})")
    return ids


def _gguf_eos_ids(meta: dict, tokens: list[str], types: list[int], eos: int | None) -> list[int]:
    ids = [eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_CONTROL}
    ids += [special[t] for t in EOG_TEXTS if t in special]
    return [i for i in ids if i is not None]


def _gguf_byte_level(meta: dict, tokens: list[str], types: list[int], ids: dict):
    pre = str(meta.get("tokenizer.ggml.pre") or "default")  # llama.cpp falls back to "default"
    if pre not in _PRE_FAMILY:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
            f"{sorted(_PRE_FAMILY)}"
        )
    family = _PRE_FAMILY[pre]
    # llama.cpp takes a pre-token that is itself in the vocabulary whole (`ignore_merges`) and adds
    # BOS by default for the Llama-3 family; the file's own `add_bos_token` still wins.
    is_llama3 = family == "llama3"
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    model = models.BPE(_vocab(tokens), merges, ignore_merges=is_llama3)
    backend = tokenizers.Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[family]]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend, is_llama3


def _gguf_sentencepiece(meta: dict, tokens: list[str], types: list[int], ids: dict):
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:  # no scores: the vocabulary order is the merge order
        scores = [-float(i) for i in range(len(tokens))]
    merges = meta.get("tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges else None
    backend = _sentencepiece_bpe(
        tokens,
        list(scores),
        mergeable=[t == TOKEN_NORMAL for t in types],
        unk=tokens[ids["unk"]] if ids["unk"] is not None else None,
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        merges=merges,
    )
    return backend, True  # llama.cpp adds BOS to sentencepiece vocabularies unless told not to


def _add_gguf_added_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]):
    # Control tokens (<|im_start|>) and user-defined ones (<think>) are matched whole in the text,
    # as llama.cpp does; they already have ids in the vocabulary, so no id moves.
    control = [t for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [t for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


# ---------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin


def _load_llama2c(cls: type[Tokenizer], path: Path) -> Tokenizer:
    pieces, scores = _read_llama2c(path)
    # The file spells BOS/EOS as "\n<s>\n" / "\n</s>\n"; name them as sentencepiece does.
    for i, name in enumerate(("<unk>", "<s>", "</s>")):
        if pieces[i].strip() == name:
            pieces[i] = name
    is_byte = [p.startswith("<0x") and p.endswith(">") and len(p) == 6 for p in pieces]
    mergeable = [i > 2 and not b for i, b in enumerate(is_byte)]
    backend = _sentencepiece_bpe(pieces, scores, mergeable, unk=pieces[0], add_space_prefix=True)
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in pieces[:3]])
    backend.post_processor = _template_processor(("<s>", 1), None)  # llama2.c encodes with BOS
    return cls(
        backend,
        bos_token_id=1,
        eos_token_ids=[2],
        special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )


def _read_llama2c(path: Path) -> tuple[list[str], list[float]]:
    """int32 max_token_length, then per token: float32 score, int32 length, `length` bytes."""
    raw = path.read_bytes()
    pieces, scores, offset = [], [], 4
    try:
        while offset < len(raw):
            score, length = struct.unpack_from("<fi", raw, offset)
            piece = raw[offset + 8 : offset + 8 + length]
            if length < 0 or len(piece) != length:
                raise struct.error("piece runs past the end of the file")
            pieces.append(piece.decode("utf-8", errors="replace").replace(" ", SPIECE_SPACE))
            scores.append(score)
            offset += 8 + length
    except struct.error as e:
        raise ValueError(f"{path}: not a llama2.c tokenizer.bin ({e})") from e
    if len(pieces) < 259:
        raise ValueError(f"{path}: {len(pieces)} tokens, but llama2.c needs 3 special + 256 bytes")
    return pieces, scores


# ---------------------------------------------------------------------------------------------
# Shared builders


def _sentencepiece_bpe(
    pieces: list[str],
    scores: list[float],
    mergeable: list[bool],
    unk: str | None,
    add_space_prefix: bool,
    merges: list[tuple[str, str]] | None = None,
) -> tokenizers.Tokenizer:
    """Sentencepiece-style BPE: spaces as "▁", a "▁" prepended to each text run (so also after a
    special token, as llama.cpp and llama2.c do), unknown characters as <0xXX> byte pieces."""
    if merges is None:
        merges = _merges_from_scores(pieces, scores, mergeable)
    model = models.BPE(_vocab(pieces), merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    space = normalizers.Replace(" ", SPIECE_SPACE)
    prefix = [normalizers.Prepend(SPIECE_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix, space])
    strip = [decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    pieces: list[str], scores: list[float], mergeable: list[bool]
) -> list[tuple[str, str]]:
    """Every split (left, right) of a piece into two vocabulary pieces, best merged score first.

    Sentencepiece (and llama2.c's `encode`) repeatedly merge the adjacent pair whose concatenation
    scores highest; a BPE whose merge ranks follow that score does the same. Ties are ordered as
    in transformers' `generate_merges`. Only normal pieces take part: control, unknown and
    <0xXX> byte pieces are never the product of a merge.
    """
    vocab = {p: i for i, p in enumerate(pieces) if mergeable[i]}
    merges = []
    for piece, i in vocab.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        splits.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        merges += [(scores[i], a, b) for a, b in splits]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(a, b) for _, a, b in merges]


def _vocab(pieces: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)  # a repeated piece keeps its first id
    return vocab


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    """Post-processor adding `bos` in front and/or `eos` at the end of each sequence."""

    def part(seq: str, type_id: int) -> list[str]:
        head = [f"{bos[0]}:{type_id}"] if bos else []
        tail = [f"{eos[0]}:{type_id}"] if eos else []
        return [*head, f"${seq}:{type_id}", *tail]

    specials = [t for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(
        single=part("A", 0), pair=part("A", 0) + part("B", 1), special_tokens=specials
    )


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids))


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first_id(*candidates) -> int | None:
    return next((int(c) for c in candidates if c is not None), None)
