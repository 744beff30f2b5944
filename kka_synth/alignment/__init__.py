"""Alignment: the Deep SAD confusion evaluator, the hard/easy rule, preference pairs and DPO.

``kka_synth.alignment.dpo`` (``train_dpo``, ``preference_margin``) imports TRL and is imported on its own.
"""

from kka_synth.alignment.deepsad import DeepSADEvaluator, EvaluatorInputError
from kka_synth.alignment.hardness import (
    HardnessResult,
    HardnessRule,
    JudgeEvaluator,
    assign_folds,
    cross_fit_hardness,
)
from kka_synth.alignment.pairs import Outcome, PairsInputError, build_pairs, pairs_to_columns

__all__ = [
    "DeepSADEvaluator",
    "EvaluatorInputError",
    "HardnessResult",
    "HardnessRule",
    "JudgeEvaluator",
    "Outcome",
    "PairsInputError",
    "assign_folds",
    "build_pairs",
    "cross_fit_hardness",
    "pairs_to_columns",
]
