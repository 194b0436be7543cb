"""Fetching, verifying and strictly loading pretrained weights."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..files import copy_url, file_digest, remove_stale_temporaries, write_atomically

log = logging.getLogger(__name__)
_HINT = "download it by hand and pass --weights PATH"

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")
_SHOW = 5  # how many offending keys an error message lists per category
# torch names the global its safe unpickler refused as "GLOBAL module.name"
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def sadag_home() -> Path:
    """Cache root: ``$SADAG_HOME`` or ``~/.cache/sadag``."""
    return Path(os.environ.get("SADAG_HOME", Path.home() / ".cache" / "sadag")).expanduser()


def is_url(path_or_url: str) -> bool:
    return path_or_url.startswith(("http://", "https://", "file://"))


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth$")  # resnet18-f37072fd.pth: the file's sha256 starts so


def sha256_in_name(name: str | os.PathLike) -> str | None:
    """The sha256 prefix a published file carries in its name (torchvision's and torch.hub's convention)."""
    found = _HASH_IN_NAME.search(str(name))
    return found.group(1) if found else None


def verify_hash(path: Path, expected: str | None, algo: str = "sha256", shown: str | None = None) -> None:
    """Check that the file's hex digest starts with ``expected`` (a full digest or a prefix); ``shown``: what the
    message names (the URL of a download not yet cached), else the path."""
    if not expected:
        return
    digest = file_digest(path, algo)
    if not digest.startswith(expected.lower()):
        remedy = ("nothing was cached; try again, or download it by hand and pass --weights PATH" if shown else
                  "delete it and download it again")
        raise ModelError(f"{algo} of {shown or path} is {digest}, expected it to start with {expected}: the file is "
                         f"corrupt or not the published one; {remedy}")


def download(url: str, sha256_prefix: str | None = None, sha1_prefix: str | None = None) -> Path:
    """Download ``url`` into ``$SADAG_HOME/weights/<digest of url>/`` once, verify it and return the local file.

    A ``.zip`` (the pytorchcv release format) is unpacked and the checkpoint inside is returned;
    hashes are checked on the checkpoint itself, as its publisher does.
    """
    # one folder per URL: two URLs ending in the same file name never share a cached file
    cache = sadag_home() / "weights" / hashlib.sha256(url.encode()).hexdigest()[:16]
    name = url.rsplit("/", 1)[-1]
    final = cache / name.removesuffix(".zip")
    if not final.exists():
        cache.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)  # what downloads killed mid-way (SIGKILL, out of memory) left
        log.info("downloading %s to %s", url, final)
        hint = _offline_hint(final, name.endswith(".zip"))

        def fetch_verified(tmp: str) -> None:  # checked before it takes its final name: a bad file is never cached
            if name.endswith(".zip"):  # unpacked under names of this process's own
                _fetch_zip_member(url, Path(tmp), hint)
            else:
                copy_url(url, tmp, ModelError, hint)
            verify_hash(Path(tmp), sha256_prefix, "sha256", shown=url)
            verify_hash(Path(tmp), sha1_prefix, "sha1", shown=url)

        write_atomically(final, fetch_verified)
    verify_hash(final, sha256_prefix, "sha256")  # on every load: the cached copy may have changed since
    verify_hash(final, sha1_prefix, "sha1")
    return final


def _offline_hint(final: Path, zipped: bool) -> str:
    """What to do when a download fails: the exact path sadag reads the cached file from, offline too."""
    put = "unzip it and put its checkpoint at" if zipped else "put it at"
    return f"{_HINT}, or {put} {final} (where sadag looks before downloading)"


def _fetch_zip_member(url: str, dest: Path, hint: str) -> None:
    """The single checkpoint of the zip archive at ``url``, written to ``dest``."""
    archive = dest.with_name(dest.name + ".zip")
    try:
        copy_url(url, archive, ModelError, hint)
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.endswith((".pth", ".pt", ".th", ".tar"))]
            if len(members) != 1:
                raise ModelError(f"{url} should hold exactly one checkpoint, found {zf.namelist()}")
            with zf.open(members[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as e:
        raise ModelError(f"{url} is not a readable zip archive ({e}): the download was probably an error page; "
                         f"try again, or {hint}") from e
    finally:
        archive.unlink(missing_ok=True)


def _safe_globals() -> list:
    """Harmless globals that published checkpoints pickle next to their tensors.

    ``argparse.Namespace`` (training arguments) and numpy scalars of numeric dtypes (e.g. a
    ``best_prec1``): rebuilding them sets attributes or reads bytes, it calls nothing else.
    """
    numeric = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"
    np_scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor, whatever module it lives in
    return [argparse.Namespace, np_scalar, np.dtype, *sorted({type(np.dtype(c)) for c in numeric}, key=str)]


def read_checkpoint(path: Path, trust_checkpoint: bool = False) -> object:
    """``torch.load`` tensors, plain containers and a few harmless globals, never arbitrary objects.

    Unpickling an arbitrary object can run any code the file names. A checkpoint that needs more
    than :func:`_safe_globals` is refused unless ``trust_checkpoint`` (``--trust-checkpoint``) says
    the user trusts the file's origin.
    """
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None:  # garbage bytes, not a checkpoint with extra objects
            raise _not_a_checkpoint(path, e) from e
        if not trust_checkpoint:
            raise _untrusted(path, refused.group(1)) from None
        log.warning("%s: loading arbitrary pickled objects (%s) because the checkpoint is trusted",
                    path, refused.group(1))
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # any failure here means "not a usable checkpoint"
            raise _not_a_checkpoint(path, e2) from e2
    except Exception as e:
        raise _not_a_checkpoint(path, e) from e


def _not_a_checkpoint(path: Path, e: Exception) -> ModelError:
    return ModelError(f"{path} is not a torch checkpoint (torch.load failed: {type(e).__name__}: {e})")


def _untrusted(path: Path, name: str) -> ModelError:
    return ModelError(
        f"{path} refers to the Python object {name}, which sadag does not load: unpickling it could run "
        f"any code the file's author chose. A checkpoint only needs tensors. If you trust where the file comes "
        f"from, pass --trust-checkpoint (trust_checkpoint=True in Python); otherwise re-save its state_dict "
        f"with torch.save(model.state_dict(), path) from a trusted environment"
    )


def unwrap_state_dict(obj: object, source: str = "checkpoint",
                      model_keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Find the state_dict inside common checkpoint layouts and strip DataParallel ``module.`` prefixes, unless
    the keys as saved are all ``model_keys`` (a model with a child named ``module``)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ModelError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), (Mapping, nn.Module)):
            return unwrap_state_dict(obj[key], source, model_keys)
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ModelError(f"{source} contains no tensors (keys: {list(obj)[:_SHOW]})")
    if model_keys is not None and all(k in model_keys for k in sd):
        return sd
    unwrapped = {k.removeprefix("module."): v for k, v in sd.items()}
    if len(unwrapped) < len(sd):  # "module.x" and "x" both present: which one is the model's is unknowable
        twice = sorted(k for k in unwrapped if k in sd and f"module.{k}" in sd)
        raise ModelError(f"{source} holds {_listing('tensors', twice)} both with and without the DataParallel "
                         "prefix 'module.': save the one state_dict you mean")
    return unwrapped


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load with every key and shape checked; on mismatch, say exactly what differs."""
    own = model.state_dict()
    # Checkpoints saved before torch 0.4.1 lack BN's num_batches_tracked counter; it is unused in eval.
    state_dict = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state_dict}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [_listing("missing keys", missing), _listing("unexpected keys", unexpected),
                 _listing("shape mismatches", shapes)]
        raise ModelError(
            f"weights in {source} do not fit {type(model).__name__}: "
            + "; ".join(p for p in parts if p)
            + ". Check that the model name matches the checkpoint"
        )
    check_tensor_kinds(own, state_dict, source)
    check_finite(state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def check_tensor_kinds(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Dense tensors of the model's kind: load_state_dict would cast int64 or complex values into float weights
    silently, and a sparse or meta tensor fails deep inside torch."""
    odd = [f"{k}: {v.dtype}" + ("" if v.layout == torch.strided else f", {v.layout}") + (", meta" if v.is_meta else "")
           for k, v in tensors.items()
           if v.layout != torch.strided or v.is_meta or v.is_complex()
           or v.is_floating_point() != own[k].is_floating_point()]
    if odd:
        raise ModelError(f"{source} holds {_listing('tensors of another kind than the model', odd)}: a checkpoint "
                         "of this model stores dense float weights (and integer counters); use the published file")


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or infinite values: a model holding them predicts one class whatever the input."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelError(f"{source} holds NaN or infinite values in {_listing('tensors', bad)}: the file is "
                         f"damaged or comes from a diverged training run; use another checkpoint")


def _listing(what: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {what} ({', '.join(items[:_SHOW])}{more})"


def resolve_weights(path_or_url: str | os.PathLike, sha256_prefix: str | None = None,
                    sha1_prefix: str | None = None) -> Path:
    """A local file for ``path_or_url``: URLs are downloaded (cached), local files are hash-checked."""
    s = str(path_or_url)
    if is_url(s):
        return download(s, sha256_prefix, sha1_prefix)
    path = Path(s).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    verify_hash(path, sha256_prefix, "sha256")
    verify_hash(path, sha1_prefix, "sha1")
    return path


def load_checkpoint(model: nn.Module, path_or_url: str | os.PathLike, sha256_prefix: str | None = None,
                    sha1_prefix: str | None = None, *, trust_checkpoint: bool = False) -> nn.Module:
    """Load weights from a file or URL into ``model`` strictly and return the model.

    ``trust_checkpoint=True`` allows a checkpoint that pickles arbitrary Python objects (see
    :func:`read_checkpoint`): only for files whose origin you trust.
    """
    path = resolve_weights(path_or_url, sha256_prefix, sha1_prefix)
    state_dict = unwrap_state_dict(read_checkpoint(path, trust_checkpoint), str(path), set(model.state_dict()))
    load_state_dict_strict(model, state_dict, str(path))
    return model
