"""Measures of a run's output: diversity of what the proposer writes (metrics for detectors follow)."""
