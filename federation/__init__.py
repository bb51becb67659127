"""Hansa federation: what the alliance shares (roster, combining, evidence)."""
