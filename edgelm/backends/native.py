"""The edgelm engine itself behind the executor interface."""

import torch

from edgelm.config import set_threads
from edgelm.generate import prefill
from edgelm.loader import load


class NativeExecutor:
    name = "native"

    def __init__(self, path, threads: int | None = None, dtype: torch.dtype | None = None, quant: str | None = None,
                 **load_kwargs):
        set_threads(threads)
        if quant in ("int8", "int4"):
            load_kwargs["quantize"] = quant
        elif quant != "gguf":  # fp32 / bf16: dense weights even from a quantized GGUF
            load_kwargs["dequantize"] = True
        self.model = load(path, dtype=dtype, **load_kwargs)
        self.tokenizer = self.model.tokenizer
        self.cache = None

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.cache = self.model.make_cache()
        return prefill(self.model, torch.tensor([ids]), self.cache)[0]

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        return self.model(torch.tensor([[token]]), self.cache)[0, -1]

    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache) if self.cache else 0

    def weight_bytes(self) -> int:
        from edgelm.inspect import weight_bytes

        return weight_bytes(self.model)
