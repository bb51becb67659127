"""Hansa: federated, signed, policy-tagged aggregate queries for alliances of cities.

Subpackages (dependencies point one way): :mod:`hansa.protocol` (wire
messages, pure) ← :mod:`hansa.crypto` (keys, envelopes, Merkle trees, signed
notes) ← :mod:`hansa.federation` (roster, combining, evidence) ←
:mod:`hansa.node` (the city's server and the command line).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hansa")
except PackageNotFoundError:  # pragma: no cover — running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
