"""Hugging Face model folders: config.json + safetensors (single file or sharded)."""

import json
from collections.abc import Iterator
from pathlib import Path

import torch


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ValueError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    return text_config(config)


def text_config(config: dict) -> dict:
    """Multimodal wrappers (Gemma 3) nest the text model's config: edgelm runs the text model."""
    if "text_config" in config and "model_type" in config["text_config"]:
        return {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", True)}
    return config


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise ValueError(
                f"{folder}: only pickle checkpoints (.bin/.pt) found; edgelm never unpickles weights. "
                "Convert them to safetensors first."
            )
        raise ValueError(f"{folder}: no *.safetensors weights found")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) lazily, one tensor in memory at a time (mmap-backed)."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f}: corrupt or unreadable safetensors file ({e})") from e
        with handle:
            for name in handle.keys():
                try:
                    yield name, handle.get_tensor(name)
                except (SafetensorError, OSError, ValueError) as e:
                    raise ValueError(f"{f}: cannot read tensor {name!r} ({e})") from e
