"""Batched fan-out: Ray returns exactly what the serial path returns, in order."""

from __future__ import annotations

import math

from agent.runtime.executor import map_batched


def test_ray_batches_return_the_serial_results_in_order():
    items = list(range(23))
    serial = map_batched(math.factorial, items, "serial")
    assert serial == [math.factorial(i) for i in items]
    assert map_batched(math.factorial, items, "ray", workers=2) == serial


def test_auto_keeps_a_handful_of_items_serial():
    import ray

    assert map_batched(math.sqrt, [1.0, 4.0], "auto") == [1.0, 2.0]
    assert not ray.is_initialized()
