"""``/add`` and ``/rm``: validation, then reserve in the registry, act, commit or roll back.

Every check that can reject a call runs before anything changes, and the registry entries a
call creates are reserved under the registry lock before any replica starts, so two concurrent
calls can never pick the same name or server id and a rejected call leaves no trace.

Who acts on the replicas:
- **the file store** (one host): the balancer worker that took the call starts or stops them
  itself, under a lease on their entries; the supervisor finishes a call whose worker died;
- **etcd** (several balancers, several hosts): the leading supervisor alone starts and stops
  replicas. An ``/add`` writes its entries under a ``WANT`` lease, waits until the supervisor
  has started them and they answer, then commits them by ending the lease; if that takes longer
  than ``start_timeout`` it hands them back (503, nothing added), and entries whose lease runs
  out uncommitted (a balancer that died mid-call) are removed by the supervisor. An ``/rm``
  marks its entries removed and returns; the supervisor stops them. Balancers then need no
  Docker socket, and two supervisors' leases can never meet on one replica.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, TypeVar

from lb.backends import Backend, BackendError, Instance, ReplicaSpec
from lb.errors import ApiError, sentence
from lb.hashring import HashRing, RingFull
from lb.heartbeat import wait_ready
from lb.leases import Lease, Purpose
from lb.naming import MAX_HOSTNAME, random_hostname, valid_hostname
from lb.registry import READY, REMOVING, RegistryError, RegistryWriteUnknown, Replica, State
from lb.settings import Settings
from lb.stores import Store
from lb.strategies import MAX_WEIGHT, room

log = logging.getLogger(__name__)

ADD_TOO_MANY = "Length of hostname list is more than newly added instances"
RM_TOO_MANY = "Length of hostname list is more than removable instances"

T = TypeVar("T")
R = TypeVar("R")


def parse_scale_request(body: Any, too_many: str, weighted: bool = False) -> tuple[int, list[str]]:
    """``{"n": int >= 1, "hostnames": [names]}`` -> (n, hostnames), or an ``ApiError(400)``;
    ``weighted``: a ``weight`` field may be there too (``parse_weight`` reads it)."""
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object like {\"n\": 1, \"hostnames\": []}")
    fields = ("n", "hostnames", "weight") if weighted else ("n", "hostnames")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        expected = ", ".join(f"'{f}'" for f in fields[:-1]) + f" and '{fields[-1]}'"
        raise ApiError(400, f"Unknown field '{unknown[0]}' (expected {expected})")
    if "n" not in body:
        raise ApiError(400, "Field 'n' is required")
    n = body["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ApiError(400, "Field 'n' must be a positive integer")
    hostnames = body.get("hostnames")
    if hostnames is None:
        hostnames = []
    if not isinstance(hostnames, list):
        raise ApiError(400, "Field 'hostnames' must be a list of strings")
    if len(hostnames) > n:
        raise ApiError(400, too_many)
    seen: set[str] = set()
    for name in hostnames:
        if not isinstance(name, str):
            raise ApiError(400, "Field 'hostnames' must be a list of strings")
        if not valid_hostname(name):
            raise ApiError(400, f"Invalid hostname {_show(name)}: use 2 to {MAX_HOSTNAME} of "
                                "[a-zA-Z0-9_.-], starting with a letter or digit")
        if name in seen:
            raise ApiError(400, f"Hostname '{name}' is given more than once")
        seen.add(name)
    return n, hostnames


def parse_weight(value: Any, what: str, drain: bool) -> int:
    """A replica's weight: an integer 1..MAX_WEIGHT, or 0 too where ``drain``; else 400."""
    least = 0 if drain else 1
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_WEIGHT:
        raise ApiError(400, f"{what} must be an integer from {least} to {MAX_WEIGHT}"
                            + (" (0 drains the replica)" if drain else ""))
    return value


def parse_weights_request(body: Any) -> dict[str, int]:
    """``{"weights": {hostname: int 0..MAX_WEIGHT}}`` -> those weights, or an ``ApiError(400)``.
    An empty object changes nothing (the reply then lists the weights as they are)."""
    example = 'like {"weights": {"Server1": 2}}'
    if not isinstance(body, dict) or set(body) != {"weights"}:
        raise ApiError(400, f"Request body must be a JSON object with one field, 'weights', {example}")
    weights = body["weights"]
    if not isinstance(weights, dict):
        raise ApiError(400, f"Field 'weights' must be an object of hostnames and weights, {example}")
    return {name: parse_weight(w, f"The weight of {_show(name)}", drain=True)
            for name, w in weights.items()}


