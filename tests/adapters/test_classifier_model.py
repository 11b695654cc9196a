import dataclasses

import pytest
import torch
import torch.nn.functional as F

from adapters.base import Forget
from adapters.classifier import model as classifier
from adapters.classifier.model import MaxPool2x2


@pytest.mark.parametrize("shape", [(5, 6, 8, 8), (3, 16, 7, 9), (2, 1, 28, 28)])
def test_max_pool_matches_torch_in_inference_and_in_training(shape):
    x = torch.randn(*shape)
    pool = MaxPool2x2()
    with torch.no_grad():  # the strided path (inference, IAU's trial steps)
        torch.testing.assert_close(pool(x), F.max_pool2d(x, 2), rtol=0, atol=0)
    # training: torch's kernel, so the gradient (one input per window, ties included) is torch's own
    ours, theirs = x.clone().relu().requires_grad_(), x.clone().relu().requires_grad_()
    pool(ours).sum().backward()
    F.max_pool2d(theirs, 2).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)


def test_cnn_weights_keep_their_names_and_logits_agree_with_and_without_autograd(digits_split):
    spec = {"arch": "cnn", "input_shape": list(digits_split.input_shape), "num_classes": 10, "init_seed": 0}
    model = classifier.build(spec).eval()
    assert sorted(model.state_dict()) == ["features.0.bias", "features.0.weight", "features.3.bias",
                                          "features.3.weight", "head.1.bias", "head.1.weight", "head.3.bias",
                                          "head.3.weight", "head.5.bias", "head.5.weight"]
    x = digits_split.test.x[:64]
    with torch.no_grad():
        inference = model(x)
    torch.testing.assert_close(model(x), inference, rtol=0, atol=0)


def test_the_remaining_rows_are_selected_without_a_copy_and_sample_as_the_copied_rows_would(digits_target):
    target = dataclasses.replace(digits_target, forgotten=frozenset({0, 5, 9}))
    forget_rows, remaining, _ = target.split(Forget(sample_ids=(1, 2, 5)))
    copied = target.data.train.without_ids([0, 5, 9, 1, 2])  # what a split copied out before
    assert len(remaining) == len(copied) == len(target.data.train) - 5
    assert remaining._rows is None  # nothing copied until the rows are read whole
    for n, seed in ((100, 0), (100, 3), (10_000, 0)):
        ours, theirs = remaining.sample(n, seed=seed), copied.sample(n, seed=seed)
        assert torch.equal(ours.ids, theirs.ids) and torch.equal(ours.x, theirs.x) and torch.equal(ours.y, theirs.y)
    assert torch.equal(remaining.rows().ids, copied.ids) and remaining.rows() is remaining.rows()
    assert torch.equal(forget_rows.ids, torch.tensor([1, 2]))
