"""Shared piece of the k8s policy tests: break a rendered overlay on purpose and check that the rule for it fires."""
from __future__ import annotations

from collections.abc import Callable

from app.k8s import policy
from app.k8s.render import RenderParams, render


def assert_rule_catches(overlay: str, config_file: str, mutate: Callable[[list[dict]], object], expected: str) -> None:
    """Render `overlay`, apply `mutate` to its objects, and assert that one of policy.problems names `expected`."""
    objects = render(RenderParams(overlay=overlay, config=config_file))
    mutate(objects)
    found = policy.problems(objects)
    assert any(expected in p for p in found), found