def weights_message(state: State, strategy: str) -> dict[str, Any]:
    """``/weight``'s reply: ``/rep``'s message, each replica's weight, and the share of the key
    space (ring slots or Maglev table entries) the strategy gives it at those weights (0 for a
    drained replica or one that is not ready)."""
    shares = state.lookup(strategy, state.routable()).shares()
    members = state.members()
    return {**state.rep(), "weights": {r.hostname: r.weight for r in members},
            "shares": {r.hostname: round(shares.get(r.server_id, 0.0), 6) for r in members}}


def _show(name: str) -> str:
    """A name for an error message: quoted, escaped, and not absurdly long."""
    shown = name if len(name) <= 40 else name[:40] + "..."
    return "'" + shown.encode("ascii", "backslashreplace").decode("ascii").replace("'", "\\'") + "'"


def _unplaceable(exc: ValueError) -> str:
    return (f"The hash map cannot place more virtual servers: {exc} (LB_HASH formulas are "
            "checked for K virtual servers per replica; weights above 1 on LB_STRATEGY=ring "
            "need a preset hash)")


def public_reason(exc: BaseException) -> str:
    """An error's text for a client: a backend's own words, or only the kind of a surprise
    (whose text may name files; the log has it whole)."""
    return str(exc) if isinstance(exc, BackendError) else type(exc).__name__


def parallel(fn: Callable[[T], R], items: list[T]) -> list[R | BaseException]:
    """``fn`` over ``items`` on a few threads; each result or the exception it raised."""
    if not items:
        return []

    def safe(item: T) -> R | BaseException:
        try:
            return fn(item)
        except Exception as exc:  # noqa: BLE001 - handed back to the caller, who decides
            return exc

    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(safe, items))


