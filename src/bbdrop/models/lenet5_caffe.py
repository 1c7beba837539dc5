"""LeNet5-Caffe: the convolutional MNIST network of the paper (docs/method.md section 4).

conv 20 5x5, max-pool 2, conv 50 5x5, max-pool 2, dense 800-500, dense
500-classes (Lee et al., Sec. 5.1, Fig. 1). Caffe's original ``lenet`` has no
nonlinearity after its convolutions; the authors' code, which the paper's
figures come from, puts a ReLU after each one, and so does this model.
``attach_gates_`` gates the two convolutions' output channels and the two dense
layers' inputs: 20-50-800-500 units (the 800 are the flattened 50 x 4 x 4 maps).
"""

from __future__ import annotations

from torch import Tensor, nn

from bbdrop.models.registry import check_num_classes, register_model

__all__ = ["LeNet5Caffe", "lenet5_caffe"]


class LeNet5Caffe(nn.Module):
    """LeNet5-Caffe with ReLU after every hidden layer; input (N, 1, 28, 28)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        check_num_classes(num_classes)
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(800, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))  # (N, 20, 24, 24) -> (N, 20, 12, 12)
        x = self.pool2(self.relu2(self.conv2(x)))  # (N, 50, 8, 8) -> (N, 50, 4, 4)
        x = self.flatten(x)  # (N, 800), channel-major: feature f belongs to channel f // 16
        x = self.relu3(self.fc1(x))  # (N, 500)
        return self.fc2(x)  # (N, num_classes)


@register_model("lenet5_caffe")
def lenet5_caffe(num_classes: int = 10) -> LeNet5Caffe:
    """LeNet5-Caffe (20-50 conv, 800-500-``num_classes`` dense) as in docs/method.md section 4."""
    return LeNet5Caffe(num_classes)
