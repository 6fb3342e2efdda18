"""Slow clients against a balancer, and a normal client beside them.

``ATTACKERS`` connections each start a request and then trickle it, one byte every 1-2 s: half
of them the headers of a ``GET /home``, half the body of a ``POST /add`` that announces 60 kB (under LB_MAX_BODY).
Whenever the balancer drops one, it connects again at once. Meanwhile a normal client sends
``GET /home`` on a fresh connection every ``INTERVAL`` seconds with a ``TIMEOUT``; the figures
are its success rate and latency. Loopback only; bounded by ``--seconds``.

    python bench/slowloris.py http://127.0.0.1:5000 --attackers 200 --seconds 30

``tests/test_slow_clients.py`` runs a smaller attack through ``attack()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit


@dataclass
class Outcome:
    attackers: int
    seconds: float
    normal_sent: int = 0
    normal_ok: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, successful GETs
    attack_connections: int = 0  # connections the attackers opened (reconnects included)
    attack_dropped: int = 0  # ... that the balancer ended
    dropped_trickling: dict[str, int] = field(default_factory=dict)  # by kind: headers, body

    @property
    def success_rate(self) -> float:
        return self.normal_ok / self.normal_sent if self.normal_sent else 0.0

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, object]:
        out = asdict(self)
        del out["latencies"]
        out.update(success_rate=round(self.success_rate, 4),
                   p50_ms=_ms(self.percentile(0.5)), p95_ms=_ms(self.percentile(0.95)),
                   mean_ms=_ms(statistics.fmean(self.latencies) if self.latencies else None))
        return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def _trickle(host: str, port: int, kind: str, stop_at: float, outcome: Outcome) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        outcome.attack_connections += 1
        if kind == "headers":
            writer.write(b"GET /home HTTP/1.1\r\nHost: slow\r\n")
            drip = b"X"
        else:
            writer.write(b"POST /add HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 60000\r\n\r\n{")
            drip = b" "
        try:
            while loop.time() < stop_at:
                try:  # whatever the balancer says, or its close, ends this connection
                    data = await asyncio.wait_for(reader.read(65536), random.uniform(1.0, 2.0))
                except TimeoutError:
                    writer.write(drip)
                    await writer.drain()
                    continue
                if not data or data.startswith(b"HTTP/1.1 408"):  # dropped, or timed out
                    outcome.attack_dropped += 1
                    outcome.dropped_trickling[kind] = outcome.dropped_trickling.get(kind, 0) + 1
                    break
        except OSError:
            outcome.attack_dropped += 1
            outcome.dropped_trickling[kind] = outcome.dropped_trickling.get(kind, 0) + 1
        finally:
            writer.close()


async def _normal(host: str, port: int, stop_at: float, interval: float, timeout: float,
                  outcome: Outcome) -> None:
    loop = asyncio.get_running_loop()
    request = b"GET /home HTTP/1.1\r\nHost: normal\r\nConnection: close\r\n\r\n"
    while loop.time() < stop_at:
        began = loop.time()
        outcome.normal_sent += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            try:
                writer.write(request)
                reply = await asyncio.wait_for(reader.read(), max(0.01, began + timeout - loop.time()))
            finally:
                writer.close()
            if reply.startswith(b"HTTP/1.1 200"):
                outcome.normal_ok += 1
                outcome.latencies.append(loop.time() - began)
        except (TimeoutError, OSError):
            pass
        await asyncio.sleep(max(0.0, began + interval - loop.time()))


async def _attack(url: str, attackers: int, seconds: float, interval: float,
                  timeout: float, warmup: float) -> Outcome:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    outcome = Outcome(attackers, seconds)
    stop_at = loop.time() + warmup + seconds
    tasks = [asyncio.create_task(_trickle(host, port, "headers" if i % 2 else "body", stop_at,
                                          outcome)) for i in range(attackers)]
    await asyncio.sleep(warmup)  # every attacker holds a connection before the clock starts
    await _normal(host, port, stop_at, interval, timeout, outcome)
    await asyncio.gather(*tasks, return_exceptions=True)
    return outcome


def attack(url: str, attackers: int = 200, seconds: float = 30.0, interval: float = 0.25,
           timeout: float = 2.0, warmup: float = 2.0) -> Outcome:
    """Run the attack and the normal client against ``url``; what the normal client saw."""
    return asyncio.run(_attack(url, attackers, seconds, interval, timeout, warmup))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--attackers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.25,
                        help="seconds between the normal client's GETs")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="the normal client's timeout per GET")
    args = parser.parse_args(argv)
    began = time.monotonic()
    outcome = attack(args.url, args.attackers, args.seconds, args.interval, args.timeout)
    print(json.dumps({**outcome.summary(), "wall_s": round(time.monotonic() - began, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
