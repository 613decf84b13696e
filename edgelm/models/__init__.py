"""Model registry: one module per Hugging Face `model_type`, looked up by name."""

import importlib

# model_type -> module name in edgelm.models (aliases are architectures llama.py already covers)
MODEL_MODULES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "smollm": "llama",
    "smollm2": "llama",
    "granite": "granite",
    "minicpm": "minicpm",
    "minicpm4": "minicpm",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "granitemoe": "granitemoe",
    "granitemoeshared": "granitemoe",
    "granitemoehybrid": "granitemoehybrid",
    "mamba2": "mamba2",
}


def get_model_module(model_type: str):
    if model_type not in MODEL_MODULES:
        raise ValueError(
            f"unknown model_type {model_type!r}: edgelm supports {', '.join(sorted(MODEL_MODULES))}"
        )
    return importlib.import_module(f"edgelm.models.{MODEL_MODULES[model_type]}")


def build_model(config: dict):
    """config.json dict -> Model with uninitialised weights."""
    module = get_model_module(config.get("model_type", ""))
    args = module.ModelArgs.from_dict(config)
    return module.Model(args)
