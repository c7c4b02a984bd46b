"""Scenarios 5 and 6: a disconnect storm of 500 clients, and overload at 10x capacity.

After the storm nothing may be left behind: the engines idle within 3 s, no
lease running or pending in the scheduler's view, the frontend's streams at 0,
and the services' file descriptors and resident memory back where they were.
Under 10x overload the mesh answers only 200 or 429, keeps its memory bounded,
and serves the next request at once.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.fixtures.mesh import Mesh
from tests.fixtures.scheduler import list_workers
from tests.frontend.sse import metric_value, scrape, wait_for
from tests.reliability.helpers import tree_fds, tree_rss

STORM = 500


def _engines_running(mesh: Mesh) -> float:
    return sum(metric_value(scrape(w.metrics_port), "vllm:num_requests_running") for w in mesh.workers)


def _leases(mesh: Mesh) -> int:
    return sum(w.pending_leases + len(w.load.leases_active) for w in list_workers(mesh.scheduler.address))


def _services(mesh: Mesh) -> dict[str, int]:
    return {p.name.split("-")[0] + str(i): p.pid for i, p in enumerate([mesh.frontend, mesh.scheduler, *mesh.workers])}


async def _storm(mesh: Mesh, clients: int) -> float:
    """`clients` streams that each read their first token and then hang up; returns when they began to."""
    body = {"model": mesh.model, "prompt": "A story that never ends", "max_tokens": 3000, "stream": True}
    started = asyncio.Event()
    got_first = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal got_first
        async with client.stream("POST", "/v1/completions", json={**body, "seed": i}) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    got_first += 1
                    break
            await started.wait()  # hang up together, mid-stream

    async with httpx.AsyncClient(base_url=mesh.url, timeout=120,
                                 limits=httpx.Limits(max_connections=clients + 10)) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(clients)]
        deadline = time.monotonic() + 90
        while got_first < clients:
            assert time.monotonic() < deadline, f"only {got_first} of {clients} streams started"
            if any(t.done() and t.exception() for t in tasks):
                break
            await asyncio.sleep(0.05)
        hung_up = time.monotonic()
        started.set()
        await asyncio.gather(*tasks)
    return hung_up


async def test_disconnect_storm_of_500_clients_leaves_nothing_behind(sim_mesh_factory, report) -> None:
    mesh = sim_mesh_factory(workers=2, sim_ttft_ms=5, sim_itl_ms=50, max_num_seqs=512,
                            scheduler={"max_queue": 1024})
    procs = _services(mesh)
    # A first storm of the same size warms up every allocator and connection pool.
    await _storm(mesh, STORM)
    await asyncio.to_thread(wait_for, lambda: _engines_running(mesh) == 0, 3.0)
    await asyncio.to_thread(wait_for, lambda: _leases(mesh) == 0, 3.0)
    fds_before = {name: tree_fds(pid) for name, pid in procs.items()}
    rss_before = {name: tree_rss(pid) for name, pid in procs.items()}

    hung_up = await _storm(mesh, STORM)
    idle_after = await asyncio.to_thread(wait_for, lambda: _engines_running(mesh) == 0, 3.0)
    idle_s = time.monotonic() - hung_up
    leases_s = await asyncio.to_thread(wait_for, lambda: _leases(mesh) == 0, 3.0)
    frontend_metrics = httpx.get(mesh.url + "/metrics").text
    # Descriptors are closed as the connections wind down; give them the same 3 s.
    await asyncio.to_thread(wait_for, lambda: all(
        tree_fds(pid) <= fds_before[name] + 8 for name, pid in procs.items()), 3.0)
    fds_after = {name: tree_fds(pid) for name, pid in procs.items()}
    rss_after = {name: tree_rss(pid) for name, pid in procs.items()}
    growth = {name: (rss_after[name] - rss_before[name]) / rss_before[name] for name in procs}
    report("disconnect-storm", clients=STORM, engine_idle_s=idle_s, leases_clear_s=leases_s,
           fds_before=fds_before, fds_after=fds_after,
           rss_growth_pct={k: round(v * 100, 1) for k, v in growth.items()},
           rss_after_mb={k: v >> 20 for k, v in rss_after.items()})
    assert idle_after < 3.0 and idle_s < 3.5
    assert metric_value(frontend_metrics, "infermesh_active_streams") == 0
    assert all(g < 0.10 for g in growth.values()), growth
    after = httpx.post(mesh.url + "/v1/completions", json={"model": mesh.model, "prompt": "x", "max_tokens": 2},
                       timeout=10)
    assert after.status_code == 200


async def test_overload_at_10x_capacity_only_200_and_429_and_recovers_at_once(sim_mesh_factory, report) -> None:
    seqs, queue = 8, 16
    capacity = 2 * seqs + queue
    mesh = sim_mesh_factory(workers=2, sim_ttft_ms=5, sim_itl_ms=10, max_num_seqs=seqs,
                            scheduler={"max_queue": queue})
    procs = _services(mesh)
    body = {"model": mesh.model, "prompt": "Overload", "max_tokens": 20}
    codes: dict[int, int] = {}
    rss: list[dict[str, int]] = []
    waves = 4
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60,
                                 limits=httpx.Limits(max_connections=10 * capacity + 10)) as client:
        for _ in range(waves):
            replies = await asyncio.gather(*(client.post("/v1/completions", json={**body, "seed": i})
                                             for i in range(10 * capacity)))
            for reply in replies:
                codes[reply.status_code] = codes.get(reply.status_code, 0) + 1
                if reply.status_code == 429:
                    assert reply.json()["error"]["type"] == "rate_limit_error"
                    assert int(reply.headers["retry-after"]) >= 1
            rss.append({name: tree_rss(pid) for name, pid in procs.items()})
        took = time.monotonic() - started
        recovery_started = time.monotonic()
        after = await client.post("/v1/completions", json=body)
        recovery = time.monotonic() - recovery_started
    alive = [p.proc.poll() is None for p in [mesh.frontend, mesh.scheduler, *mesh.workers]]
    growth = {name: (rss[-1][name] - rss[1][name]) / rss[1][name] for name in procs}
    report("overload-10x", capacity=capacity, requests=waves * 10 * capacity, codes=codes, seconds=took,
           next_request_s=recovery, rss_growth_after_wave2_pct={k: round(v * 100, 1) for k, v in growth.items()})
    assert set(codes) <= {200, 429}, codes
    assert codes.get(200, 0) >= capacity and codes.get(429, 0) > 0
    assert all(alive)
    assert after.status_code == 200 and recovery < 1.0
    assert all(g < 0.10 for g in growth.values()), growth
