"""transformers as a back-end: the reference implementation, run through the same interface."""

from pathlib import Path

import torch
import transformers

from edgelm.config import configure_runtime, set_threads
from edgelm.loader import read_checkpoint


class TransformersExecutor:
    name = "transformers"

    def __init__(self, path, threads: int | None = None, dtype: torch.dtype | None = None, **_):
        set_threads(threads)
        configure_runtime()
        path = Path(path)
        kwargs = {"dtype": dtype or torch.float32}
        if path.is_dir():
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        self.model.eval()
        self.tokenizer = read_checkpoint(path)[2]  # identical ids across back-ends
        self.cache = None

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.cache = transformers.DynamicCache()
        out = self.model(torch.tensor([ids]), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        out = self.model(torch.tensor([[token]]), past_key_values=self.cache, use_cache=True)
        return out.logits[0, -1].float()

    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        return total

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
