"""Runs: per-run state kept in memory over the durable event log (see DESIGN.md)."""
