"""Reference models of the papers' experiments, and a lookup for torchvision models.

`get("models:lenet5")`, `get("models:resnet20", num_classes=10)` (`resnet20_mnist`: one input channel),
`get("models:resnet18_tiny")` (the 64×64 Tiny-ImageNet ResNet-18: 3×3 stride-1 stem, no
max-pool), `get("models:vit_tiny")` (a 2-layer ViT for 28×28 digits), `get("models:gpt_tiny")` (a
2-layer byte-level causal decoder, context 64) and `get("torchvision:NAME", **kwargs)` for any torchvision classification
model (random weights: nothing is downloaded).
"""
from __future__ import annotations

from torch import nn

from qcompile.models.gpt_tiny import GPTTiny
from qcompile.models.lenet import LeNet5
from qcompile.models.resnet_cifar import ResNet20
from qcompile.models.vit_tiny import vit_tiny


def resnet18_tiny(num_classes: int = 200) -> nn.Module:
    import torchvision
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


REGISTRY = {
    "lenet5": LeNet5,
    "lenet5_bn": lambda **kw: LeNet5(batch_norm=True, **kw),
    "resnet20": ResNet20,
    "resnet20_mnist": lambda **kw: ResNet20(in_channels=1, **kw),
    "resnet18_tiny": resnet18_tiny,
    "vit_tiny": vit_tiny,
    "gpt_tiny": GPTTiny,
}


def get(name: str, **kwargs) -> nn.Module:
    """A model by name: 'models:NAME' (this package) or 'torchvision:NAME'."""
    source, _, model_name = name.partition(":")
    if source == "models" and model_name in REGISTRY:
        return REGISTRY[model_name](**kwargs)
    if source == "torchvision":
        import torchvision
        available = torchvision.models.list_models(module=torchvision.models)
        if model_name not in available:
            raise ValueError(f"unknown torchvision classification model {model_name!r}; "
                             f"available: {', '.join(sorted(available))}")
        return torchvision.models.get_model(model_name, weights=None, **kwargs)
    raise ValueError(f"unknown model {name!r}: use 'torchvision:NAME' or 'models:NAME' with NAME in "
                     f"{sorted(REGISTRY)}")
