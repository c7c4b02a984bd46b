"""CPU placement: core lists, the plan `infermesh up` makes, pinning a process tree, the exec wrapper."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from infermesh.common import cpus


@pytest.mark.parametrize(("text", "expected"), [("0", {0}), ("0,2-3", {0, 2, 3}), (" 1 , 4-5 ", {1, 4, 5}),
                                                ("3-3", {3})])
def test_parse_and_back(text: str, expected: set[int]) -> None:
    assert cpus.parse(text) == expected
    assert cpus.parse(cpus.to_text(expected)) == expected


def test_to_text_merges_runs() -> None:
    assert cpus.to_text({5, 0, 1, 2, 7, 8}) == "0-2,5,7-8"
    assert cpus.to_text([]) == ""


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "-1", ",", "1;2"])
def test_bad_lists_are_refused(text: str) -> None:
    with pytest.raises(cpus.CpuListError):
        cpus.parse(text)


def test_check_names_cores_that_are_not_here() -> None:
    assert cpus.check(cpus.allowed()) is None
    problem = cpus.check({max(cpus.allowed()) + 1000})
    assert problem is not None and "not available" in problem


@pytest.mark.parametrize(("workers", "cores", "model", "serving"), [
    (1, [0, 1], [{0}], {1}),                       # vLLM's own default on 2 cores
    (2, [0, 1], [{0}, {1}], None),                 # no core to spare: nothing reserved
    (3, [0, 1], [{0}, {1}, {0}], None),
    (1, range(16), [set(range(14))], {14, 15}),    # one core in eight kept for serving
    (2, range(8), [{0, 1, 2, 3}, {4, 5, 6}], {7}),
    (3, [2, 3, 5, 7], [{2}, {3}, {5}], {7}),
    (4, range(6), [{0, 1}, {2}, {3}, {4}], {5}),
])
def test_plan(workers: int, cores: object, model: list[set[int]], serving: set[int] | None) -> None:
    p = cpus.plan(workers, cores)  # type: ignore[arg-type]
    assert p.workers == model and p.serving == serving
    for i, group in enumerate(p.workers):
        assert group and not (serving and group & serving)
        if len(list(cores)) > workers:  # type: ignore[arg-type]
            assert all(not (group & other) for other in p.workers[i + 1:])


def test_plan_of_nothing() -> None:
    assert cpus.plan(0, [0, 1]) == cpus.Plan([], None)


# A process whose child binds itself narrowly, the way vLLM binds its model process.
_TREE = textwrap.dedent("""
    import os, subprocess, sys, time
    from infermesh.common import cpus
    model = {min(cpus.allowed())}
    child = subprocess.Popen([sys.executable, "-c",
        "import os, sys, time; os.sched_setaffinity(0, %r); print('ok', flush=True); time.sleep(60)" % (model,)],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ok"
    floating = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    placed = cpus.pin_tree()
    print(placed.model if placed else None, placed.serving if placed else None)
    print(os.sched_getaffinity(0), os.sched_getaffinity(child.pid), os.sched_getaffinity(floating.pid))
    child.kill(); floating.kill()
""")


def test_pin_tree_moves_the_process_and_its_unbound_children_off_the_bound_cores() -> None:
    out = subprocess.run([sys.executable, "-c", _TREE], capture_output=True, text=True, timeout=60, check=True)
    placed, affinities = out.stdout.strip().splitlines()
    model = {min(cpus.allowed())}
    rest = cpus.allowed() - model
    if not rest:  # a single core: nothing to move to
        assert placed == "None None"
        return
    assert placed == f"{model} {rest}"
    assert affinities == f"{rest} {model} {rest}"


def test_pin_tree_does_nothing_when_no_child_is_bound() -> None:
    code = "from infermesh.common import cpus; import os; print(cpus.pin_tree(), os.sched_getaffinity(0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"None {cpus.allowed()}"


def test_the_wrapper_runs_the_command_on_the_cores() -> None:
    core = max(cpus.allowed())
    out = subprocess.run([sys.executable, "-m", "infermesh.common.cpus", "--cpus", str(core), "--", sys.executable,
                          "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[{core}]"


@pytest.mark.parametrize(("args", "message"), [
    (["--cpus", "x", "--", "true"], "not a CPU list"),
    (["--cpus", "100000", "--", "true"], "not available"),
    (["--cpus", "0"], "usage"),
])
def test_the_wrapper_refuses_bad_use(args: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "infermesh.common.cpus", *args], capture_output=True, text=True,
                         timeout=60, env={**os.environ})
    assert out.returncode == 2 and message in out.stderr
