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

    expect = {k: torch.zeros(3, 16) for k in ("abs", "token", "signed")}
    for x, _ in batches:
        acts, h = [], x
        for blk in net.blocks:
            a = blk.mlp.act(blk.mlp.fc1(h))
            acts.append(a)
            h = h + blk.mlp.fc2(a)
        loss = entropy(15.0 * net.head(h.mean(1)), "predictions", 1.0).mean()
        grads = torch.autograd.grad(loss, acts)
        for i, (a, g) in enumerate(zip(acts, grads)):
            expect["abs"][i] += (a * g).sum(1).abs().mean(0) / len(batches)  # per image |token sum|
            expect["token"][i] += (a * g).abs().mean((0, 1)) / len(batches)
            expect["signed"][i] += (a * g).sum(1).mean(0) / len(batches)

    assert [s.shape for s in got["abs"]] == [torch.Size([16])] * 3
    for k, v in expect.items():
        torch.testing.assert_close(torch.stack(got[k]), v)
    assert all((s >= 0).all() for s in got["abs"])
    assert (torch.stack(got["signed"]) < 0).any()  # signed scores really keep their sign
    assert got["abs"][1][3] == 0 and got["abs"][0][5] == 0
    assert not any(p.requires_grad is False for p in net.parameters())  # frozen only while scoring


class EmbedNet(TokenNet):
    """Tokens in, an embedding out (the mean token): what DINOv2 and CLIP towers serve."""

    def forward(self, x):
        return self.blocks(x).mean(1)


def _reference_scores(net, batches, temp_inv):
    """The reference code's formula, written directly: hook fc2's input, image-image entropy of the
    L2-normalised features at inverse temperature temp_inv, s_j = |sum over tokens of a_j g_j| per
    image, averaged over the batch's images, summed over batches and divided by their number."""
    saved = []

    def keep(module, args, out):
        args[0].retain_grad()
        saved.append(args[0])

    hooks = [blk.mlp.fc2.register_forward_hook(keep) for blk in net.blocks]
    total = [torch.zeros(blk.mlp.fc2.in_features) for blk in net.blocks]
    for x, _ in batches:
        saved.clear()
        x = x.clone().requires_grad_(True)
        f = torch.nn.functional.normalize(net(x), dim=-1)
        p = torch.softmax(temp_inv * f @ f.T, dim=-1)
        (-(p * torch.log(p)).sum(-1)).mean().backward()
        for i, a in enumerate(saved):
            total[i] += (a * a.grad).sum(1).abs().mean(0)
    for h in hooks:
        h.remove()
    net.zero_grad()
    return [t / len(batches) for t in total]


def _reference_search(net, scores, x, temp_inv, threshold, steps):
    """The reference search, written directly on masks (zeroed fc1 rows and fc2 columns, the whole
    model every step): last block first, bisection over the width, accept a candidate when the
    validation entropy grew by at most `threshold` over the last accepted loss."""
    def val_loss():
        with torch.no_grad():
            f = torch.nn.functional.normalize(net(x), dim=-1)
            p = torch.softmax(temp_inv * f @ f.T, dim=-1)
            return float((-(p * torch.log(p)).sum(-1)).mean())

    def mask(i, w):
        mlp, orig = net.blocks[i].mlp, originals[i]
        keep = torch.zeros(len(scores[i]), dtype=torch.bool)
        keep[scores[i].argsort(descending=True)[:w]] = True
        with torch.no_grad():
            mlp.fc1.weight.copy_(orig[0] * keep[:, None])
            mlp.fc1.bias.copy_(orig[1] * keep)
            mlp.fc2.weight.copy_(orig[2] * keep[None, :])

    originals = [(b.mlp.fc1.weight.clone(), b.mlp.fc1.bias.clone(), b.mlp.fc2.weight.clone()) for b in net.blocks]
    prev, widths = val_loss(), []
    for i in reversed(range(len(net.blocks))):
        h = len(scores[i])
        left, right, best, best_loss = -1, h - 1, None, prev  # over widths 1..h (index k: width k + 1)
        for _ in range(steps):
            mid = (left + right) // 2
            if mid <= left:
                break
            mask(i, mid + 1)
            cand = val_loss()
            if cand - prev <= threshold:
                right, best, best_loss = mid, mid + 1, cand
            else:
                left = mid
        mask(i, best if best is not None else h)
        prev = best_loss
        widths.insert(0, best if best is not None else h)
    return widths


