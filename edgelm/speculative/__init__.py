"""Speculative decoding: proposers (draft model, layer skip, n-gram), FR-Spec, the acceptance rule
and a generator that yields what `edgelm.generate.generate_step` yields, faster."""

from edgelm.speculative.acceptance import SamplingParams, accept_greedy, accept_sampled
from edgelm.speculative.frspec import (
    build_frequency_file,
    build_frequency_ranking,
    load_frequency_ranking,
    pick_size,
    save_frequency_ranking,
)
from edgelm.speculative.generate import SpeculativeStats, speculative_generate_step
from edgelm.speculative.proposers import (
    Draft,
    DraftModelProposer,
    LayerSkipProposer,
    NgramProposer,
    Proposer,
    check_same_tokenizer,
)

__all__ = [
    "Draft",
    "DraftModelProposer",
    "LayerSkipProposer",
    "NgramProposer",
    "Proposer",
    "SamplingParams",
    "SpeculativeStats",
    "accept_greedy",
    "accept_sampled",
    "build_frequency_file",
    "build_frequency_ranking",
    "check_same_tokenizer",
    "load_frequency_ranking",
    "pick_size",
    "save_frequency_ranking",
    "speculative_generate_step",
]
