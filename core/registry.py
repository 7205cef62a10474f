"""The offline model registry: every model the project can use, where it comes from, what it holds.

``core/registry.json`` is the one list (hub id or release URL, expected files, sha256 where
published); the default model ids of every command come from it. ``python -m core.registry
check`` says which models are present and where it looked; ``python -m core.registry table``
prints the Markdown table of docs/models.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from core.models import (ModelUnavailable, ResolvedModel, file_sha256, hub_cache, hub_offline, models_dir,
                         resolve_pretrained)

REGISTRY_FILE = Path(__file__).with_name("registry.json")


@dataclass(frozen=True)
class ReleaseFile:
    name: str
    url: str
    sha256: str | None = None
    sha256_prefix: str | None = None

    def hash_ok(self, digest: str) -> bool:
        if self.sha256:
            return digest == self.sha256
        return digest.startswith(self.sha256_prefix) if self.sha256_prefix else True


@dataclass(frozen=True)
class ModelEntry:
    """One model: a hub repo (``kind="hub"``) or single release files (``kind="release"``)."""

    name: str
    title: str
    kind: str
    used_by: tuple[str, ...]
    flag: str
    hub: str = ""
    subfolder: str = ""
    files: tuple = ()
    weights: tuple[str, ...] = ()
    release: tuple[ReleaseFile, ...] = field(default=())

    @property
    def spec(self) -> str:
        """The default spec commands use: ``owner/name[/subfolder]`` or the release file name."""
        if self.kind == "hub":
            return f"{self.hub}/{self.subfolder}" if self.subfolder else self.hub
        return self.release[0].name

    @property
    def source(self) -> str:
        if self.kind == "hub":
            return f"https://huggingface.co/{self.hub}" + (f" ({self.subfolder}/)" if self.subfolder else "")
        return ", ".join(f.url for f in self.release)


def _entry(raw: dict) -> ModelEntry:
    common = dict(name=raw["name"], title=raw["title"], kind=raw["kind"], used_by=tuple(raw["used_by"]),
                  flag=raw["flag"])
    if raw["kind"] == "hub":
        return ModelEntry(**common, hub=raw["hub"], subfolder=raw.get("subfolder", ""),
                          files=tuple(raw["files"]), weights=tuple(raw["weights"]))
    if raw["kind"] != "release":
        raise ValueError(f"{REGISTRY_FILE}: model {raw['name']!r} has unknown kind {raw['kind']!r}")
    release = tuple(ReleaseFile(f["name"], f["url"], f.get("sha256"), f.get("sha256_prefix")) for f in raw["files"])
    return ModelEntry(**common, release=release)


@lru_cache(maxsize=1)
def entries() -> dict[str, ModelEntry]:
    raw = json.loads(REGISTRY_FILE.read_text())["models"]
    out = {r["name"]: _entry(r) for r in raw}
    if len(out) != len(raw):
        raise ValueError(f"{REGISTRY_FILE}: duplicate model names")
    return out


def entry(name: str) -> ModelEntry:
    try:
        return entries()[name]
    except KeyError:
        raise KeyError(f"no model {name!r} in the registry ({', '.join(entries())})") from None


def default_spec(name: str) -> str:
    """The default model id a command uses for registry model ``name`` (defined only in registry.json)."""
    return entry(name).spec


def resolve_release(name: str, path: str | Path | None = None, models_root: str | Path | None = None,
                    verify: bool = True) -> ResolvedModel:
    """The first release file of model ``name``: at ``path`` when given, else ``MODELS_DIR/name/FILE``.

    With ``verify`` a file that carries its release name is checked against the registry's sha256
    (or the sha256 prefix torch.hub release names carry) where the registry knows it; a file under
    another name is the user's own (its sha256 goes into the run's records). The other files of a
    release must sit beside the first.
    """
    e = entry(name)
    first = Path(path).expanduser() if path else models_dir(models_root) / e.name / e.release[0].name
    wanted = [first] + [first.with_name(f.name) for f in e.release[1:]]
    for file, rel in zip(wanted, e.release):
        if not file.is_file():
            raise ModelUnavailable(e.name, f"no file {file}", release_how(e))
        if verify and file.name == rel.name and (rel.sha256 or rel.sha256_prefix):
            digest = file_sha256(file)
            if not rel.hash_ok(digest):
                raise ModelUnavailable(e.name, f"{file} has sha256 {digest}, the release has "
                                               f"{rel.sha256 or rel.sha256_prefix + '...'}", release_how(e))
    return ResolvedModel(e.name, first)


def release_how(e: ModelEntry) -> str:
    files = "\n".join(f"       {f.url}" for f in e.release)
    return (f"Provide it: download on a machine with network\n{files}\n  and copy the file(s) to "
            f"{models_dir() / e.name}/ (or set --models-dir / V2A_MODELS" + (f", or pass {e.flag} PATH)." if e.flag else ")."))


@dataclass(frozen=True)
class CheckResult:
    name: str
    present: bool
    where: str
    detail: str


def check_one(e: ModelEntry, models_root: str | Path | None = None, hashes: bool = False) -> CheckResult:
    """Whether model ``e`` can be loaded here with no network (the hub is never asked)."""
    if e.kind == "release":
        where = str(models_dir(models_root) / e.name)
        try:
            found = resolve_release(e.name, models_root=models_root, verify=True)
        except ModelUnavailable as err:
            return CheckResult(e.name, False, where, err.cause)
        detail = ", ".join(f"{p.name} sha256 {file_sha256(p)}" for p in found.weight_files()) if hashes else "ok"
        return CheckResult(e.name, True, where, detail)
    where = f"Hugging Face cache {hub_cache()}"
    try:
        found = _cached_only(e)
    except ModelUnavailable as err:
        return CheckResult(e.name, False, where, err.cause)
    missing = [f for f in e.files if not (found.path / f).is_file()]
    if missing:
        return CheckResult(e.name, False, str(found.path), f"incomplete: no {', '.join(missing)}")
    detail = ", ".join(f"{k} sha256 {v}" for k, v in found.weight_hashes().items()) if hashes else "ok"
    return CheckResult(e.name, True, str(found.path), detail)


def _cached_only(e: ModelEntry) -> ResolvedModel:
    """Resolve a hub entry from the cache alone: the check must never wait on a network. An entry with
    no weights (a tokenizer) needs only its files."""
    if not e.weights:
        return resolve_pretrained(e.spec, require=e.files, allow_download=False, weights=False)
    return resolve_pretrained(e.spec, allow_download=False)


def check(names: list[str] | None = None, models_root: str | Path | None = None,
          hashes: bool = False) -> list[CheckResult]:
    return [check_one(entry(n), models_root, hashes) for n in (names or list(entries()))]


def require(needed: dict[str, str | None], models_root: str | Path | None = None) -> dict[str, ResolvedModel]:
    """Resolve every release model a command needs (name -> explicit path or None) before any work.

    Raises one ``ModelUnavailable`` naming every missing model at once.
    """
    found, problems = {}, []
    for name, path in needed.items():
        try:
            found[name] = resolve_release(name, path, models_root)
        except ModelUnavailable as e:
            problems.append(f"  - {name}: {e.cause}\n    {release_how(entry(name))}")
    if problems:
        raise ModelUnavailable(", ".join(n for n in needed if n not in found),
                               f"{len(problems)} model(s) missing\n" + "\n".join(problems))
    return found


def table() -> str:
    """The Markdown table of docs/models.md ("providing the weights offline")."""
    lines = ["| name | model | source | files | where it is looked for | used by |",
             "|---|---|---|---|---|---|"]
    for e in entries().values():
        if e.kind == "hub":
            files = ", ".join(e.files) + (" + " + " or ".join(e.weights) if e.weights else " (no weights)")
            where = (f"`{e.flag} FOLDER`, else " if e.flag else "") + f"the HF cache (`{e.spec}`)"
        else:
            files = ", ".join(f.name + (f" (sha256 {f.sha256})" if f.sha256 else
                                        f" (sha256 {f.sha256_prefix}...)" if f.sha256_prefix else "")
                              for f in e.release)
            where = (f"`{e.flag} FILE`, else " if e.flag else "") + f"`$V2A_MODELS/{e.name}/`"
        lines.append(f"| `{e.name}` | {e.title} | {e.source} | {files} | {where} | {'; '.join(e.used_by)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="which models are present here, and where it looked (never downloads)")
    chk.add_argument("names", nargs="*", help="models to check (default: all)")
    chk.add_argument("--models-dir", default=None, help="folder of release files (default $V2A_MODELS or "
                                                        "~/.cache/v2a/models)")
    chk.add_argument("--hashes", action="store_true", help="print the sha256 of every weight file found")
    sub.add_parser("table", help="print the Markdown table of docs/models.md")
    args = parser.parse_args(argv)
    if args.command == "table":
        sys.stdout.write(table())
        return 0
    try:
        results = check(args.names or None, args.models_dir, args.hashes)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"models folder: {models_dir(args.models_dir)}   Hugging Face cache: {hub_cache()}"
          f"   HF_HUB_OFFLINE: {hub_offline()}")
    for r in results:
        print(f"{'present' if r.present else 'MISSING':8s} {r.name:18s} {r.where}\n{'':27s}{r.detail}")
    missing = [r.name for r in results if not r.present]
    print(f"{len(results) - len(missing)} of {len(results)} present" + (f"; missing: {', '.join(missing)}"
                                                                           if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
