"""Execution backends: `inline` (in-process), `local` (warm worker processes), `ray` (a Ray cluster)."""