class Admin:
    """Scales the replica set through the registry and a backend."""

    def __init__(self, settings: Settings, registry: Store, backend: Backend | None) -> None:
        self.settings = settings
        self.registry = registry
        self.backend = backend  # None: the leading supervisor acts on replicas (etcd)

    # -- /add --------------------------------------------------------------------------------
    def add(self, n: int, hostnames: list[str], weight: int = 1) -> State:
        purpose = Purpose.ADD if self.backend is not None else Purpose.WANT
        lease = Lease.take(purpose, self.settings.start_timeout)
        with self.registry.update() as state:  # a registry error here has changed nothing
            entries = self._reserve(state, n, hostnames, lease, weight)
        try:
            if self.backend is None:
                return self._await_supervisor(lease.holder, entries)
            return self._start_reserved(self.backend, lease.holder, entries)
        except RegistryError as exc:
            log.error("an /add lost the registry half-way: %s", exc)
            then = ("the replicas it reserved are added by the supervisor once the registry "
                    "can be used again (see /rep)" if self.backend is not None else
                    "nothing was added (its reservation runs out and the supervisor removes "
                    "it)")
            if isinstance(exc, RegistryWriteUnknown):
                then = ("its last write could not be confirmed, so the replicas may or may "
                        "not have been added (see /rep)")
            raise ApiError(503, f"{sentence(exc.reason)} half-way through this call: "
                                f"{then}") from exc

    def _await_supervisor(self, holder: str, entries: list[Replica]) -> State:
        """Wait for the supervisor to start the reserved entries, and for them to answer;
        commit them, or hand them back."""
        timeout = self.settings.start_timeout
        deadline = time.monotonic() + timeout
        while True:
            mine = [r for r in self.registry.read().replicas
                    if r.leased_to(holder) and r.state != REMOVING]
            if len(mine) != len(entries):
                reason = "The new replicas were taken back while they started"
                break
            addresses = [r.address for r in mine if r.address]
            if len(addresses) == len(mine):
                ready = wait_ready(addresses, max(0.0, deadline - time.monotonic()))
                if len(ready) == len(addresses):
                    return self._commit_add(holder, len(entries))
                slow = sorted(r.hostname for r in mine if r.address not in ready)
                reason = (f"New replicas did not answer their heartbeat within {timeout:g}s: "
                          f"{', '.join(slow)}")
                break
            if time.monotonic() >= deadline:
                waiting = sorted(r.hostname for r in mine if not r.address)
                reason = (f"No supervisor started the new replicas within {timeout:g}s "
                          f"({', '.join(waiting)}): is one leading? (see /_lb/status)")
                break
            time.sleep(0.05)
        self._hand_back(holder)
        raise ApiError(503, reason + "; nothing was added")

    def _hand_back(self, holder: str) -> None:
        """An /add given up: its entries are removed, and the supervisor stops what it started.
        Should this write fail, their lease runs out and the supervisor does the same."""
        try:
            with self.registry.update() as state:
                for r in state.replicas:
                    if r.leased_to(holder) and r.state != REMOVING:
                        r.state = REMOVING
                        r.release()
        except RegistryError as exc:
            log.error("could not hand back an /add's replicas (their lease runs out): %s", exc)

    def _start_reserved(self, backend: Backend, holder: str, entries: list[Replica]) -> State:
        specs = [ReplicaSpec(e.hostname, e.server_id) for e in entries]
        results = parallel(backend.start, specs)
        started = [r for r in results if isinstance(r, Instance)]
        failed = [r for r in results if not isinstance(r, Instance)]
        if not failed:
            with self.registry.update() as state:
                for inst in started:
                    entry = state.find(inst.hostname)
                    if entry is not None and entry.leased_to(holder):
                        entry.runs_as(inst)
            ready = wait_ready([i.address for i in started], self.settings.start_timeout)
            if len(ready) == len(started):
                return self._commit_add(holder)
            slow = sorted(i.hostname for i in started if i.address not in ready)
            reason = (f"New replicas did not answer their heartbeat within "
                      f"{self.settings.start_timeout:g}s: {', '.join(slow)}")
        else:
            log.error("could not start new replicas: %s", failed[0])
            reason = f"Could not start new replicas: {public_reason(failed[0])}"
        self._roll_back_add(backend, holder, started)
        raise ApiError(503, reason + "; nothing was added")

    def _reserve(self, state: State, n: int, hostnames: list[str],
                 lease: Lease, weight: int = 1) -> list[Replica]:
        taken = {r.hostname for r in state.replicas}
        for name in hostnames:
            if name in taken:
                raise ApiError(409, f"Hostname '{name}' already exists")
        current = len(state.members())
        if current + n > self.settings.max_replicas:
            raise ApiError(409, f"Adding {n} would make {current + n} replicas; the maximum is "
                                f"{self.settings.max_replicas} (LB_MAX_REPLICAS)")
        names = list(hostnames)
        for _ in range(n - len(hostnames)):
            names.append(random_hostname(taken | set(names)))
        self._check_room(state, [weight] * n)
        ring = state.hash_ring()
        count = self._virtual_servers(ring, weight)
        entries = []
        try:
            for name, server_id in zip(names, islice(state.free_server_ids(), n)):
                slots = ring.add(server_id, count=count)
                entries.append(Replica(name, server_id, list(slots), weight=weight, lease=lease))
        except RingFull as exc:
            raise ApiError(409, f"The hash map has no room for {n} more replicas "
                                f"({ring.slots} slots, {count} each)") from exc
        except ValueError as exc:  # formulas checked for j < K: a weight needs more
            raise ApiError(409, _unplaceable(exc)) from exc
        state.replicas.extend(entries)
        return entries

    def _virtual_servers(self, ring: HashRing, weight: int) -> int:
        """The virtual servers a replica of ``weight`` gets in the spec map: w x K when that
        map routes (``LB_STRATEGY=ring``), else K (the other strategies weigh by themselves);
        a drained replica keeps what it had."""
        if self.settings.strategy != "ring" or weight == 0:
            return ring.virtual_per_server
        return ring.virtual_per_server * weight

    def _check_room(self, state: State, more: list[int],
                    changed: dict[str, int] | None = None) -> None:
        """409 unless the routable weights, with ``changed`` and ``more`` new replicas, fit
        the strategy's map."""
        changed = changed or {}
        weights = [changed.get(r.hostname, r.weight) for r in state.members()] + more
        why = room(self.settings.strategy, [w for w in weights if w])
        if why is not None:
            raise ApiError(409, f"The hash map has no room for these weights: {why}")

    # -- /weight -----------------------------------------------------------------------------
    def set_weights(self, weights: dict[str, int]) -> State:
        """Each named replica's weight changed at once, or none (409). On the spec map a
        replica's virtual servers grow or shrink to w x K, nobody else's moving; a weight of 0
        leaves them in place, so that the replica's own keys come back with its weight."""
        with self.registry.update() as state:
            members = {r.hostname: r for r in state.members()}
            for name in weights:
                if name not in members:
                    raise ApiError(409, f"Replica {_show(name)} does not exist")
                if members[name].adding:
                    raise ApiError(409, f"Replica '{name}' is still being added; try again "
                                        "shortly")
            changed = {h: w for h, w in weights.items() if members[h].weight != w}
            self._check_room(state, [], changed)
            ring = state.hash_ring()
            # Shrinking first frees slots for the growing ones.
            for name in sorted(changed, key=lambda h: changed[h] - members[h].weight):
                entry = members[name]
                count = self._virtual_servers(ring, changed[name])
                if changed[name] and count != len(entry.slots):
                    try:
                        entry.slots = list(ring.resize(entry.server_id, count))
                    except RingFull as exc:
                        raise ApiError(409, f"The hash map has no room for a weight of "
                                            f"{changed[name]} for '{name}' ({ring.slots} "
                                            f"slots, {ring.virtual_per_server} per unit of "
                                            "weight)") from exc
                    except ValueError as exc:
                        raise ApiError(409, _unplaceable(exc)) from exc
                entry.weight = changed[name]
        if changed:
            log.info("weights changed: %s", changed)
        return state

    def _commit_add(self, holder: str, expected: int | None = None) -> State:
        """The call's entries made ready and its lease ended; with ``expected``, only if all
        of them are still there (the supervisor may have removed an entry whose lease it saw
        run out), else none (503)."""
        now = time.time()
        with self.registry.update() as state:
            mine = [r for r in state.replicas if r.leased_to(holder) and r.state != REMOVING]
            taken_back = expected is not None and len(mine) != expected
            for entry in mine:
                if taken_back:
                    entry.state = REMOVING
                    entry.release()
                else:
                    entry.state, entry.lease = READY, None
                    entry.last_heartbeat, entry.failures, entry.ready_since = now, 0, now
        if taken_back:
            raise ApiError(503, "The new replicas were taken back before they could be "
                                "added; nothing was added")
        log.info("added replicas; now %s", state.rep())
        return state

    def _roll_back_add(self, backend: Backend, holder: str, started: list[Instance]) -> None:
        parallel(lambda i: backend.stop(i.handle), started)
        with self.registry.update() as state:
            state.replicas = [r for r in state.replicas if not r.leased_to(holder)]
        log.warning("rolled back an /add of %d replicas", len(started))

    # -- /rm ---------------------------------------------------------------------------------
    def remove(self, n: int, hostnames: list[str]) -> State:
        with self.registry.update() as state:  # a registry error here has changed nothing
            chosen = self._choose_removals(state, n, hostnames)
            lease = Lease.take(Purpose.RM, self.settings.start_timeout)
            if self.backend is None:  # the supervisor stops them: nobody holds them
                lease = lease.released()
            for entry in chosen:
                entry.state, entry.lease = REMOVING, lease
            handles = [e.handle for e in chosen if e.handle]
        if self.backend is None:
            log.info("removed %s (the supervisor stops them); now %s",
                     [e.hostname for e in chosen], state.rep())
            return state
        try:
            return self._stop_chosen(self.backend, lease.holder, chosen, handles)
        except RegistryError as exc:
            log.error("an /rm lost the registry half-way: %s", exc)
            raise ApiError(503, f"{sentence(exc.reason)} half-way through this call: the "
                                "replicas it chose no longer get requests and are removed by "
                                "the supervisor once the registry can be used again (see /rep)"
                           ) from exc

    def _stop_chosen(self, backend: Backend, holder: str, chosen: list[Replica],
                     handles: list[str]) -> State:
        # Routers stop sending new requests as soon as they see the entries leave the ready
        # set; the backend's graceful stop lets requests already in flight finish.
        results = parallel(backend.stop, handles)
        failed = {h for h, r in zip(handles, results) if isinstance(r, BaseException)}
        for handle, result in zip(handles, results):
            if isinstance(result, BaseException):
                log.error("stopping removed replica %s failed; the supervisor will retry: %s",
                          handle, result)
        with self.registry.update() as state:
            state.replicas = [r for r in state.replicas
                              if not (r.leased_to(holder) and r.state == REMOVING
                                      and r.handle not in failed)]
        log.info("removed %s; now %s", [e.hostname for e in chosen], state.rep())
        return state

    def _choose_removals(self, state: State, n: int, hostnames: list[str]) -> list[Replica]:
        members = {r.hostname: r for r in state.members()}
        for name in hostnames:
            if name not in members:
                raise ApiError(409, f"Replica '{name}' does not exist")
            if members[name].adding:
                raise ApiError(409, f"Replica '{name}' is still being added; try again shortly")
        if n > len(members):
            raise ApiError(409, f"Cannot remove {n} replicas: only {len(members)} exist")
        others = [r for name, r in members.items() if name not in hostnames and not r.adding]
        extra = n - len(hostnames)
        if extra > len(others):
            raise ApiError(409, f"Cannot remove {n} replicas now: "
                                f"{len(members) - len(hostnames) - len(others)} of the others "
                                "are still being added")
        return [members[h] for h in hostnames] + random.sample(others, extra)
