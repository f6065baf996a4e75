"""Evaluation: perplexity, multiple-choice tasks, efficiency."""

from slmkit.eval.efficiency import EfficiencyConfig, EfficiencyResult, measure
from slmkit.eval.perplexity import PerplexityConfig, PerplexityResult, perplexity, read_text
from slmkit.eval.tasks import MCItem, MCResult, loglikelihoods, multiple_choice

__all__ = [
    "EfficiencyConfig",
    "EfficiencyResult",
    "MCItem",
    "MCResult",
    "PerplexityConfig",
    "PerplexityResult",
    "loglikelihoods",
    "measure",
    "multiple_choice",
    "perplexity",
    "read_text",
]
