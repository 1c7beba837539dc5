"""Networks a user brings, written by hand as a user would (none is one of the paper's):
the test matrix of gates on any network. Small widths, so that each test takes seconds.

* :class:`ResNet`: ResNet-18-style for 3x32x32 (CIFAR): BasicBlocks with batch norm,
  1x1 strided shortcuts where the shape changes, identity shortcuts elsewhere.
* :class:`DepthwiseCNN`: MobileNet-like depthwise-separable blocks (a 3x3 depthwise
  convolution, groups = channels, then a 1x1 pointwise one), batch norm after each.
* :class:`Encoder`: PyTorch's ``nn.TransformerEncoderLayer`` over token sequences
  (N, T, d), batch first or not, and a linear head on the average token.
* :class:`PreLN`: a hand-written pre-LN transformer block with separate q, k, v and o
  projections and an MLP, over (N, T, d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 (two BasicBlocks per stage, four stages) at ``width`` channels in the
    first stage, doubling per stage."""

    def __init__(self, width: int = 8, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i in range(4):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2),
                                        BasicBlock(cout, cout, 1)))  # fmt: skip
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class DepthwiseCNN(nn.Module):
    """A stem convolution, then depthwise-separable blocks, then a linear head."""

    def __init__(self, width: int = 8, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU()]  # fmt: skip
        cin = width
        for cout, stride in ((2 * width, 1), (4 * width, 2), (4 * width, 2)):
            layers += [
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),  # depthwise
                nn.BatchNorm2d(cin), nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False),  # pointwise
                nn.BatchNorm2d(cout), nn.ReLU(),
            ]  # fmt: skip
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` over (N, T, d), then a linear head on the average
    token; with ``batch_first=False`` the block reads (T, N, d) (transposed here)."""

    def __init__(self, d: int = 16, heads: int = 2, hidden: int = 32, classes: int = 3,
                 batch_first: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.batch_first = batch_first
        self.block = nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.0,
                                                batch_first=batch_first)  # fmt: skip
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class PreLN(nn.Module):
    """A pre-LN transformer block written by hand: x + o(attention(q, k, v)(LN(x))),
    then x + fc2(gelu(fc1(LN(x)))), and a linear head on the average token."""

    def __init__(self, d: int = 16, heads: int = 2, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def attention(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape

        def split(y: Tensor) -> Tensor:  # (N, T, H * dh) -> (N, H, T, dh)
            return y.reshape(n, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(n, t, -1))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


# (network, input shape of one example): small widths and images, so that a test takes
# about a second (the ResNet is the CIFAR architecture, on 16x16 images here)
NETWORKS = {
    "resnet": (lambda: ResNet(width=4), (3, 16, 16)),
    "depthwise": (DepthwiseCNN, (3, 16, 16)),
    "encoder": (Encoder, (5, 16)),
    "encoder-seq-first": (lambda: Encoder(batch_first=False), (5, 16)),
    "preln": (PreLN, (5, 16)),
}


def fit(net: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 1e-2) -> nn.Module:
    """``net`` trained densely with Adam on (x, y), batches of 64 (seeded by the caller),
    in eval mode: a network that was trained, for the tests that sparsify one."""
    opt = torch.optim.Adam(net.parameters(), lr)
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()
