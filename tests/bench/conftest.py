"""Fixtures of the bench tests."""

from __future__ import annotations

import types

import pytest
import torch


@pytest.fixture
def captured_compile(monkeypatch):
    """torch.compile without Inductor (minutes on a CPU): every graph Dynamo captures is kept
    (`.graphs`) and run as captured, each call counted (`.calls`)."""
    seen = types.SimpleNamespace(graphs=[], calls=[])

    def backend(graph, example_inputs):
        seen.graphs.append(graph)
        return lambda *args: seen.calls.append(graph) or graph.forward(*args)

    compile_function = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *args, mode=None, **kwargs: compile_function(
        fn, *args, backend=backend, **kwargs))
    return seen