def test_scores_and_widths_equal_the_reference_formula():
    """Issue 18: our scores equal the reference formula to float precision, and the cached search
    with the reference's entropy level gives the reference search's widths at the same threshold."""
    torch.manual_seed(0)
    net = EmbedNet(d=16, h=32, depth=4)
    batches = [(torch.randn(8, 5, 16), None) for _ in range(3)]
    loaded = Loaded(net.eval(), *find_sites(net), "embedding", transform=None, input_size=(5, 16, 1))
    ours = taylor_scores(loaded, batches, loss_fn("entropy", "image-image", 20.0), torch.device("cpu"))["abs"]
    ref = _reference_scores(copy.deepcopy(net), batches, 20.0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    x = torch.randn(24, 5, 16)
    for threshold in (0.002, 0.01, 0.05):
        res = adaptive_widths(copy.deepcopy(loaded), ours, Split(x, None), batch_size=24,
                              loss=loss_fn("entropy", "image-image", 20.0), threshold=threshold, steps=6)
        assert res.widths == _reference_search(copy.deepcopy(net), ref, x, 20.0, threshold, 6), threshold


def test_a_falling_loss_is_recorded_and_divergence_cannot_fall():
    """A level criterion that falls as neurons go lets every block be cut to the floor; the search
    records it. The divergence from the original is 0 unpruned and never below."""
    from amp_deploy.prune.score import Divergence

    torch.manual_seed(0)
    net = EmbedNet(d=16, h=32, depth=3)
    loaded = Loaded(net.eval(), *find_sites(net), "embedding", transform=None, input_size=(5, 16, 1))
    x = Split(torch.randn(24, 5, 16), None)
    scores = [torch.rand(32) for _ in range(3)]

    with torch.no_grad():
        target = net(x.images)

    def falling(out, labels):  # lower the further the output moves from the original's: pruning lowers it
        return -((out - target[: len(out)]) ** 2).sum(-1)

    res = adaptive_widths(copy.deepcopy(loaded), scores, x, batch_size=24, loss=falling, threshold=1e-6, steps=6)
    assert len(res.fell) == 3 and all(f["loss"] < f["loss_before"] for f in res.fell)
    assert res.widths == [1, 1, 1]  # every block cut to the floor by the falling criterion
    div = adaptive_widths(copy.deepcopy(loaded), scores, x, batch_size=24, loss=Divergence("image-image", 20.0),
                          threshold=1e-6, steps=6)
    assert div.base_loss == 0.0 and not div.fell and all(v >= -1e-9 for v in div.losses)


def test_the_cosine_search_loss_is_0_unpruned_and_never_falls():
    """prune.search_loss: cosine, per image 1 - cos(pruned output, original output)."""
    from amp_deploy.prune.score import CosineDeparture, search_loss_fn

    torch.manual_seed(0)
    ref = torch.randn(16, 32)
    assert CosineDeparture()(ref.clone(), None, ref).abs().max() < 1e-6  # 0 for the original itself
    moved = ref + 3.0 * torch.randn(1, 32)  # the same offset for every image
    cos = CosineDeparture()(moved, None, ref)  # every embedding turned away from the original's
    assert cos.shape == (16,) and cos.min() > 0.2
    assert isinstance(search_loss_fn("cosine", "entropy", "image-image", 20.0), CosineDeparture)
    net = EmbedNet(d=16, h=32, depth=3)
    loaded = Loaded(net.eval(), *find_sites(net), "embedding", transform=None, input_size=(5, 16, 1))
    res = adaptive_widths(copy.deepcopy(loaded), [torch.rand(32) for _ in range(3)], Split(torch.randn(24, 5, 16), None),
                          batch_size=24, loss=CosineDeparture(), threshold=0.01, steps=6)
    assert abs(res.base_loss) < 1e-6 and not res.fell and all(v >= -1e-6 for v in res.losses) and res.losses[-1] <= 0.03 + 1e-6


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
           "-m", "amp_deploy.pipeline.launch", str(two), "cpu", "score", "--recipe", str(recipe), "prune.steps=3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = build(recipe, "--out", two)
    assert res.exit_code == 0 and "score: inputs unchanged, skipped" in res.output, res.output
    a, b = load_file(one / "scores.safetensors"), load_file(two / "scores.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-8)
