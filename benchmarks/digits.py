"""Real data for int8 accuracy without ImageNet: scikit-learn's handwritten digits (1,797 8x8
images, shipped inside the package), upsampled to 32x32, and two small networks built from
torchvision's own blocks (a ResNet of BasicBlocks and a GoogLeNet of Inception blocks) that
train on them in a few minutes on 2 shared cores. Trained weights are cached in
benchmarks/digits_weights/ (committed, under 1 MB each), so tests and the accuracy benchmark only
load them. (This file is outside the fastcnn package on purpose: fastcnn.optimize leaves
fastcnn's own model classes alone, and these are plain torchvision-style models.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 32
WEIGHTS = Path(__file__).resolve().parent / "digits_weights"


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): [N, 1, 32, 32] float32 standardized images and int64
    labels; a fixed 75/25 split (seeded), the same on every machine."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise RuntimeError("the digits data needs scikit-learn: pip install scikit-learn") from exc
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = len(y) * 3 // 4
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


class SmallResNet(nn.Module):
    """A ResNet for 32x32 digits: 3x3 stem, three stages of torchvision BasicBlocks (16, 32, 64
    channels; 1x1 downsample shortcuts), average pool, Linear."""

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, c_in = [], widths[0]
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c_in != c:
                down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))
            blocks.append(nn.Sequential(BasicBlock(c_in, c, stride, down), BasicBlock(c, c)))
            c_in = c
        self.layer1, self.layer2, self.layer3 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))  # N x 16 x 32 x 32
        x = self.layer3(self.layer2(self.layer1(x)))  # N x 64 x 8 x 8
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SmallGoogLeNet(nn.Module):
    """A GoogLeNet for 32x32 digits: 3x3 stem, max-pool, three torchvision Inception blocks
    (1x1 | 1x1->3x3 | 1x1->3x3 | pool->1x1), average pool, Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        from torchvision.models.googlenet import BasicConv2d, Inception

        self.conv1 = BasicConv2d(1, 32, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(32, 16, 16, 24, 8, 12, 12)  # -> 64
        self.inception3b = Inception(64, 24, 24, 32, 8, 16, 16)  # -> 88
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(88, 32, 32, 48, 12, 24, 24)  # -> 128
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))  # N x 32 x 16 x 16
        x = self.maxpool2(self.inception3b(self.inception3a(x)))  # N x 88 x 8 x 8
        x = self.inception4a(x)  # N x 128 x 8 x 8
        return self.fc(torch.flatten(self.avgpool(x), 1))


NETS = {"resnet": SmallResNet, "googlenet": SmallGoogLeNet}


def train(name: str, epochs: int = 8, seed: int = 0) -> nn.Module:
    """Train NETS[name] on the digits' training split (Adam, batch 64, cosine learning rate)."""
    torch.manual_seed(seed)
    train_x, train_y, _, _ = load_digits()
    model = NETS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(train_y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            x = train_x[idx]
            # a little augmentation: shifts of up to 2 pixels
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, (dy, dx), (2, 3))
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def trained(name: str) -> nn.Module:
    """NETS[name] with the committed weights (trained and saved there first if missing)."""
    path = WEIGHTS / f"{name}.pt"
    if not path.exists():
        model = train(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model = NETS[name]()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(top-1 accuracy in %, predictions) over x in batches of 128."""
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 128]).argmax(1) for i in range(0, len(x), 128)])
    return (pred == y).float().mean().item() * 100, pred
