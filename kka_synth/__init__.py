"""kka-synth: hard, realistic synthetic defects for industrial visual anomaly detection."""

from kka_synth.types import Candidate, DefectSpec, DetectorOutput, PreferencePair, Proposal, Sample, SpecError

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "DefectSpec",
    "DetectorOutput",
    "PreferencePair",
    "Proposal",
    "Sample",
    "SpecError",
    "__version__",
]
