"""fastcnn.common: the helpers every layer shares compute what torch would."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastcnn.common.plans import plan_key
from fastcnn.common.shapes import strides_of


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_strides_of_are_the_strides_torch_gives(memory_format):
    for shape in itertools.product([0, 1, 3], [1, 4], [0, 1, 5], [1, 2, 7]):
        expected = torch.empty(shape, memory_format=memory_format).stride()
        assert strides_of(shape, memory_format) == expected, shape
    for shape in [(3,), (2, 3), (2, 0, 5), (2, 3, 4, 5, 6)]:
        assert strides_of(shape) == torch.empty(shape).stride()


def test_plan_keys_tell_apart_every_tensor_property_and_attribute():
    x = torch.randn(2, 3, 4, 5)
    same = plan_key((x, None), "cpu", True)
    assert plan_key((x.clone(), None), "cpu", True) == same
    others = [
        plan_key((x.contiguous(memory_format=torch.channels_last), None), "cpu", True),
        plan_key((x.double(), None), "cpu", True),
        plan_key((x[:1], None), "cpu", True),
        plan_key((x, x), "cpu", True),
        plan_key((x, None), "eager", True),
        plan_key((x, None), "cpu", False),
    ]
    assert len({same, *others}) == len(others) + 1
