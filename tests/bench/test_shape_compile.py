"""image/operations/shape_compile.py: which calls take the compiled function (compile_vae)."""

from __future__ import annotations

from threading import Lock

import torch

from image.operations.shape_compile import ShapeCompiled, signature


def test_signature_keys_what_a_fixed_shape_compile_guards_on():
    x = torch.zeros(1, 4, 8, 8)
    assert signature((x,), {}) == signature((torch.ones(1, 4, 8, 8),), {})
    assert signature((x,), {}) != signature((x.to(memory_format=torch.channels_last),), {})  # strides
    assert signature((x,), {}) != signature((x.half(),), {})
    assert signature((x,), {"flag": True}) != signature((x,), {"flag": False})
    assert signature((x, object()), {}) is None  # not keyable: always eager, never recorded


def test_only_recorded_signatures_run_compiled():
    eager, compiled = [], []
    wrapped = ShapeCompiled(lambda t: eager.append(t.shape) or t + 1, max_shapes=2)
    small, big, other = torch.zeros(2, 2), torch.zeros(4, 4), torch.zeros(3, 3)
    wrapped(small)
    wrapped(small)  # recorded once
    wrapped(big)
    wrapped(other)  # over max_shapes: not recorded
    assert len(wrapped.examples) == 2
    assert wrapped.adopt(lambda t: compiled.append(t.shape) or t + 1, Lock()) == 2
    assert compiled == [(2, 2), (4, 4)] and wrapped.compiled_shapes == 2  # compiled once each
    assert not wrapped.recording and not wrapped.examples
    eager.clear(), compiled.clear()
    assert torch.equal(wrapped(big), big + 1) and torch.equal(wrapped(other), other + 1)
    assert compiled == [(4, 4)] and eager == [(3, 3)]
