"""Model directories: safetensors weights + JSON metadata (never a pickle).

A model directory holds ``model.json`` and one ``member_NN.safetensors`` per network (one for a
classifier, k for a k-fold CNN-TLMA ensemble)::

    model.json            kind, class names / labels, label means and stds, architecture,
                          input grid and preprocessing recipe, training-set hash, metrics,
                          mspec and torch versions, and per member: file, sha256, metrics
    member_00.safetensors
    curves.png            training curves (written by mspec.ml.train)
    confusion.png         validation confusion matrix (classifiers)

A CNN-TLMA pair (separate ensembles for M dwarfs and M giants) is a directory whose
``model.json`` has ``kind = "tlma_pair"`` and sub-directories ``dM/`` and ``gM/``.

Every weights file is checked against the sha256 recorded in ``model.json`` before use, so a
truncated, corrupt or swapped file raises :class:`ModelFileError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mspec.ml.base import CLASSES, KINDS, TLMA_LABELS, state_shapes

if TYPE_CHECKING:  # annotations only: torch is imported where networks run
    import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFileError",
    "sha256_bytes",
    "write_model",
    "write_pair",
    "write_metadata",
    "read_metadata",
    "read_member_bytes",
    "model_from_bytes",
    "load_models",
]

FORMAT = "mspec-cnn"
FORMAT_VERSION = 1
META_NAME = "model.json"


class ModelFileError(ValueError):
    """A model directory, its metadata or a weights file is missing, corrupt or inconsistent."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def write_model(out_dir, meta: dict, states: list[dict[str, torch.Tensor]]) -> Path:
    """Write a model directory.

    Parameters
    ----------
    out_dir : path-like
        Directory to create (or overwrite the model files in).
    meta : dict
        JSON-serialisable metadata; must hold ``kind`` and ``arch``. ``members`` entries may
        carry per-member fields (e.g. ``fold``, ``metrics``); file names and hashes are added.
    states : list of dict
        One ``state_dict`` per member network.

    Returns
    -------
    pathlib.Path
        The model directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    members = list(meta.get("members") or [{} for _ in states])
    if len(members) != len(states):
        raise ValueError(f"{len(states)} states but {len(members)} member entries")
    for i, (m, state) in enumerate(zip(members, states)):
        blob = _state_to_bytes(state)
        name = f"member_{i:02d}.safetensors"
        (out / name).write_bytes(blob)
        members[i] = {**m, "file": name, "sha256": sha256_bytes(blob)}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, members=members)
    return write_metadata(out, meta)


def write_metadata(out_dir, meta: dict) -> Path:
    """Write ``meta`` as the ``model.json`` of the model directory ``out_dir`` (which exists).

    The one place that serialises model metadata (sorted keys, 2-space indent), for new
    models, pairs and models whose metadata changes (e.g. a recalibrated zero point).
    """
    out = Path(out_dir)
    (out / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def write_pair(out_dir, parts: dict[str, str], meta: dict | None = None) -> Path:
    """Write the ``model.json`` of a CNN-TLMA pair (``parts``: lumclass -> sub-directory)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = {**(meta or {}), "format": FORMAT, "format_version": FORMAT_VERSION}
    m.update(kind="tlma_pair", parts=dict(parts))
    return write_metadata(out, m)


