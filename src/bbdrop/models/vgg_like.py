"""VGG-like: the CIFAR network of the paper (docs/method.md section 4).

Zagoruyko's VGG for CIFAR ("92.45% on CIFAR-10 in Torch", 2015; Lee et al.,
Sec. 5.2, Table 1): 13 convolutions 3x3 with padding 1, each followed by batch
norm and ReLU, widths 64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M
(M: max-pool 2), then dense 512-512 with batch norm and ReLU, and dense
512-classes. ``attach_gates_`` gates the 13 convolutions' output channels and
the two dense layers' inputs (512 and 512 units).

Dropout of the dense baseline (``dropout=True``). Zagoruyko's ``vgg_bn_drop``
recipe, which the authors' public code reproduces (and disables once gates are
attached), puts plain dropout after the ReLU of every convolution that is *not*
followed by a max-pool, with rate 0.3 after the first convolution and 0.4 after
the others, and rate 0.5 before each of the two dense layers (on the flattened
features, and after the first dense layer's batch norm and ReLU). With
``dropout=False`` (the default: gates take dropout's place) those positions hold
``nn.Identity``, so both variants have the same module names and state dicts:
pretrain with ``dropout=True``, then load the weights into ``dropout=False``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from bbdrop.models.registry import check_num_classes, register_model

__all__ = ["VGG_LIKE_CONFIG", "VGGLike", "vgg_like"]

# Output widths of the 13 convolutions; "M" is a 2x2 max-pool.
VGG_LIKE_CONFIG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip

FIRST_CONV_DROPOUT = 0.3
CONV_DROPOUT = 0.4
DENSE_DROPOUT = 0.5


def _dropout(p: float, enabled: bool) -> nn.Module:
    return nn.Dropout(p) if enabled else nn.Identity()


class VGGLike(nn.Module):
    """The paper's VGG-like network for 32x32 images; input (N, 3, 32, 32).

    Modules are named ``features.conv{i}``, ``features.bn{i}``, ``features.relu{i}``,
    ``features.drop{i}``, ``features.pool{j}`` (i = 1..13, j = 1..5) and
    ``classifier.{flatten, drop1, fc1, bn, relu, drop2, fc2}``.
    """

    def __init__(self, num_classes: int = 10, dropout: bool = False) -> None:
        super().__init__()
        check_num_classes(num_classes)
        if not isinstance(dropout, bool):
            raise TypeError(f"dropout must be a bool, got {dropout!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels, conv, pool = 3, 0, 0
        for i, width in enumerate(VGG_LIKE_CONFIG):
            if not isinstance(width, int):  # "M"
                pool += 1
                layers[f"pool{pool}"] = nn.MaxPool2d(2)
                continue
            conv += 1
            layers[f"conv{conv}"] = nn.Conv2d(in_channels, width, 3, padding=1)
            layers[f"bn{conv}"] = nn.BatchNorm2d(width)
            layers[f"relu{conv}"] = nn.ReLU()
            if VGG_LIKE_CONFIG[i + 1] != "M":
                p = FIRST_CONV_DROPOUT if conv == 1 else CONV_DROPOUT
                layers[f"drop{conv}"] = _dropout(p, dropout)
            in_channels = width
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                drop1=_dropout(DENSE_DROPOUT, dropout),
                fc1=nn.Linear(512, 512),
                bn=nn.BatchNorm1d(512),
                relu=nn.ReLU(),
                drop2=_dropout(DENSE_DROPOUT, dropout),
                fc2=nn.Linear(512, num_classes),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (N, 3, 32, 32) -> (N, 512, 1, 1)
        return self.classifier(x)  # (N, 512) -> (N, num_classes)


@register_model("vgg_like")
def vgg_like(num_classes: int = 10, dropout: bool = False) -> VGGLike:
    """The paper's VGG-like CIFAR network (docs/method.md section 4).

    Args:
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100.
        dropout: the plain dropout (0.3/0.4/0.5) of the dense baseline; leave it
            off when gates are attached.
    """
    return VGGLike(num_classes, dropout)
