"""Pushgateway pushes run off the training thread (issue #30): a gateway that accepts connections and never
answers must not block ``optimizer.step()``, and ``close()`` waits for the final push only a bounded time."""

from __future__ import annotations

import itertools
import socket
import time
import warnings

import torch

import gradwatch
from gradwatch.sinks.prometheus import PrometheusSink
from tests.tiny_gru import SeqModel


def test_an_unanswering_pushgateway_never_blocks_the_training_step() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does), never reads nor answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        model = SeqModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        sink = PrometheusSink(None, push_gateway=f"http://127.0.0.1:{port}", run_id="silent", timeout=2.0)
        ticks = itertools.count()
        sink._clock = lambda: 1000.0 * next(ticks)  # every back-off has passed: each flush asks for a push
        monitor = gradwatch.watch(model, optimizer, every=1, background=False, sinks=[sink])
        durations = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the push failures' one warning
            for _ in range(6):
                optimizer.zero_grad()
                model(torch.randn(6, 2, 3)).pow(2).mean().backward()
                started = time.perf_counter()
                optimizer.step()  # measures, writes, flushes: each flush asks for a push
                durations.append(time.perf_counter() - started)
            started = time.perf_counter()
            monitor.close()
            closing = time.perf_counter() - started
    # Before: every step waited for the push timeout (2 s). Measured steps of this model take milliseconds.
    assert max(durations) < 1.0, durations
    assert closing < sink.timeout + 2.0, closing  # the final push is waited for a bounded time
    assert sink.push_attempts >= 1
