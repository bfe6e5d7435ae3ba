"""AMP's two steps on hand-built models whose answers are known."""

import copy

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from amp_deploy.data import Split
from amp_deploy.prune.families import Loaded, find_sites
from amp_deploy.prune.score import entropy, loss_fn, taylor_scores
from amp_deploy.prune.search import adaptive_widths, uniform_widths, width_grid


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.mlp = Mlp(d, h)

    def forward(self, x):
        return x + self.mlp(x)


class TokenNet(nn.Module):
    """Tokens in, logits out: a stack of residual MLP blocks and a linear head on the mean token."""

    def __init__(self, d=8, h=16, depth=3, classes=5) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d, h) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def _loaded(net: nn.Module) -> Loaded:
    path, sites = find_sites(net)
    return Loaded(net.eval(), path, sites, "logits", transform=None, input_size=(4, 8, 1))


def test_taylor_scores_equal_a_times_grad_by_hand():
    net = TokenNet()
    with torch.no_grad():  # neuron 3 of block 1 reaches nothing; neuron 5 of block 0 never fires
        net.blocks[1].mlp.fc2.weight[:, 3] = 0
        net.blocks[0].mlp.fc1.weight[5] = 0
        net.blocks[0].mlp.fc1.bias[5] = 0
    batches = [(torch.randn(6, 4, 8), None), (torch.randn(6, 4, 8), None)]
    got = taylor_scores(_loaded(net), batches, loss_fn("entropy", "logits", 15.0), torch.device("cpu"))

    expect_abs = torch.zeros(3, 16)
    expect_signed = torch.zeros(3, 16)
    for x, _ in batches:
        acts, h = [], x
        for blk in net.blocks:
            a = blk.mlp.act(blk.mlp.fc1(h))
            acts.append(a)
            h = h + blk.mlp.fc2(a)
        loss = entropy(net.head(h.mean(1)), "logits", 15.0).mean()
        grads = torch.autograd.grad(loss, acts)
        for i, (a, g) in enumerate(zip(acts, grads)):
            expect_abs[i] += (a * g).abs().mean((0, 1)) / len(batches)
            expect_signed[i] += (a * g).mean((0, 1)) / len(batches)

    assert [s.shape for s in got["abs"]] == [torch.Size([16])] * 3
    torch.testing.assert_close(torch.stack(got["abs"]), expect_abs)
    torch.testing.assert_close(torch.stack(got["signed"]), expect_signed)
    assert all((s >= 0).all() for s in got["abs"])
    assert (torch.stack(got["signed"]) < 0).any()  # signed scores really keep their sign
    assert got["abs"][1][3] == 0 and got["abs"][0][5] == 0
    assert not any(p.requires_grad is False for p in net.parameters())  # frozen only while scoring


def _known_answer_net(keep: list[int]) -> TokenNet:
    """Block i uses only its first keep[i] hidden neurons: the others have zero fc2 columns."""
    net = TokenNet(depth=len(keep))
    with torch.no_grad():
        for blk, k in zip(net.blocks, keep):
            blk.mlp.fc2.weight[:, k:] = 0
    return net


@pytest.mark.parametrize("cached", [True, False])
def test_binary_search_finds_the_known_widths(cached):
    keep = [3, 9, 5]
    net = _known_answer_net(keep)
    x = torch.randn(32, 4, 8)
    with torch.no_grad():
        target = net(x)

    def mse(out, labels):  # zero for the whole model; grows as soon as a used neuron goes
        return ((out - target[: len(out)]) ** 2).sum(-1)

    scores = [torch.linspace(1, 0, 16) for _ in keep]  # neurons ranked in index order
    loaded = _loaded(net)
    res = adaptive_widths(loaded, scores, Split(x, None), batch_size=32, loss=mse, threshold=1e-10, steps=8, align=1,
                          device=torch.device("cpu"), cached=cached)
    assert res.widths == keep
    assert loaded.widths() == keep  # the model is pruned in place
    with torch.no_grad():
        torch.testing.assert_close(net(x), target, atol=1e-6, rtol=0)


def test_cached_search_equals_naive_and_runs_fewer_blocks():
    net = TokenNet(depth=6, h=32)
    val = Split(torch.randn(40, 4, 8), None)
    scores = [torch.rand(32) for _ in range(6)]
    loss = loss_fn("entropy", "logits", 15.0)
    runs = {}
    for cached in (True, False):
        loaded = _loaded(copy.deepcopy(net))
        runs[cached] = adaptive_widths(loaded, scores, val, batch_size=16, loss=loss, threshold=0.02, cached=cached)
    assert runs[True].widths == runs[False].widths
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-6)
    steps = [len(s) for s in runs[True].steps]
    assert runs[True].block_forwards == 6 + sum(s * (6 - i) for i, s in enumerate(steps))
    assert runs[False].block_forwards == runs[True].block_forwards_naive == 6 + 6 * sum(steps)


def test_width_grid_and_uniform():
    assert width_grid(10, 4) == [4, 8, 10]
    assert width_grid(8, 1) == list(range(1, 9))
    assert uniform_widths([256, 100], 0.5, 64) == [128, 64]
    assert uniform_widths([256], 0.01, 64) == [64]  # never zero


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_activation_checkpointing_gives_the_same_scores(family):
    from amp_deploy.data import load_synthetic_data
    from amp_deploy.prune.families import load_model

    if family == "timm":
        loaded = load_model("timm", "test_vit", False, {"depth": 3, "img_size": 32, "num_classes": 10})
    else:
        loaded = load_model("open_clip", "ViT-B-32", False, {
            "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}})
    data = load_synthetic_data(calibration=8, validation=1, holdout=1, seed=0, transform=loaded.transform, size=loaded.input_size[1:])
    loss = loss_fn("entropy", loaded.output, 15.0)
    plain = taylor_scores(loaded, data.calibration.batches(4), loss, torch.device("cpu"))
    ckpt = taylor_scores(loaded, data.calibration.batches(4), loss, torch.device("cpu"), checkpointing=True)
    for key in ("abs", "signed"):
        torch.testing.assert_close(torch.cat(ckpt[key]), torch.cat(plain[key]), rtol=1e-5, atol=1e-9)
    assert all((s > 0).any() for s in plain["abs"])


def test_torchrun_launched_by_the_user_scores_and_a_later_build_skips_it(tmp_path):
    """The multi-node path on one node: the user's own torchrun (2 gloo processes) runs the score stage
    with --recipe; rank 0 records it, and `amp-deploy build` on the same folder skips it."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from .conftest import build, tiny_recipe

    recipe = tiny_recipe(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert build(recipe, "--out", one).exit_code == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "amp_deploy.build.launch", str(two), "cpu", "score", "--recipe", str(recipe), "prune.steps=3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = build(recipe, "--out", two)
    assert res.exit_code == 0 and "score: inputs unchanged, skipped" in res.output, res.output
    a, b = load_file(one / "scores.safetensors"), load_file(two / "scores.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-8)
