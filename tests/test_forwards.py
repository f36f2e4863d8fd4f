"""`core.forwards.instance_forwards`: modules run the given forward while open, and get back
exactly the forward they had (none, or an instance one) on exit, also when nested or raising."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trimprune.core.forwards import instance_forwards


def test_forwards_are_set_and_restored_when_nested_and_on_error():
    a, b = nn.Identity(), nn.Identity()
    own = lambda x: x + 100  # noqa: E731 - b's own instance forward, kept across the contexts
    b.__dict__["forward"] = own
    x = torch.zeros(1)
    with instance_forwards([(a, lambda x: x + 1), (b, lambda x: x + 2)]):
        assert a(x).item() == 1 and b(x).item() == 2
        with instance_forwards([(a, lambda x: x + 3)]):
            assert a(x).item() == 3 and b(x).item() == 2
        assert a(x).item() == 1
    assert "forward" not in a.__dict__ and a(x).item() == 0
    assert b.__dict__["forward"] is own and b(x).item() == 100
    with pytest.raises(RuntimeError):
        with instance_forwards([(a, lambda x: x + 1)]):
            raise RuntimeError("inside")
    assert "forward" not in a.__dict__