def read_metadata(model_dir) -> dict:
    """Read and check ``model.json`` of a model directory.

    Raises
    ------
    ModelFileError
        If the directory or its metadata is missing, not valid JSON, or not an mspec model.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelFileError(f"model_dir {str(path)!r} is not a directory")
    mfile = path / META_NAME
    if not mfile.is_file():
        raise ModelFileError(f"model_dir {str(path)!r} has no {META_NAME}: not an mspec model")
    try:
        meta = json.loads(mfile.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{mfile} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{mfile} is not an mspec CNN model (format != {FORMAT!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(
            f"{mfile} has format_version {meta['format_version']}, newer than this mspec "
            f"({FORMAT_VERSION}); upgrade mspec"
        )
    kind = meta.get("kind")
    if kind == "tlma_pair":
        parts = meta.get("parts")
        if not isinstance(parts, dict) or not parts:
            raise ModelFileError(f"{mfile}: a tlma_pair needs a non-empty 'parts' mapping")
        return meta
    if kind not in KINDS:
        raise ModelFileError(f"{mfile}: unknown model kind {kind!r}")
    if not meta.get("members"):
        raise ModelFileError(f"{mfile} lists no member weights files")
    if kind in CLASSES and tuple(meta.get("classes", ())) != CLASSES[kind]:
        raise ModelFileError(f"{mfile}: classes {meta.get('classes')} do not match kind {kind!r}")
    if kind == "tlma":
        if tuple(meta.get("labels", ())) != TLMA_LABELS:
            raise ModelFileError(f"{mfile}: labels must be {list(TLMA_LABELS)}")
        for key in ("label_mean", "label_std"):
            if len(meta.get(key, ())) != len(TLMA_LABELS):
                raise ModelFileError(f"{mfile}: {key} must have {len(TLMA_LABELS)} values")
    return meta


def read_member_bytes(model_dir, meta: dict | None = None) -> list[bytes]:
    """Read every member's weights file, checking its sha256 against the metadata.

    Raises
    ------
    ModelFileError
        If a file is missing or its content does not match the recorded hash.
    """
    path = Path(model_dir)
    meta = read_metadata(path) if meta is None else meta
    blobs = []
    for m in meta["members"]:
        f = path / str(m.get("file", ""))
        if not f.is_file():
            raise ModelFileError(f"weights file {str(f)!r} listed in {META_NAME} is missing")
        blob = f.read_bytes()
        if sha256_bytes(blob) != m.get("sha256"):
            raise ModelFileError(
                f"weights file {str(f)!r} does not match the sha256 in {META_NAME}: "
                "the file is corrupt, truncated or was replaced; retrain or restore it"
            )
        check_safetensors(blob, meta, name=str(f))
        blobs.append(blob)
    return blobs


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1}  # fmt: skip


def check_safetensors(blob: bytes, meta: dict | None = None, *, name: str = "weights") -> None:
    """Check that ``blob`` is a safetensors file (and fits ``meta``'s architecture) without
    building the network, so a bad file fails when a model is opened, not at compute time.

    Parameters
    ----------
    blob : bytes
        File content.
    meta : dict, optional
        Model metadata (``kind``, ``arch``): tensor names and shapes are compared with the
        network it describes.
    name : str
        Named in the error.

    Raises
    ------
    ModelFileError
        Not a safetensors file (header length, JSON header, dtypes, offsets), or tensors that
        do not match the architecture.
    """
    bad = f"{name} is not a valid safetensors weights file"
    if len(blob) < 8:
        raise ModelFileError(f"{bad} (only {len(blob)} bytes)")
    n = int.from_bytes(blob[:8], "little")
    if n < 2 or 8 + n > len(blob):
        raise ModelFileError(f"{bad} (header length {n} does not fit a {len(blob)}-byte file)")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelFileError(f"{bad} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{bad} (its header is not a JSON object)")
    size = len(blob) - 8 - n
    shapes = {}
    for key, t in header.items():
        if key == "__metadata__":
            continue
        try:
            dt, shape, (a, b) = t["dtype"], [int(x) for x in t["shape"]], t["data_offsets"]
            count = 1
            for x in shape:
                count *= x
            ok = dt in _ST_DTYPES and 0 <= int(a) <= int(b) <= size
            ok = ok and int(b) - int(a) == count * _ST_DTYPES[dt]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelFileError(f"{bad} (tensor {key!r}: bad dtype, shape or offsets)")
        shapes[key] = tuple(shape)
    if meta is not None and meta.get("kind") in KINDS and isinstance(meta.get("arch"), dict):
        try:
            want = state_shapes(meta["kind"], **meta["arch"])
        except (TypeError, ValueError, KeyError, RuntimeError):
            return  # the architecture itself is reported when the model is built
        if want != shapes:
            diff = sorted(set(want) ^ set(shapes)) or sorted(
                k for k in want if want[k] != shapes.get(k)
            )
            raise ModelFileError(
                f"{name} does not fit the architecture in the metadata (wrong weights file?): "
                f"tensors differ: {diff[:5]}"
            )


def model_from_bytes(meta: dict, blob: bytes, *, name: str = "weights", device="cpu"):
    """Rebuild one member network from its safetensors bytes (eval mode, on ``device``).

    Raises
    ------
    ModelFileError
        If ``blob`` is not a safetensors file or does not fit the recorded architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from mspec.ml.models import build_model

    try:
        state = load(blob)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ModelFileError(f"{name} is not a valid safetensors weights file ({e})") from None
    try:
        model = build_model(meta["kind"], **meta["arch"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ModelFileError(
            f"{name} does not fit the architecture in the metadata (wrong weights file?): {e}"
        ) from None
    return model.to(device).eval()


def load_models(model_dir, device="cpu") -> tuple[list[torch.nn.Module], dict]:
    """Load every member network of a model directory.

    Parameters
    ----------
    model_dir : path-like
        Directory written by :func:`write_model` (not a ``tlma_pair``; load its parts).
    device : str or torch.device
        Device to place the networks on.

    Returns
    -------
    (list of torch.nn.Module, dict)
        The member networks in eval mode and the metadata.
    """
    meta = read_metadata(model_dir)
    if meta["kind"] == "tlma_pair":
        raise ModelFileError(
            f"{model_dir} is a CNN-TLMA pair; load its parts {sorted(meta['parts'])} instead"
        )
    blobs = read_member_bytes(model_dir, meta)
    models = [
        model_from_bytes(meta, b, name=str(Path(model_dir) / m["file"]), device=device)
        for m, b in zip(meta["members"], blobs)
    ]
    return models, meta
