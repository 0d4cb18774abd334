"""A decision's writes in order, a pass's migration creates run side by side."""

from __future__ import annotations

from virtshift.k8s.actions import _batches


def test_consecutive_creates_form_one_batch_and_every_other_step_its_own() -> None:
    names = ["uncordon n1", "cordon n2", "create ns/a", "create ns/b", "create ns/c",
             "cancel ns/x", "create ns/d", "evict ns/p"]
    batches = _batches([(n, lambda: None) for n in names])
    assert [[what for what, _step in b] for b in batches] == [
        ["uncordon n1"], ["cordon n2"], ["create ns/a", "create ns/b", "create ns/c"],
        ["cancel ns/x"], ["create ns/d"], ["evict ns/p"]]
    assert _batches([]) == []
