"""A backbone cut into stages, input side first: what `partial` freezes and `gradual` unfreezes.

One small splitter per family, recognised by its modules rather than its class name so that timm's and
torchvision's variants (and custom checkpoints built from them) are covered alike:

- EfficientNet / MobileNet-style (timm): ``conv_stem`` + ``bn1``, each of ``blocks[i]``, ``conv_head`` + ``bn2``;
- ResNet (torchvision and timm): ``conv1`` + ``bn1``, ``layer1`` .. ``layer4``.

Every parameter and buffer of the backbone belongs to exactly one stage; anything a splitter does not name
(a pooling layer with no weights, say) must hold no tensors, or the split is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tlops.errors import TlopsError


@dataclass
class Stage:
    name: str
    modules: list[nn.Module]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]

    def set_frozen(self, frozen: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(not frozen)

    def eval(self) -> None:
        """Eval mode for the stage's modules: BatchNorm uses and keeps its running statistics."""
        for m in self.modules:
            m.eval()

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the stage (weights and BatchNorm statistics), cloned."""
        return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(self.modules) for k, v in m.state_dict().items()}


def _module(backbone: nn.Module, name: str) -> nn.Module:
    m = getattr(backbone, name)
    assert isinstance(m, nn.Module), name
    return m


def _efficientnet(backbone: nn.Module) -> list[Stage]:
    stages = [Stage("stem", [_module(backbone, "conv_stem"), _module(backbone, "bn1")])]
    stages += [Stage(f"blocks.{i}", [block]) for i, block in enumerate(backbone.blocks)]  # type: ignore[arg-type]
    tail = [getattr(backbone, n) for n in ("conv_head", "bn2") if isinstance(getattr(backbone, n, None), nn.Module)]
    if tail:
        stages.append(Stage("conv_head", tail))
    return stages


def _resnet(backbone: nn.Module) -> list[Stage]:
    return [Stage("stem", [_module(backbone, "conv1"), _module(backbone, "bn1")])] + [
        Stage(name, [_module(backbone, name)]) for name in ("layer1", "layer2", "layer3", "layer4")
    ]


def split_stages(backbone: nn.Module) -> list[Stage]:
    """The backbone's stages, input side first; TlopsError for an architecture without a splitter."""
    if all(hasattr(backbone, n) for n in ("conv_stem", "bn1", "blocks")):
        stages = _efficientnet(backbone)
    elif all(hasattr(backbone, n) for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")):
        stages = _resnet(backbone)
    else:
        raise TlopsError(f"cannot split a {type(backbone).__name__} backbone into stages (known: EfficientNet "
                         "and ResNet families); use train.strategy full, scratch or linear-probe")
    _check_cover(backbone, stages)
    return stages


def _check_cover(backbone: nn.Module, stages: list[Stage]) -> None:
    """Every tensor of the backbone in exactly one stage: a frozen stage must freeze all of itself."""
    owned: dict[int, str] = {}
    for st in stages:
        for m in st.modules:
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) in owned:
                    raise TlopsError(f"stage split of {type(backbone).__name__}: a tensor is in both "
                                     f"{owned[id(t)]} and {st.name}")
                owned[id(t)] = st.name
    left = [n for n, t in list(backbone.named_parameters()) + list(backbone.named_buffers()) if id(t) not in owned]
    if left:
        raise TlopsError(f"stage split of {type(backbone).__name__} leaves {len(left)} tensor(s) out, e.g. {left[0]}")


def stages_or_whole(backbone: nn.Module) -> list[Stage]:
    """The stages when the family is known, else the whole backbone as one stage (for full and scratch)."""
    try:
        return split_stages(backbone)
    except TlopsError:
        return [Stage("backbone", [backbone])]
