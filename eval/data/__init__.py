"""Compact, derived data files shipped with eval (length profiles); see docs/workloads.md for provenance."""
