"""Parameter counts of the full-size architectures, measured without allocating them.

The registry's `ParamCounts` were written down from `meta_parameter_counts`, and a test compares
them again. A "meta" build creates every tensor on PyTorch's meta device (shapes only, no memory,
no initialisation), so even ViT-H (632M parameters) is counted in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils._device import DeviceContext

from trainables.backbones.backbone import Backbone, count_parameters
from trainables.backbones.spec import ParamCounts


class _MetaDeviceBuild(DeviceContext):
    """``with torch.device("meta")``, except ``torch.linspace`` stays on the CPU.

    Hiera and TinyViT compute their stochastic-depth rates with
    ``[x.item() for x in torch.linspace(...)]``, and ``.item()`` has no value on the meta device.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.linspace:
            kwargs = dict(kwargs or {})
            kwargs.setdefault("device", "cpu")
            return func(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def meta_parameter_counts(
    build_model: Callable[[int], nn.Module], input_size: int, backbone_class: type[Backbone]
) -> ParamCounts:
    """Count the parameters of ``build_model(input_size)`` by part, built on the meta device."""
    with _MetaDeviceBuild("meta"):
        model = build_model(input_size)
    return count_parameters(model, backbone_class)


def cache_entry_shapes(name: str, tuned_blocks: int | None) -> dict[str, tuple[int, ...]]:
    """The arrays of one cache entry of registered backbone `name` at its input size: the encoder's
    output (`tuned_blocks` None), or the frozen prefix's before the last `tuned_blocks` blocks;
    computed on the meta device (shapes only: no weights, no arithmetic, a second at most)."""
    from trainables.backbones import BACKBONES

    entry = BACKBONES[name]
    size = entry.spec.input_size
    with _MetaDeviceBuild("meta"):
        model = entry.build_model(size)
        backbone = entry.backbone_class(entry.spec, model, input_size=size, weights_id="meta", checkpoint_path=None,
                                        device="meta")
        features = backbone.cache_features(torch.empty(1, 3, size, size, device="meta"), tuned_blocks)
    return {key: tuple(value.shape[1:]) for key, value in features.items()}
