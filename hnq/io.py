"""Files HNQ writes and reads: atomic writes and checkpoints.

Every output is written to a temporary file in the destination folder and renamed into
place, so an interrupted run never leaves a half-written file under the final name.
Checkpoints are plain dictionaries of tensors, numbers and strings, loaded with
`torch.load(..., weights_only=True)`, which refuses pickles that would run code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

CHECKPOINT_FORMAT = "hnq-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KINDS = ("float", "quantized")


class OutputPathError(ValueError):
    """An output path whose folder is missing or not writable."""


class CheckpointError(ValueError):
    """A file that is not a valid HNQ checkpoint."""


def check_output_path(path: str | Path) -> Path:
    """Fail early, before long work, if `path` cannot be written.

    NOTE: free disk space is not checked, so a full disk fails only at the write itself
    (which still leaves no partial file under the final name).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        _raise_if_blocked_by_file(folder)
        raise OutputPathError(f"output folder {folder} does not exist; create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"output folder {folder} is not writable; choose another -o path")
    if path.is_dir():
        raise OutputPathError(f"output path {path} is a folder; give a file name")
    return path


def check_output_folder(folder: str | Path) -> Path:
    """Fail early, before long work, if the run folder `folder` cannot be created or written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"output folder {folder} is a file, not a folder; choose another --output")
    _raise_if_blocked_by_file(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {existing} is not writable; choose another --output")
    return folder


def _raise_if_blocked_by_file(folder: Path) -> None:
    """Raise OutputPathError if `folder` or one of its ancestors is an existing file."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() and not candidate.is_dir():
            raise OutputPathError(f"output folder {folder} cannot be created: {candidate} is a file, not a "
                                  "folder; choose another output path")


@contextmanager
def atomic_output(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = check_output_path(path)
    tmp: Path | None = None
    try:
        # mkstemp sits inside the try, so a KeyboardInterrupt right after it still removes the file.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        os.close(fd)
        yield tmp
        # mkstemp creates the file as 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, kind: str, arch: dict[str, Any], state_dict: dict[str, torch.Tensor],
                    **extra: Any) -> Path:
    """Write a checkpoint atomically. `extra` holds plain data (plan, bits, class names, ...)."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": kind,
        "arch": arch,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        **extra,
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, expect_kind: str | None = None) -> dict[str, Any]:
    """Load and check an HNQ checkpoint without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the model.pt written by `hnq demo` or `hnq train`")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was not written completely, so re-create it")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch file (truncated or corrupt?): torch.save writes a zip "
            "archive and this file is not one; re-create it with hnq"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} was rejected: it holds objects other than tensors and plain data, "
            "and loading it could run code. Only load files you trust, and re-save HNQ checkpoints "
            "with `hnq` itself"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch file (truncated or corrupt?): {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a torch file but not an HNQ checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry); "
            "for timm weights, build the model with --pretrained instead"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')!r}; "
                              f"this HNQ reads version {CHECKPOINT_VERSION}")
    for key in ("kind", "arch", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks the {key!r} entry; re-create it with hnq")
    if expect_kind is not None and payload["kind"] != expect_kind:
        raise CheckpointError(f"checkpoint {path} is a {payload['kind']} checkpoint, but a {expect_kind} "
                              f"one is needed here")
    return payload


def load_state_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a message that names missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        for key in mis_shaped[:5]:
            parts.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}")
        raise CheckpointError(f"checkpoint {source} does not match the model it describes: " + "; ".join(parts))
    module.load_state_dict(state_dict)


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """Load a training run's last.pt (tensors and plain data only), with a clear error if it is damaged."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"cannot resume from {path}: the file is damaged or not a training state "
                              f"({str(error).splitlines()[0][:120]}); delete it and start the run again") from None
    if not isinstance(state, dict) or not {"trainer", "model"} <= set(state):
        raise CheckpointError(f"cannot resume from {path}: it is not a training state written by `hnq train`; "
                              "delete it and start the run again")
    return state
