"""Reading official checkpoint files, strictly, and naming them by content.

Every checkpoint is opened with ``torch.load(path, map_location="cpu", weights_only=True)``: only
tensors and plain containers are unpickled, never arbitrary Python objects. The state dict is
then taken out of the file's layout (see `trainables.backbones.spec.CheckpointFormat`) and loaded
strictly: a missing key, an unexpected key or a shape that differs is a `UserError` that names the
file, the expected format and a few of the offending keys.

micro-sam's format: ``{"model_state": {"sam.<name>": tensor}, "decoder_state": {...}}``. The
``sam.`` prefix is removed, as micro-sam's own ``micro_sam.util._load_checkpoint`` does. The
optional ``decoder_state`` is micro-sam's UNETR decoder for automatic instance segmentation; it is
not part of the Segment-Anything model this harness fine-tunes, so it is skipped (and a log line
says so). Like micro-sam's loader, a file without ``model_state`` is read as a raw state dict
(micro-sam's exported files are plain SAM state dicts).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from foundation.errors import UserError
from trainables.backbones.spec import FORMAT_DESCRIPTIONS, BackboneSpec

log = logging.getLogger(__name__)

MICRO_SAM_PREFIX = "sam."
_WRAPPER_KEYS = ("model", "model_state", "state_dict")
_SHOWN_KEYS = 4

_sha256_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, memoised per (resolved path, size, modification time).

    This is a checkpoint's identity in the embedding cache: two files with the same bytes give
    the same embeddings. A file rewritten in place gets a new size or mtime and is hashed again.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_memo:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(8 * 1024 * 1024), b""):
                digest.update(block)
        _sha256_memo[key] = digest.hexdigest()
    return _sha256_memo[key]


def _examples(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _load_file(path: Path, spec: BackboneSpec) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses a pickled class with "Unsupported global: GLOBAL module.Name";
        # any other unpickling error means the bytes are not a checkpoint at all.
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:
            raise UserError(
                f"Checkpoint {path} for backbone '{spec.name}' holds Python objects besides "
                f"tensors ({unsafe.group(1)}), so it cannot be opened safely (torch.load with "
                "weights_only=True refused it). Save only the weights, e.g. "
                "torch.save(checkpoint['model_state'], 'weights.pt') for a micro-sam training "
                "checkpoint (micro-sam's export_custom_sam_model does this), and point to that "
                f"file. Expected format: {FORMAT_DESCRIPTIONS[spec.format]}."
            ) from None
        raise _unreadable(path, spec, error) from None
    except OSError as error:
        raise UserError(f"Checkpoint {path} for backbone '{spec.name}' cannot be opened: {error}.") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError) as error:
        # torch's zip reader, an empty file, a bad magic number: the bytes are not a checkpoint.
        raise _unreadable(path, spec, error) from None


def _unreadable(path: Path, spec: BackboneSpec, error: Exception) -> UserError:
    text = str(error)
    if "WeightsUnpickler error:" in text:  # skip torch's paragraph about weights_only defaults
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0][:200] if lines else "no details"
    return UserError(
        f"Checkpoint {path} for backbone '{spec.name}' cannot be read as a PyTorch file "
        f"({type(error).__name__}: {reason}); it is corrupt or truncated (an interrupted "
        f"download?). Download {spec.checkpoint_file} again from {spec.source_url} and replace it."
    )


def _require_state_dict(obj: object, path: Path, spec: BackboneSpec, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise UserError(
            f"Checkpoint {path} for backbone '{spec.name}' has {where} of type "
            f"{type(obj).__name__}, not a state dict. Expected format: "
            f"{FORMAT_DESCRIPTIONS[spec.format]}."
        )
    not_tensors = [str(key) for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        wrapped = [key for key in _WRAPPER_KEYS if key in obj]
        hint = (
            f" It looks like a wrapped checkpoint (it has the key '{wrapped[0]}'); is it the file "
            "of another backbone?"
            if wrapped
            else ""
        )
        raise UserError(
            f"Checkpoint {path} for backbone '{spec.name}' is not laid out as expected: "
            f"{where} has entries that are not tensors ({_examples(not_tensors)}).{hint} Expected "
            f"format: {FORMAT_DESCRIPTIONS[spec.format]}."
        )
    return dict(obj)


def read_checkpoint(path: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The model state dict inside an official checkpoint file of ``spec.format``.

    Raises `UserError` for an unreadable file or one whose layout is not ``spec.format``.
    """
    path = Path(path)
    obj = _load_file(path, spec)
    if spec.format == "state_dict":
        return _require_state_dict(obj, path, spec, "the file")
    if spec.format == "model_key":
        if not isinstance(obj, Mapping) or "model" not in obj:
            found = list(obj.keys())[:_SHOWN_KEYS] if isinstance(obj, Mapping) else type(obj).__name__
            raise UserError(
                f"Checkpoint {path} for backbone '{spec.name}' has no 'model' entry (found "
                f"{found}). Expected format: {FORMAT_DESCRIPTIONS[spec.format]}; the official "
                f"file is {spec.checkpoint_file} from {spec.source_url}."
            )
        return _require_state_dict(obj["model"], path, spec, "its 'model' entry")
    if spec.format == "micro_sam":
        if isinstance(obj, Mapping) and "model_state" in obj:
            state = _require_state_dict(obj["model_state"], path, spec, "its 'model_state' entry")
            if "decoder_state" in obj:
                log.info(
                    "%s: skipping 'decoder_state' (micro-sam's instance-segmentation UNETR "
                    "decoder, not part of the SAM model)", path
                )
            return {
                (key[len(MICRO_SAM_PREFIX):] if key.startswith(MICRO_SAM_PREFIX) else key): value
                for key, value in state.items()
            }
        return _require_state_dict(obj, path, spec, "the file")
    raise ValueError(f"unknown checkpoint format {spec.format!r}")


def load_strictly(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, spec: BackboneSpec) -> None:
    """Copy ``state`` into ``model``; every key must match in name and shape, both ways."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_examples(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
        if mismatched:
            problems.append(f"{len(mismatched)} keys with another shape ({_examples(mismatched)})")
        raise UserError(
            f"Checkpoint {path} does not match backbone '{spec.name}': "
            + "; ".join(problems)
            + f". Expected format: {FORMAT_DESCRIPTIONS[spec.format]}, with the weights of "
            f"{spec.checkpoint_file} ({spec.source_url}). Check that the file belongs to this "
            "backbone (not another size or family)."
        )
    model.load_state_dict(state, strict=True)
