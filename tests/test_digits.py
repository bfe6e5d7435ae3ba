"""The embedded default model is what the README says it is."""

import torch

from amp_deploy.data import digits_images, digits_split
from amp_deploy.digits import shift as _shift


def test_embedded_weights_reach_96_percent_on_the_test_split(digits_model):
    images, labels = digits_images()
    _, test = digits_split()
    x = torch.stack([digits_model.transform(images[i]) for i in test])
    with torch.no_grad():
        acc = (digits_model.model(x).argmax(-1) == torch.as_tensor(labels[test])).float().mean().item()
    assert acc >= 0.96
    assert digits_model.input_size == (3, 8, 8) and x.shape[1:] == (3, 8, 8)


def test_split_is_fixed_and_disjoint():
    train, test = digits_split()
    assert len(test) == 360 and len(set(train) | set(test)) == 1797
    assert (digits_split()[1] == test).all()


def test_shift_moves_by_at_most_one_pixel():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1
    y = _shift(x, torch.Generator().manual_seed(0))
    pos = y[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert ((rows - 4).abs() <= 1).all() and ((cols - 4).abs() <= 1).all() and len(set(pos.tolist())) > 1
