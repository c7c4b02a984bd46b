"""The port layouts of `infermesh up`: DESIGN.md's standard ports, and blocks."""

from __future__ import annotations

import socket

import pytest
from infermesh.supervisor.ports import PlanError, block_plan, plan, ports_in_use, standard_plan


def test_standard_ports_are_the_design_ones() -> None:
    p = standard_plan(workers=3, frontends=2)
    assert (p.edge, p.admin, p.tokenizer, p.tokenizer_metrics, p.scheduler, p.scheduler_metrics) == \
        (8080, 9901, 50051, 9101, 50052, 9102)
    assert [(f.http, f.grpc) for f in p.frontends] == [(8000, 50050), (8001, 50053)]
    assert [(w.grpc, w.metrics) for w in p.workers] == [(50060, 9110), (50061, 9111), (50062, 9112)]


@pytest.mark.parametrize("workers, frontends", [(1, 1), (2, 8), (40, 8)])
def test_no_port_is_used_twice(workers: int, frontends: int) -> None:
    for layout in (standard_plan(workers, frontends), block_plan(20000, workers, frontends)):
        ports = [port for _, port in layout.labelled()]
        assert len(ports) == len(set(ports)) == 6 + 2 * workers + 2 * frontends


def test_a_block_is_contiguous_from_its_base() -> None:
    p = block_plan(21000, workers=2, frontends=1)
    assert sorted(port for _, port in p.labelled()) == list(range(21000, 21000 + 12))
    assert not [label for label, _ in p.labelled(envoy=False) if label.startswith("Envoy")]


def test_layouts_that_do_not_fit_are_refused() -> None:
    with pytest.raises(PlanError, match="at most 8 frontends"):
        plan(workers=1, frontends=9)
    with pytest.raises(PlanError, match="at most 40 workers"):
        plan(workers=41, frontends=1)
    with pytest.raises(PlanError, match="within 1024-65535"):
        plan(workers=1, frontends=1, ports_from=65530)
    with pytest.raises(PlanError, match="at least 1"):
        plan(workers=0, frontends=1)
    assert len(plan(workers=50, frontends=20, ports_from=20000).workers) == 50


def test_ports_in_use_names_what_each_was_for() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert ports_in_use("127.0.0.1", [("x", taken)]) == [("x", taken)]
    assert ports_in_use("127.0.0.1", [("x", taken)]) == []
