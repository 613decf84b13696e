"""llama.cpp (through llama-cpp-python) as a back-end: the speed peer, same GGUF, same threads."""

from pathlib import Path

import llama_cpp
import numpy as np
import torch

from edgelm.formats.gguf import read_gguf
from edgelm.tokenizer import Tokenizer


class LlamaCppExecutor:
    name = "llama.cpp"

    def __init__(self, path, threads: int | None = None, n_ctx: int = 4096, **_):
        from edgelm.config import physical_cores

        path = Path(path)
        if path.suffix != ".gguf":
            raise ValueError(f"the llama.cpp back-end runs GGUF files only, not {path}")
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_threads=threads or physical_cores(), n_ctx=n_ctx, verbose=False
        )
        self.tokenizer = Tokenizer.from_gguf_metadata(read_gguf(path).metadata)
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> torch.Tensor:
        ptr = self.llm._ctx.get_logits()  # logits of the last evaluated token
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_logits()

    def decode(self, token: int) -> torch.Tensor:
        self.llm.eval([token])
        return self._last_logits()

    def cache_bytes(self) -> int:
        return int(llama_cpp.llama_state_get_size(self.llm._ctx.ctx))

    def weight_bytes(self) -> int:
        return Path(self.llm.model_path).stat().st_size
