"""A bounded load test of a served model: many single-row requests from concurrent clients on
loopback. Every answer must equal the one the same request got alone, no request may fail, and the
server's resident memory after the run must stay within 10% of what it was after warm-up.

    python -m benchmarks.load_test URL [--requests 20000] [--clients 32]
    python -m benchmarks.load_test URL --mixed-images [--requests 2000]   (the image example served)

With ``--mixed-images``, light one-image requests are timed alone and then while heavy ones (100
images x 64 crops each) keep the server busy; light requests must all succeed with their p99 well
under a heavy request's time, and heavy ones beyond the server's bound are refused (503).

The test suite runs the same check at a reduced size (tests/test_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks.common import group_pids

__all__ = ["LoadReport", "MixedReport", "group_rss_bytes", "image_bodies", "run_load", "run_mixed"]


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


@dataclass
class MixedReport:
    """Light requests' latencies alone and beside heavy ones, and what the heavy ones got."""

    light_alone_s: list[float]
    light_mixed_s: list[float]
    light_errors: list[str]
    heavy_s: list[float]
    heavy_statuses: dict[int, int]

    @staticmethod
    def percentile(values: list[float], share: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")

    def summary(self) -> str:
        p = self.percentile
        return (f"light p50/p99 alone {p(self.light_alone_s, .5) * 1e3:.0f}/{p(self.light_alone_s, .99) * 1e3:.0f} ms, "
                f"beside heavy requests {p(self.light_mixed_s, .5) * 1e3:.0f}/"
                f"{p(self.light_mixed_s, .99) * 1e3:.0f} ms "
                f"({p(self.light_mixed_s, .99) / p(self.light_alone_s, .99):.1f}x); heavy requests took "
                f"{p(self.heavy_s, .5):.1f} s (median), statuses {self.heavy_statuses}; light errors: "
                f"{len(self.light_errors)}")


async def _timed(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str, float]:
    started = time.perf_counter()
    status, text = await _post(session, url, body)
    return status, text, time.perf_counter() - started


async def _mixed(url: str, light: list[bytes], heavy: list[bytes], light_requests: int, light_clients: int,
                 heavy_clients: int) -> MixedReport:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=light_clients + heavy_clients),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        alone = [(await _timed(session, url, body))[2] for body in light * max(1, 50 // len(light))]
        report = MixedReport(alone, [], [], [], {})
        done = asyncio.Event()

        async def heavy_client(index: int) -> None:
            while not done.is_set():
                status, _, seconds = await _timed(session, url, heavy[index % len(heavy)])
                report.heavy_statuses[status] = report.heavy_statuses.get(status, 0) + 1
                if status == 200:
                    report.heavy_s.append(seconds)

        async def light_client(share: int) -> None:
            for i in range(share):
                status, text, seconds = await _timed(session, url, light[i % len(light)])
                if status != 200:
                    report.light_errors.append(f"HTTP {status}: {text[:200]}")
                report.light_mixed_s.append(seconds)

        heavies = [asyncio.create_task(heavy_client(i)) for i in range(heavy_clients)]
        await asyncio.sleep(1.0)  # the heavy requests are under way before the light ones come
        await asyncio.gather(*(light_client(light_requests // light_clients) for _ in range(light_clients)))
        done.set()
        await asyncio.gather(*heavies)
        return report


def run_mixed(url: str, light: list[bytes], heavy: list[bytes], light_requests: int = 2_000, light_clients: int = 4,
              heavy_clients: int = 8) -> MixedReport:
    """Light requests from ``light_clients`` while ``heavy_clients`` keep sending heavy ones; the
    light ones are also timed alone first, in the same run, as the baseline."""
    return asyncio.run(_mixed(url, light, heavy, light_requests, light_clients, heavy_clients))


def image_bodies(rows_per_heavy: int = 100, tta: int = 64) -> tuple[list[bytes], list[bytes]]:
    """Light (one image) and heavy (``rows_per_heavy`` images x ``tta`` crops) requests for the
    image example."""
    import base64
    import io

    from PIL import Image

    def png(shade: int) -> str:
        buffer = io.BytesIO()
        Image.new("L", (40, 40), shade).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    light = [json.dumps({"dataframe_records": [{"image": png(s)}]}).encode() for s in (0, 90, 180, 255)]
    heavy = [json.dumps({"dataframe_records": [{"image": png(s % 256)} for s in range(rows_per_heavy)],
                         "params": {"tta": tta}}).encode()]
    return light, heavy


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
    parser.add_argument("--mixed-images", action="store_true", help="heavy and light requests to the image example")
    args = parser.parse_args()
    if args.mixed_images:
        light, heavy = image_bodies()
        print(run_mixed(args.url, light, heavy, light_requests=args.requests).summary())
        return
    from benchmarks.models import texts

    bodies = [json.dumps({"inputs": [t]}).encode() for t in texts(200, seed=11)]
    report = run_load(args.url, bodies, args.requests, args.clients, args.pgid)
    print(f"{report.requests} requests at {args.clients} clients: {len(report.errors)} errors, "
          f"{report.mismatches} answers unlike the sequential ones, resident memory "
          f"{report.rss_after_warmup / 2**20:.0f} -> {report.rss_after / 2**20:.0f} MiB ({report.rss_growth:+.1%})")


if __name__ == "__main__":
    main()
