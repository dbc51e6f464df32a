"""fastcnn.optimize's in-place pass: a fused conv overwrites its shortcut only where no alias of
that memory (a view, a chunk, a permute, an in-place op's result) is read afterwards and none
escapes; verify=True catches and undoes an in-place write that changed the output."""

from __future__ import annotations

import pytest
import torch
import torchvision
from fastcnn_testing import randomize_batchnorm, skip_unsupported
from torch import fx, nn

import fastcnn
from fastcnn.nn import ConvBNAct
from fastcnn.optimize import in_place


def _flags(model: nn.Module) -> list[bool]:
    return [m.overwrite_residual for m in model.modules() if isinstance(m, ConvBNAct)]


def _residual_flags(model: nn.Module) -> list[bool]:
    """overwrite_residual of the convs that take a residual (the shortcut's own conv never)."""
    return [
        m.overwrite_residual
        for n, m in model.named_modules()
        if isinstance(m, ConvBNAct) and n.rsplit(".", 1)[-1] in ("c", "convs.3", "3")
    ]


def _run_both(model: nn.Module, fast: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x), fast(x)


class ShortcutUses(nn.Module):
    """Four residual blocks whose shortcut is: the model's input; a tensor read again after the
    add; the conv's own input; a dead internal tensor. Only the last may be overwritten."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(4))
        self.pool = nn.MaxPool2d(3, 1, 1)

    def block(self, i, x, shortcut):
        return torch.relu(self.bns[i](self.convs[i](x)) + shortcut)

    def forward(self, x):
        a = self.block(0, x, x)  # shortcut: the model's input
        p = self.pool(a)
        b = self.block(1, p, p) + p  # p read after the add (and the conv's own input)
        q = self.pool(b)
        c = self.block(2, q, q)  # the conv's own input
        r = self.pool(c)
        return self.block(3, self.pool(r), r)  # r dead after the add: overwritten


@pytest.mark.parametrize("backend", ["cpu", "eager", "triton"])
def test_dead_residuals_are_overwritten_and_nothing_else(backend):
    skip_unsupported("cpu", backend, torch.float32)  # triton on CPU tensors: the interpreter
    model = randomize_batchnorm(ShortcutUses(), seed=2).eval()
    fast = fastcnn.optimize(model, backend=backend)
    assert _flags(fast) == [False, False, False, True]
    x = torch.randn(2, 8, 7, 9).contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    expected, got = _run_both(model, fast, x)
    assert torch.equal(x, kept)  # the caller's tensor is never written
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert "1 fused convs write their result into their residual" in str(fastcnn.report(fast))


def test_resnet_shortcuts_are_overwritten_in_place():
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10), seed=1).eval()
    fast = fastcnn.optimize(model, backend="cpu")
    assert sum(_flags(fast)) == 8  # every block's conv2 (its shortcut dies at the add)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    expected, got = _run_both(model, fast, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# The example and its relatives: a view of the shortcut taken before the conv and read
# after it. Each `alias` maps the shortcut to a view; `read` reads that view after the conv.
VIEWS = {
    "slice": (lambda r: r[:, :4], lambda v: v),
    "narrow": (lambda r: r.narrow(1, 2, 4), lambda v: v),
    "chunk": (lambda r: torch.chunk(r, 2, dim=1)[1], lambda v: v),
    "split": (lambda r: r.split(4, dim=1)[0], lambda v: v),
    "permute": (lambda r: r.permute(0, 2, 3, 1), lambda v: v.permute(0, 3, 1, 2)[:, :4]),
    "transpose": (lambda r: r.transpose(2, 3), lambda v: v.transpose(2, 3)[:, :4]),
    "view_as": (lambda r: r.view_as(r), lambda v: v[:, :4]),
    "unsqueeze": (lambda r: r.unsqueeze(0), lambda v: v[0, :, :4]),
    "flatten": (lambda r: torch.flatten(r, 2), lambda v: v[:, :4].reshape(v.shape[0], 4, 5, 7)),
    "relu_": (lambda r: torch.relu_(r[:, :4]), lambda v: v),
    "identity": (nn.Identity(), lambda v: v[:, :4]),
    "dropout": (nn.Dropout(0.5), lambda v: v[:, :4]),
}


class ViewReadAfter(nn.Module):
    def __init__(self, alias, read):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c, self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.alias, self.read = alias, read

    def forward(self, x):
        r = self.pool(self.b0(self.c0(x)))
        v = self.alias(r)  # an alias of the shortcut, taken before the conv
        y = torch.relu(self.b(self.c(x)) + r)
        return y[:, :4] + self.read(v)  # ... and read after it


@pytest.mark.parametrize("backend", ["cpu", "eager", "triton"])
@pytest.mark.parametrize("kind", sorted(VIEWS))
def test_a_view_read_after_the_conv_blocks_the_overwrite(kind, backend):
    skip_unsupported("cpu", backend, torch.float32)  # triton on CPU tensors: the interpreter
    torch.manual_seed(0)
    alias, read = VIEWS[kind]
    model = randomize_batchnorm(ViewReadAfter(alias, read), seed=3).eval()
    fast = fastcnn.optimize(model, backend=backend)
    assert _residual_flags(fast) == [False], "the shortcut is still read through a view"
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    expected, got = _run_both(model, fast, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class ViewReadBefore(ViewReadAfter):
    """The same views, all read before the conv: the shortcut is dead after it."""

    def forward(self, x):
        r = self.pool(self.b0(self.c0(x)))
        early = self.read(self.alias(r)) * 2  # a fresh tensor: the view is dead after this
        return torch.relu(self.b(self.c(x)) + r)[:, :4] + early


@pytest.mark.parametrize("kind", ["slice", "chunk", "permute", "relu_"])
def test_views_read_only_before_the_conv_allow_it(kind):
    torch.manual_seed(0)
    model = randomize_batchnorm(ViewReadBefore(*VIEWS[kind]), seed=3).eval()
    fast = fastcnn.optimize(model, backend="cpu")
    assert _residual_flags(fast) == [True]
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    expected, got = _run_both(model, fast, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@fx.wrap
def _keep_somewhere(t):  # an op the analysis cannot see into: it could store t anywhere
    _keep_somewhere.last = t
    return t.sum()


class Saver(nn.Module):
    """Stores its input in an attribute: the tensor escapes the graph."""

    def forward(self, t):
        self.saved = t
        return t.mean()


class Escapes(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c, self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.saver, self.how = Saver(), how

    def forward(self, x):
        r = self.b0(self.c0(x))
        extra = 0
        if self.how == "unknown function":
            extra = _keep_somewhere(r[:, :2])
        elif self.how == "module attribute":
            extra = self.saver(r)
        y = torch.relu(self.b(self.c(x)) + r) + extra
        if self.how == "returned":
            return y, r
        if self.how == "returned view":
            return [y, r.transpose(2, 3)]
        return y


@pytest.mark.parametrize(
    "how", ["returned", "returned view", "unknown function", "module attribute"]
)
def test_an_escaping_shortcut_is_never_overwritten(how):
    torch.manual_seed(0)
    model = randomize_batchnorm(Escapes(how), seed=4).eval()
    fast = fastcnn.optimize(model, backend="cpu")
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    expected, got = _run_both(model, fast, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if how == "module attribute":  # FX would drop the store: the module-level path keeps it
        assert fastcnn.report(fast).method.startswith("module-level")
        assert "stores a tensor in saver.saved" in fastcnn.report(fast).method
        with torch.no_grad():
            torch.testing.assert_close(fast.saver.saved, model.b0(model.c0(x)))
    else:
        assert _residual_flags(fast) == [False]


def test_blocker_reasons_name_the_problem():
    torch.manual_seed(0)
    model = randomize_batchnorm(ViewReadAfter(*VIEWS["slice"]), seed=3).eval()
    gm = fastcnn.optimize(model, backend="cpu")
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    (conv,) = [n for n in gm.graph.nodes if isinstance(modules.get(n.target), ConvBNAct)][-1:]
    assert "after the conv" in in_place.overwrite_blocker(conv, modules, order)


def test_verify_undoes_an_in_place_write_that_changes_the_output(monkeypatch):
    """A wrong alias analysis (simulated: it allows everything) is caught end to end."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ViewReadAfter(*VIEWS["slice"]), seed=3).eval()
    monkeypatch.setattr(in_place, "overwrite_blocker", lambda *args: None)
    unchecked = fastcnn.optimize(model, backend="cpu")
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    expected, got = _run_both(model, unchecked, x)
    assert _residual_flags(unchecked) == [True] and not torch.allclose(got, expected, atol=1e-3)
    fast = fastcnn.optimize(model, backend="cpu", verify=True, example_input=x)
    assert _residual_flags(fast) == [False]
    notes = "\n".join(fastcnn.report(fast).notes)
    assert "in-place writes undone (c)" in notes
    expected, got = _run_both(model, fast, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
