"""LeNet-500-300: the fully connected MNIST network of the paper (docs/method.md section 4).

784-500-300-10 with ReLU (LeCun et al. 1998; Lee et al., Sec. 5.1, Fig. 1).
``attach_gates_`` gates the inputs of the three dense layers: 784-500-300 units.
"""

from __future__ import annotations

from torch import Tensor, nn

from bbdrop.models.registry import check_num_classes, register_model

__all__ = ["LeNet500300", "lenet_500_300"]


class LeNet500300(nn.Module):
    """784-500-300-classes multilayer perceptron with ReLU.

    Accepts images (N, 1, 28, 28) or flat vectors (N, 784); it flattens inside.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        check_num_classes(num_classes)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(784, 500)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(500, 300)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(300, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)  # (N, 784)
        x = self.relu1(self.fc1(x))  # (N, 500)
        x = self.relu2(self.fc2(x))  # (N, 300)
        return self.fc3(x)  # (N, num_classes)


@register_model("lenet_500_300")
def lenet_500_300(num_classes: int = 10) -> LeNet500300:
    """LeNet-500-300 (784-500-300-``num_classes``, ReLU) as in docs/method.md section 4."""
    return LeNet500300(num_classes)
