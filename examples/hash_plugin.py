"""An example hash plug-in: hash functions that integer formulas cannot say.

Formulas (``LB_HASH='H=...; Phi=...'``) have no loops, so they cannot walk over the bytes of a
key. A plug-in can: it is an importable module holding a ``lb.hashring.HashPreset``, named in
``LB_HASH`` as ``module:name``. Run the balancer with this one::

    PYTHONPATH=examples LB_HASH=hash_plugin:fnv1a .venv/bin/lb-run
    PYTHONPATH=examples .venv/bin/lb-analyze balance --hash hash_plugin:fnv1a

Every process of the deployment imports it (lb-run, the balancer's workers, the supervisor),
so the module must be importable in each: here through PYTHONPATH, which lb-run passes on to
them; in a container image, copy it in or install it. ``request`` and ``virtual`` must be
deterministic, return an ``int`` and be quick (``request`` runs once per routed request).
Unlike formulas, a plug-in is code of your own: it is trusted, not checked.
"""

from __future__ import annotations

from lb.hashring import HashPreset

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = 0xFFFFFFFFFFFFFFFF


def fnv1a_64(*values: int) -> int:
    """FNV-1a, 64 bits, over each value's 8 little-endian bytes (values taken mod 2**64)."""
    h = FNV_OFFSET
    for value in values:
        for byte in (value & MASK64).to_bytes(8, "little"):
            h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


fnv1a = HashPreset(
    name="fnv1a",  # the registry stores the spec (hash_plugin:fnv1a), not this name
    request=lambda i: fnv1a_64(i),
    virtual=lambda i, j: fnv1a_64(i, j),
    description="FNV-1a (64-bit) of the request key and of (server id, j)",
)
