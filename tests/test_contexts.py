"""A backend's execution contexts shared by concurrent runs: one run per context, made as
needed up to a bound, waited for beyond it, and every busy one reachable to cancel."""

from __future__ import annotations

import threading

import pytest

from agent.vision.backends.contexts import ContextPool


def test_a_context_is_made_only_when_every_one_made_is_busy():
    made: list[object] = []
    pool = ContextPool(lambda: made.append(object()) or made[-1])
    with pool.context() as first:
        assert pool.busy() == [first]
        with pool.context() as second:
            assert second is not first and len(made) == 2
    with pool.context() as again:  # idle ones are reused
        assert again in made and len(made) == 2
    assert pool.busy() == [] and len(pool.all()) == 2


def test_beyond_its_bound_a_run_waits_for_a_context_to_come_back():
    pool = ContextPool(ready=["core0", "core1"])
    got: list[str] = []

    def third_run():
        with pool.context() as context:
            got.append(context)

    with pool.context(), pool.context():
        waiting = threading.Thread(target=third_run)
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive() and not got  # both contexts are busy: it waits
    waiting.join(10)
    assert got and got[0] in ("core0", "core1") and pool.made == 2


def test_a_context_that_cannot_be_made_is_not_counted():
    calls = []

    def make():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device busy")
        return "request"

    pool = ContextPool(make, most=1)
    with pytest.raises(RuntimeError), pool.context():
        pass
    with pool.context() as context:  # the failed one left room for this
        assert context == "request"


def test_a_pool_with_nothing_to_run_on_is_refused():
    with pytest.raises(ValueError, match="needs contexts"):
        ContextPool()
