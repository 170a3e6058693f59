"""A bounded load test of a served model: many single-row requests from concurrent clients on
loopback. Every answer must equal the one the same request got alone, no request may fail, and the
server's resident memory after the run must stay within 10% of what it was after warm-up.

    python -m benchmarks.load_test URL [--requests 20000] [--clients 32]

The test suite runs the same check at a reduced size (tests/test_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks.common import group_pids

__all__ = ["LoadReport", "group_rss_bytes", "run_load"]


@dataclass
class LoadReport:
    requests: int
    errors: list[str]
    mismatches: int
    rss_after_warmup: int
    rss_after: int

    @property
    def rss_growth(self) -> float:
        return self.rss_after / self.rss_after_warmup - 1 if self.rss_after_warmup else 0.0


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in the process group ``pgid`` (a server and its workers)."""
    total = 0
    for pid in group_pids(pgid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    return total


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str]:
    async with session.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.text()


async def _run(url: str, bodies: list[bytes], requests: int, clients: int, pgid: int | None, seed: int) -> LoadReport:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        expected = {}
        for body in bodies:  # sequentially, one at a time: the reference answers, and the warm-up
            status, text = await _post(session, url, body)
            if status != 200:
                raise RuntimeError(f"a reference request failed with HTTP {status}: {text[:300]}")
            expected[body] = json.loads(text)
        rss_warm = group_rss_bytes(pgid) if pgid else 0
        rng = random.Random(seed)
        plan = [rng.choice(bodies) for _ in range(requests)]
        errors: list[str] = []
        mismatches = 0

        async def client(share: list[bytes]) -> None:
            nonlocal mismatches
            for body in share:
                status, text = await _post(session, url, body)
                if status != 200:
                    errors.append(f"HTTP {status}: {text[:200]}")
                elif json.loads(text) != expected[body]:
                    mismatches += 1

        await asyncio.gather(*(client(plan[i::clients]) for i in range(clients)))
        return LoadReport(requests, errors, mismatches, rss_warm, group_rss_bytes(pgid) if pgid else 0)


def run_load(url: str, bodies: list[bytes], requests: int = 20_000, clients: int = 32, pgid: int | None = None,
             seed: int = 0) -> LoadReport:
    """Send ``requests`` requests drawn from ``bodies`` from ``clients`` concurrent clients."""
    return asyncio.run(_run(url, bodies, requests, clients, pgid, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:5001")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pgid", type=int, default=None, help="the server's process group, to measure its memory")
    args = parser.parse_args()
    from benchmarks.models import texts

    bodies = [json.dumps({"inputs": [t]}).encode() for t in texts(200, seed=11)]
    report = run_load(args.url, bodies, args.requests, args.clients, args.pgid)
    print(f"{report.requests} requests at {args.clients} clients: {len(report.errors)} errors, "
          f"{report.mismatches} answers unlike the sequential ones, resident memory "
          f"{report.rss_after_warmup / 2**20:.0f} -> {report.rss_after / 2**20:.0f} MiB ({report.rss_growth:+.1%})")


if __name__ == "__main__":
    main()
