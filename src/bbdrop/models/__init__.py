"""The paper's networks, behind a registry (``create_model("lenet5_caffe")``).

All are plain ``nn.Module`` s built from ``Linear``, ``Conv2d``, ``BatchNorm``,
``ReLU``, ``MaxPool2d`` and ``Flatten``, so :func:`bbdrop.attach_gates_` puts the
gates where the paper puts them and :mod:`bbdrop.metrics` can trace them.
"""

from bbdrop.models.lenet5_caffe import LeNet5Caffe, lenet5_caffe
from bbdrop.models.lenet_500_300 import LeNet500300, lenet_500_300
from bbdrop.models.registry import create_model, get_model_factory, list_models, register_model
from bbdrop.models.vgg_like import VGGLike, vgg_like

__all__ = [
    "LeNet5Caffe",
    "LeNet500300",
    "VGGLike",
    "create_model",
    "get_model_factory",
    "lenet5_caffe",
    "lenet_500_300",
    "list_models",
    "register_model",
    "vgg_like",
]
