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
    with torch.inference_mode():  # as the operations run every job
        assert torch.equal(wrapped(big), big + 1) and torch.equal(wrapped(other), other + 1)
    assert compiled == [(4, 4)] and eager == [(3, 3)]


def test_outside_inference_mode_calls_run_eagerly():
    # The compile was made under inference mode; Dynamo would compile again for other calls.
    eager, compiled = [], []
    wrapped = ShapeCompiled(lambda t: eager.append(1) or t)
    x = torch.zeros(2)
    with torch.inference_mode():
        wrapped(x)
    wrapped.adopt(lambda t: compiled.append(1) or t)
    compiled.clear()
    with torch.no_grad():
        wrapped(x)
    assert not compiled
    with torch.inference_mode():
        wrapped(x)
    assert compiled


def test_a_part_that_fails_to_compile_stays_eager_and_stores_nothing(monkeypatch, caplog):
    from image.operations.tuning import compile_parts

    def broken(*args, **kwargs):
        raise RuntimeError("Inductor could not")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    failing, fine = ShapeCompiled(lambda t: t + 1), ShapeCompiled(lambda t: t * 2)
    failing(torch.ones(2)), fine(torch.ones(3))

    class Session:
        discarded = False

        def discard(self):
            self.discarded = True

    session = Session()
    assert compile_parts([("decoder", failing), ("encoder", fine)], Lock(), session) == []
    assert session.discarded and "VAE decoder: compiling failed, staying eager" in caplog.text
    assert failing.compiled_shapes == 0 and torch.equal(failing(torch.ones(2)), torch.full((2,), 2.0))
