"""The activation profile behind P-GPTQ: max |x| by position of every layer's MLP down-projection
input, over calibration sequences from the first 2 MB of python-library-docs.txt.

    python benchmarks/pgptq_profile.py --out docs/pgptq_profile.png
"""

import argparse
from pathlib import Path

import torch

from edgelm.loader import load
from edgelm.quant.gptq import calibration_tokens, down_proj_profile, plot_profile

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ROOT.parent / "shared/data/python-library-docs.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--positions", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "docs/pgptq_profile.png"))
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load(args.model, dtype=torch.float32, fuse=False, dequantize=True)
    tokens = calibration_tokens(model.tokenizer, TEXT, args.samples, args.seq_len)
    prof = down_proj_profile(model, tokens, args.positions)  # (layers, positions)
    plot_profile(prof, args.out, f"{Path(args.model).name}: {args.samples} x {args.seq_len} calibration tokens")
    ratio = prof[:, :4].amax(1) / prof[:, 4:].amax(1)
    print("max|x| at positions 0-3 / max at positions 4+, per layer:", [round(float(r), 1) for r in ratio])
    print("position of the max, per layer:", prof.argmax(1).tolist())
    print(args.out)


if __name__ == "__main__":
    main()
