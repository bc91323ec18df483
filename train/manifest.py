"""The torchgraft manifest of a checkpoint, and reading DCP checkpoints without running code.

Every checkpoint directory ``step-<k>`` holds ``torchgraft-checkpoint.json`` (written last,
before the directory is renamed into place): the run it belongs to (a run id, the model's
parameter names, shapes and dtypes, the training settings that shape the trajectory), the
loss of every step so far, and each file of the directory with its size and sha256.

:func:`verify` checks a directory against its manifest *before* anything else in it is
read: a missing or unparsable manifest, a missing, extra, truncated or changed file is a
:class:`CheckpointError` naming it. What DCP itself would unpickle is then read with
:class:`SafeReader` (``.metadata`` through an allowlist of DCP's own metadata classes) and
:class:`SafeLoadPlanner` (non-tensor values with ``torch.load(weights_only=True)``), so even
a directory whose manifest was forged to match a crafted file cannot run code.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from torchgraft.ir.errors import TorchgraftError

MANIFEST = "torchgraft-checkpoint.json"
"""File name of the manifest inside a checkpoint directory."""
FORMAT = 1
"""Version of the manifest layout."""


class CheckpointError(TorchgraftError):
    """A checkpoint directory cannot be used: missing or invalid manifest, a corrupted file,
    another run's checkpoint, or a directory a fresh run would mix with another run's."""


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, content: Mapping[str, Any]) -> None:
    """Hash every file of ``directory`` (flushing it to disk) and write the manifest with
    ``content``, atomically (temporary file, ``fsync``, ``os.replace``)."""
    files = {}
    for path in sorted(directory.iterdir()):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    manifest = {"format": FORMAT, **content, "files": files}
    text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
    temporary = directory / (MANIFEST + ".tmp")
    with temporary.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of ``directory`` (its files not yet checked)."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} has no {MANIFEST}: it was not written by torchgraft (or its save "
            "did not finish); refusing to read it"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc}); refusing to load") from None
    if not (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(f"{path}: not a torchgraft checkpoint manifest (format {FORMAT})")
    return manifest


def verify(directory: Path) -> dict[str, Any]:
    """Check every file of ``directory`` against its manifest; returns the manifest."""
    manifest = read_manifest(directory)
    listed: dict[str, Any] = manifest["files"]
    present = {p.name for p in directory.iterdir()} - {MANIFEST}
    if extra := sorted(present - set(listed)):
        raise CheckpointError(f"{directory}: file {extra[0]} is not in the manifest; refusing")
    for name, entry in listed.items():
        path = directory / name
        if name not in present or not path.is_file():
            raise CheckpointError(f"{directory}: file {name} is missing")
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("size"):
            raise CheckpointError(f"{path} is corrupted: its size differs from the manifest's")
        if file_digest(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} is corrupted: its sha256 differs from the manifest's")
    return manifest


def model_fingerprint(state: Mapping[str, Any]) -> list[list[str]]:
    """``[name, shape, dtype]`` of each tensor of a model state dict (global shapes for
    DTensors), sorted: the same for one model under every parallel layout."""
    return sorted(
        [name, str(list(value.shape)), str(value.dtype)]
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    )


def encode_losses(losses: Sequence[float]) -> list[float | None]:
    """Losses as strict JSON (a skipped, non-finite step is ``null``)."""
    return [x if math.isfinite(x) else None for x in losses]


def decode_losses(values: Sequence[float | None]) -> list[float]:
    return [math.nan if x is None else float(x) for x in values]


def _is_dcp_metadata_class(value: Any) -> bool:
    return isinstance(value, type) and value.__module__.startswith("torch.distributed.checkpoint.")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: only its own dataclasses and enums, ``torch.Size``,
    dtypes, layouts and paths may be named; any other global is refused."""

    _ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a layout from its name
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint."):
            value = super().find_class(module, name)
            if _is_dcp_metadata_class(value) and _dataclass_or_enum(value):
                return value
        raise CheckpointError(
            f"the checkpoint's DCP metadata names {module}.{name}, which is not DCP metadata; "
            "refusing to unpickle it"
        )


def _dataclass_or_enum(cls: type) -> bool:
    return hasattr(cls, "__dataclass_fields__") or issubclass(cls, enum.Enum)


class SafeReader(FileSystemReader):
    """A DCP ``FileSystemReader`` whose ``.metadata`` is read by an allowlisting unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        with (pathlib.Path(self.path) / name).open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}/{name} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, loading non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
