"""The running catalog and its reload: an invalid file keeps the old catalog, listeners, the watch, SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from infermesh.common.catalog import Catalog, CatalogError, CatalogHolder

SMOL = "SmolLM2-135M-Instruct"


def _write(path: Path, text: str) -> None:
    path.write_text(text)


VALID = f"models:\n  - name: m\n    weights: {{prepared: {SMOL}}}\n"


def test_reload_keeps_the_old_catalog_on_an_invalid_file_and_takes_a_valid_one(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    _write(path, VALID)
    holder = CatalogHolder.open(path)
    first = holder.current
    seen: list[Catalog] = []
    holder.add_listener(seen.append)

    _write(path, VALID + "    workers: lots\n")
    result = holder.reload()
    assert result.error is not None and not result.changed
    assert str(result.error) == f"{path}:4: models[0].workers: expected an integer, got 'lots'"
    assert holder.current is first and result.catalog is first and seen == []

    _write(path, VALID + "    aliases: [mm]\n")
    result = holder.reload()
    assert result.error is None and result.changed
    assert holder.current is result.catalog and holder.current.resolve("mm").name == "m"
    assert seen == [holder.current]

    assert holder.reload() == type(result)(holder.current)  # same bytes: nothing changes, nobody called
    assert len(seen) == 1

    path.unlink()
    result = holder.reload()
    assert result.error is not None and "cannot read the catalog" in str(result.error)
    assert holder.current is seen[0]


def test_listeners_can_be_removed_and_one_failing_does_not_stop_the_others(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    _write(path, VALID)
    holder = CatalogHolder.open(path)
    calls: list[str] = []

    def broken(_: Catalog) -> None:
        raise RuntimeError("listener bug")

    holder.add_listener(broken)
    remove = holder.add_listener(lambda c: calls.append("a"))
    holder.add_listener(lambda c: calls.append("b"))
    _write(path, VALID + "    tier: premium\n")
    assert holder.reload().changed and calls == ["a", "b"]
    remove()
    _write(path, VALID)
    assert holder.reload().changed and calls == ["a", "b", "b"]


def test_a_holder_without_a_file_serves_the_default() -> None:
    holder = CatalogHolder.open(None)
    assert holder.current.served_names() == (SMOL,)
    assert holder.reload().catalog is holder.current
    with pytest.raises(CatalogError):
        CatalogHolder.open("/nonexistent/catalog.yaml")


async def test_the_watch_notices_a_change_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    _write(path, VALID)
    holder = CatalogHolder.open(path)
    changed = asyncio.Event()
    holder.add_listener(lambda c: changed.set())
    task = holder.start_watch(interval=0.01)
    try:
        _write(path, VALID + "    workers: -1\n")  # refused: the watch keeps going and the old one stays
        _write(path, VALID + "    aliases: [renamed]\n")
        await asyncio.wait_for(changed.wait(), timeout=10)
        assert holder.current.resolve("renamed").name == "m"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_invalid_change_is_refused_once_and_the_running_catalog_stays(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    _write(path, VALID)
    holder = CatalogHolder.open(path)
    first = holder.current
    _write(path, VALID + "    workers: -1\n")
    result = await holder.check_once()
    assert result is not None and result.error is not None
    assert str(result.error) == f"{path}:4: models[0].workers: must be within 0..64, got -1"
    assert await holder.check_once() is None  # nothing changed since
    os.utime(path, ns=(1, 1))  # touched, same bytes: still refused once only
    result = await holder.check_once()
    assert result is not None and result.error is None and holder.current is first


async def test_sighup_reloads(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    _write(path, VALID)
    holder = CatalogHolder.open(path)
    changed = asyncio.Event()
    holder.add_listener(lambda c: changed.set())
    remove = holder.install_sighup()
    try:
        _write(path, VALID + "    aliases: [hup]\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(changed.wait(), timeout=10)
        assert holder.current.resolve("hup").name == "m"
    finally:
        remove()


