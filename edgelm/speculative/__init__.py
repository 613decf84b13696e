"""Speculative decoding: proposers (draft model, layer skip, n-gram), FR-Spec, the acceptance rule
and a generator that yields what `edgelm.generate.generate_step` yields, in fewer target forwards.

Names load lazily, so `edgelm.speculative.cli` (argparse only) stays cheap to import.
"""

import importlib

_EXPORTS = {
    "SamplingParams": "acceptance",
    "accept_greedy": "acceptance",
    "accept_sampled": "acceptance",
    "build_frequency_file": "frspec",
    "build_frequency_ranking": "frspec",
    "load_frequency_ranking": "frspec",
    "pick_size": "frspec",
    "save_frequency_ranking": "frspec",
    "SpeculativeStats": "generate",
    "speculative_generate_step": "generate",
    "Draft": "proposers",
    "DraftModelProposer": "proposers",
    "LayerSkipProposer": "proposers",
    "NgramProposer": "proposers",
    "Proposer": "proposers",
    "check_same_tokenizer": "proposers",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"edgelm.speculative.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'edgelm.speculative' has no attribute {name!r}")


__all__ = list(_EXPORTS)
