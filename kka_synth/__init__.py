"""kka-synth: hard, realistic synthetic defects for industrial visual anomaly detection.

The Python API mirrors the command line (see :mod:`kka_synth.api`)::

    import kka_synth

    run = kka_synth.run({"dataset": "demo", "iterations": 3})
    kka_synth.evaluate(run, detectors=["draem"])
"""

from __future__ import annotations

from typing import Any

from kka_synth.types import Candidate, DefectSpec, DetectorOutput, PreferencePair, Proposal, Sample, SpecError

__version__ = "0.1.0"

_API = ("Run", "evaluate", "export", "make_config", "open_run", "publish", "run")


def __getattr__(name: str) -> Any:
    # the API loads on first use, so importing the package for its types stays cheap
    if name in _API:
        from kka_synth import api

        return getattr(api, name)
    raise AttributeError(f"module 'kka_synth' has no attribute {name!r}")


__all__ = [
    "Candidate",
    "DefectSpec",
    "DetectorOutput",
    "PreferencePair",
    "Proposal",
    "Run",
    "Sample",
    "SpecError",
    "__version__",
    "evaluate",
    "export",
    "make_config",
    "open_run",
    "publish",
    "run",
]
