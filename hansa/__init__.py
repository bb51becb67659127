"""Hansa: federated, signed, policy-tagged aggregate queries for alliances of cities.

Subpackages (dependencies point one way): :mod:`hansa.protocol` (wire
messages, pure) ← :mod:`hansa.crypto` (keys, envelopes, Merkle trees, signed
notes) ← :mod:`hansa.federation` (roster, combining, evidence) ←
:mod:`hansa.node` (the city's server and the command line).
"""

from __future__ import annotations

# Kept in step with pyproject.toml (a test checks). Not read through
# importlib.metadata, which would pull email.utils and socket into the pure layers.
__version__ = "0.1.0"

__all__ = ["__version__"]
