import math

import pytest
import torch

from ifadapter import Instance, Layout, LayoutTensors


@pytest.mark.parametrize(
    ("box", "fault"),
    [
        ((-0.1, 0.0, 0.5, 0.5), "outside [0, 1]"),
        ((0.0, 0.0, 1.2, 0.5), "outside [0, 1]"),
        ((0.6, 0.1, 0.5, 0.5), "inverted or has zero area"),
        ((0.1, 0.3, 0.5, 0.3), "inverted or has zero area"),
        ((0.1, math.nan, 0.5, 0.5), "NaN"),
        ((0.1, 0.1, 0.5), "4 numbers"),
        ("0 0 1 1", "4 numbers"),
        ((0.1, "a", 0.5, 0.5), "4 numbers"),
    ],
)
def test_bad_boxes_name_instance_and_fault(box, fault):
    good = {"box": (0.0, 0.0, 0.5, 0.5), "caption": "a cat"}
    with pytest.raises(
        ValueError, match=r"instance 1: .*" + fault.replace("[", r"\[").replace("]", r"\]")
    ):
        Layout("two things", [good, {"box": box, "caption": "a dog"}])


@pytest.mark.parametrize(
    ("caption", "fault"),
    [("", "empty"), ("   ", "empty"), (None, "must be text"), (3, "must be text")],
)
def test_bad_descriptions(caption, fault):
    with pytest.raises(ValueError, match=f"instance 0: caption.*{fault}"):
        Layout("x", [{"box": (0.0, 0.0, 1.0, 1.0), "caption": caption}])


def test_bad_layout_shapes():
    with pytest.raises(ValueError, match="must be text"):
        Layout(None, [])
    with pytest.raises(ValueError, match="must be a list"):
        Layout("x", "a cat")
    with pytest.raises(ValueError, match="instance 0: expected an Instance"):
        Layout("x", [("box", "caption")])
    with pytest.raises(ValueError, match="'caption'"):
        Layout.from_dict({"instances": []})


def test_round_trip_and_any_number_of_instances():
    instances = [Instance((i / 200, 0.0, i / 200 + 0.5, 0.5), f"thing {i}") for i in range(100)]
    layout = Layout("many", instances)
    assert Layout.from_dict(layout.to_dict()) == layout
    assert Layout("", []).instances == []


def test_layout_tensors_pad_and_mask():
    a = Layout("a", [Instance((0.0, 0.0, 0.5, 0.5), "x")])
    b = Layout("b", [Instance((0.1, 0.1, 0.2, 0.2), "y"), Instance((0.5, 0.5, 1.0, 1.0), "z")])
    tensors = LayoutTensors.from_layouts([a, b])
    assert tensors.boxes.shape == (2, 2, 4)
    assert tensors.mask.tolist() == [[True, False], [True, True]]
    assert torch.equal(tensors.boxes[0, 1], torch.zeros(4))
    assert tensors.captions == [["x"], ["y", "z"]]
