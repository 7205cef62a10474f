"""The one model resolver: a Hugging Face id or a local folder -> a local folder of weights.

Every command finds its weights here, before any work starts, so a cluster node without network
learns at once, with one clear message, what is missing and how to provide it
(docs/models.md). The order is always the same:

1. a local folder (``~`` expanded) is used as it is; a path that does not exist is an error,
   never a hub lookup;
2. a hub id (``owner/name``, optionally ``owner/name/subfolder``) is looked up in the Hugging
   Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) without touching the network;
3. only when it is not cached and ``HF_HUB_OFFLINE`` is not set is the hub asked, with the hub
   client's own metadata timeout (``HF_HUB_ETAG_TIMEOUT``, 10 s by default) bounding the first
   request, so a node whose network drops packets fails in seconds, not after minutes of retries.

Single-file releases (PANNs, VGGish, PaSST, ...) are found by ``resolve_release`` in the models
folder (``--models-dir`` or ``V2A_MODELS``) and checked against the registry's sha256.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

HUB_PATTERNS = ("*.json", "*.txt", "*.safetensors")
MODELS_DIR_ENV = "V2A_MODELS"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")


class ModelUnavailable(RuntimeError):
    """Weights that cannot be used: not found offline, not a model folder, incomplete or corrupt."""

    def __init__(self, spec: str, cause: str, how: str = ""):
        self.spec, self.cause = spec, cause
        super().__init__(f"model {spec!r} is not available: {cause}" + (f"\n{how}" if how else ""))


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec as the user gave it and the local folder (or file) its weights are in."""

    spec: str
    path: Path

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def weight_files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            return []
        files = sorted(p for p in self.path.iterdir() if p.suffix == ".safetensors")
        return files or sorted(p for p in self.path.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))

    def weight_hashes(self) -> dict[str, str]:
        """sha256 of every weight file the loaders read, by file name."""
        return {p.name: file_sha256(p) for p in self.weight_files()}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read once per process while its size and mtime stay the same (the card, the
    settings and each encoder's record all ask for the same multi-GB weights)."""
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` or ``owner/name/sub``; ``/x``, ``./x``, ``~/x`` and bare names are paths."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~"))


def hub_offline() -> bool:
    """Whether the hub client is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    import huggingface_hub
    from huggingface_hub import constants

    check = getattr(huggingface_hub, "is_offline_mode", None)
    return bool(check()) if check else bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def how_to_provide(spec: str, files: str = "config.json and the weights, as save_pretrained writes them") -> str:
    """The ways to give a command a hub model offline (the same text for every model)."""
    hub_id = spec if looks_like_hub_id(spec) else "<owner/name>"
    return ("Provide it in one of these ways:\n"
            f"  1. a local folder holding {files} (pass its path instead of the id);\n"
            f"  2. the Hugging Face cache: on a machine with network run `hf download {hub_id}` (older "
            f"huggingface_hub: `huggingface-cli download {hub_id}`), copy its HF_HOME folder (default "
            "~/.cache/huggingface) here and point HF_HOME at it; HF_HUB_OFFLINE=1 keeps the run off the network.\n"
            "`python -m core.registry check` lists every model the project uses and where it looked.")


def resolve_pretrained(spec: str, pipeline_subfolder: str | None = None,
                       patterns: Sequence[str] = HUB_PATTERNS, require: Sequence[str] = ("config.json",),
                       allow_download: bool = True, weights: bool = True) -> ResolvedModel:
    """A folder holding ``require`` and weights, for a local path, ``owner/name`` or ``owner/name/sub``.

    ``pipeline_subfolder`` (e.g. ``"vae"``) is used when the spec names a diffusers pipeline (a folder
    or repo with ``model_index.json``) rather than the model itself. ``allow_download=False`` never
    asks the hub (``python -m core.registry check``). ``weights=False``: only ``require`` is needed
    (a tokenizer folder).
    """
    spec = spec.strip()
    local = Path(spec).expanduser()
    if local.exists():
        folder = local
        sub_folder = local / pipeline_subfolder if pipeline_subfolder else None
        if sub_folder is not None and ((local / "model_index.json").is_file() or not (local / "config.json").is_file()):
            folder = sub_folder
        return _checked(ResolvedModel(spec, folder.resolve()), require, f"the folder {local}", weights)
    if not looks_like_hub_id(spec):
        raise ModelUnavailable(spec, f"no such folder: {local}", how_to_provide(spec))
    parts = spec.strip("/").split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    if not sub and pipeline_subfolder:
        head = _hub_snapshot(repo, ("config.json", "model_index.json"), allow_download=allow_download)
        if (head / "model_index.json").is_file():
            sub = pipeline_subfolder
    prefix = f"{sub}/" if sub else ""

    def complete(root: Path) -> bool:
        folder = root / sub if sub else root
        has_weights = not weights or bool(ResolvedModel(spec, folder).weight_files())
        return all((folder / n).is_file() for n in require) and has_weights

    root = _hub_snapshot(repo, [prefix + p for p in patterns], complete, allow_download)
    if not complete(root):  # checkpoints without safetensors
        root = _hub_snapshot(repo, [prefix + "*.json", prefix + "*.txt", prefix + "*.bin"], complete,
                             allow_download)
    return _checked(ResolvedModel(spec, root / sub if sub else root), require, "the Hugging Face cache", weights)


def _checked(model: ResolvedModel, require: Sequence[str], where: str, weights: bool = True) -> ResolvedModel:
    missing = [name for name in require if not (model.path / name).is_file()]
    if missing:
        raise ModelUnavailable(model.spec, f"{where} does not hold a complete checkpoint: no {', '.join(missing)} "
                                           f"in {model.path}", how_to_provide(model.spec))
    if weights and not model.weight_files():
        raise ModelUnavailable(model.spec, f"{where} does not hold a complete checkpoint: no weight files "
                                           f"(*.safetensors or *.bin) in {model.path}", how_to_provide(model.spec))
    return model


def _hub_snapshot(repo: str, patterns: Sequence[str], complete: Callable[[Path], bool] = lambda p: True,
                  allow_download: bool = True) -> Path:
    """The cached snapshot of ``repo`` (only ``patterns``); the hub is asked only when allowed and needed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cached_error: BaseException | None = None
    try:
        cached = Path(snapshot_download(repo, allow_patterns=list(patterns), local_files_only=True))
        if complete(cached) or hub_offline() or not allow_download:
            return cached
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        cached_error = e
    where = f"it is not in the Hugging Face cache ({hub_cache()})"
    if hub_offline():
        raise ModelUnavailable(repo, f"{where} and downloads are switched off (HF_HUB_OFFLINE is set)",
                               how_to_provide(repo)) from cached_error
    if not allow_download:
        raise ModelUnavailable(repo, where, how_to_provide(repo)) from cached_error
    revision = _hub_revision(repo, where)
    return Path(_download(repo, patterns, revision, where))


def _hub_revision(repo: str, where: str) -> str:
    """The repo's current commit, asked with the hub client's metadata timeout (HF_HUB_ETAG_TIMEOUT)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().repo_info(repo, timeout=float(constants.HF_HUB_ETAG_TIMEOUT))
    except HfHubHTTPError as e:  # the hub answered: no such repo, gated, server error
        raise ModelUnavailable(repo, f"{where} and the hub does not serve it ({_short(e)})",
                               how_to_provide(repo)) from e
    except _network_errors() as e:
        raise ModelUnavailable(repo, f"{where} and {constants.ENDPOINT} cannot be reached to download it "
                                     f"({type(e).__name__}: {_short(e)}; HF_HUB_ETAG_TIMEOUT="
                                     f"{constants.HF_HUB_ETAG_TIMEOUT} s)", how_to_provide(repo)) from e
    return str(info.sha)


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of the HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _download(repo: str, patterns: Sequence[str], revision: str, where: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, allow_patterns=list(patterns), revision=revision)
    except _network_errors() as e:
        raise ModelUnavailable(repo, f"{where} and downloading it failed ({_short(e)})", how_to_provide(repo)) from e


def models_dir(override: str | Path | None = None) -> Path:
    """Where single-file releases live: ``override``, else ``$V2A_MODELS``, else ``~/.cache/v2a/models``."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get(MODELS_DIR_ENV) or "~/.cache/v2a/models").expanduser()


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."
