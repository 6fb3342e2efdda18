"""The registry store a deployment's settings name: the JSON file (the embedded default) or
etcd (``LB_REGISTRY=etcd://...``, for several balancers and supervisors on several hosts).

Both have one face (``read``, ``update``, ``create``, ``restore``, ``view``, ``where``,
``kind``) and hold the same document, so everything above them is written once. Beside the
document, each keeps the balancer workers' answer counts (``publish_answers``,
``withdraw_answers``, ``read_answers``: ``lb.evidence``), never under the write lock.
"""

from __future__ import annotations

from lb.etcd import EtcdRegistry, EtcdView
from lb.registry import Registry, RegistryView
from lb.settings import Settings

Store = Registry | EtcdRegistry
View = RegistryView | EtcdView


def open_registry(settings: Settings) -> Store:
    """The store ``LB_REGISTRY`` names. Nothing is read or connected yet."""
    address = settings.etcd
    if address is not None:
        return EtcdRegistry(address, settings.lock_timeout)
    return Registry(settings.registry_path, settings.lock_timeout)
