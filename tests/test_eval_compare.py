"""`edgelm eval compare` (edgelm/eval/compare.py): a model against itself is a zero row, the PPL is
the exact exp(mean NLL), a ternarized model shows a positive KL and lower agreement, the CLI prints
the table, and a text shorter than one window is a clear error."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgelm.cli import main
from edgelm.eval.compare import compare_models, format_table
from edgelm.loader import load
from edgelm.quant.ternary import is_ternary_target, ternarize_model

torch.set_num_threads(1)
STORIES = "/work/shared/models/stories260K/hf"
TEXT = "/work/shared/data/python-library-docs.txt"


@pytest.fixture(scope="module")
def ids():
    model = load(STORIES, dtype=torch.float32)
    return model.tokenizer.encode("Once upon a time, there was a little girl named Lily. " * 30)


def test_compare_against_itself_and_a_ternary_model(ids):
    ref = load(STORIES, dtype=torch.float32)
    fits = lambda p, m: is_ternary_target(p, m) and m.in_features % 32 == 0  # noqa: E731
    tern = ternarize_model(load(STORIES, dtype=torch.float32, fuse=False), 32, fits, head=None)
    rows = compare_models([("fp", ref), ("same", ref), ("ternary", tern)], ids, ctx=64, max_windows=3)
    assert [r.tokens for r in rows] == [192] * 3
    with torch.no_grad():  # exact reference: exp of the mean NLL over the same 3 windows
        nll = sum(float(F.cross_entropy(ref(torch.tensor([ids[w * 64 : w * 64 + 64]]))[0],
                                        torch.tensor(ids[w * 64 + 1 : w * 64 + 65]), reduction="sum"))
                  for w in range(3))
    assert math.isclose(rows[0].ppl, math.exp(nll / 192), rel_tol=1e-6)
    assert rows[1].ppl == rows[0].ppl and rows[1].delta_pct == 0 and rows[1].top1 == 1.0
    assert abs(rows[1].kl) < 1e-6
    assert rows[2].kl > 0.05 and rows[2].top1 < 1.0 and rows[2].delta_pct > 0
    assert "ternary" in format_table(rows)


def test_cli_prints_table(capsys):
    assert main(["eval", "compare", "--models", f"{STORIES},{STORIES}", "--text", TEXT, "--ctx", "32",
                 "--max-windows", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agree" in out and "100.00%" in out and "(64 tokens scored)" in out


def test_text_shorter_than_a_window(ids):
    with pytest.raises(ValueError, match="fewer than one window of --ctx 512"):
        compare_models([("m", load(STORIES, dtype=torch.float32))], ids[:100], ctx=512)
