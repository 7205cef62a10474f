"""The one model resolver and the offline registry: where models are looked for, what a missing one says."""
from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core import registry
from core.models import ModelUnavailable, resolve_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    """An empty HF cache and a hub that refuses connections (the discard port on loopback)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hub"


def _cached_repo(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache entry laid out as the hub client writes it (refs/main -> snapshots/<sha>)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)
    snap = base / "snapshots" / sha
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    return snap


def test_local_folder_and_missing_path(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"x")
    assert resolve_pretrained(str(tmp_path / "m")).path == (tmp_path / "m").resolve()
    with pytest.raises(ModelUnavailable, match="no such folder") as info:
        resolve_pretrained(str(tmp_path / "nowhere"))
    assert "hf download" in str(info.value) and "core.registry check" in str(info.value)
    with pytest.raises(ModelUnavailable, match="no weight files"):
        (tmp_path / "cfg_only").mkdir()
        (tmp_path / "cfg_only" / "config.json").write_text("{}")
        resolve_pretrained(str(tmp_path / "cfg_only"))


def test_hub_id_is_found_in_the_cache_without_network(empty_hub):
    snap = _cached_repo(empty_hub, "v2a-tests/pipe", {"vae/config.json": b"{}", "vae/model.safetensors": b"w",
                                                      "model_index.json": b"{}"})
    assert resolve_pretrained("v2a-tests/pipe/vae").path == snap / "vae"
    assert resolve_pretrained("v2a-tests/pipe", pipeline_subfolder="vae").path == snap / "vae"
    assert resolve_pretrained("v2a-tests/pipe/vae", allow_download=False).path == snap / "vae"


def test_not_cached_offline_says_so_without_asking(empty_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set") as info:
        resolve_pretrained("v2a-tests/absent")
    assert "not in the Hugging Face cache" in str(info.value) and "hf download v2a-tests/absent" in str(info.value)


def test_hub_that_never_answers_fails_within_the_hub_clients_timeout(empty_hub, monkeypatch):
    """A hub that accepts and then hangs (a dropped network) must end in the client's own timeout."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(server.accept()[0]) for _ in range(8)], daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    try:
        with pytest.raises(ModelUnavailable, match="cannot be reached") as info:
            resolve_pretrained("v2a-tests/hanging")
        assert "HF_HUB_ETAG_TIMEOUT=1" in str(info.value)
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_hub_that_answers_no_such_repo_is_not_called_unreachable(empty_hub, monkeypatch):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(ModelUnavailable, match="the hub does not serve it") as info:
            resolve_pretrained("v2a-tests/not-there")
        assert "cannot be reached" not in str(info.value)
    finally:
        server.shutdown()


def test_registry_lists_every_model_the_project_uses():
    names = set(registry.entries())
    assert {"clap", "clip", "audioldm_vae", "audioldm_vocoder", "panns_cnn14_16k", "vggish", "passt",
            "synchformer", "imagebind", "cavp", "msclap"} <= names
    for e in registry.entries().values():
        assert e.source.startswith("https://") and e.used_by
        # a model a command loads has that command's flag; one no command uses yet has none
        implemented = not all("not yet implemented" in u for u in e.used_by)
        assert e.flag.startswith("--") if implemented else e.flag == "", e.name
        assert (e.files and (e.weights or "tokenizer only" in e.title)) if e.kind == "hub" else e.release
    # the default ids of the commands come from the registry
    from filters.clap import ClapConfig
    from shards.config import EncoderConfig
    from train.config import SamplerConfig

    assert ClapConfig().model == "laion/clap-htsat-unfused"
    assert (EncoderConfig().clip_model, EncoderConfig().vae) == ("openai/clip-vit-large-patch14",
                                                                 "cvssp/audioldm-s-full-v2/vae")
    assert SamplerConfig().vocoder == "cvssp/audioldm-s-full-v2/vocoder"


def _release(tmp_path: Path, name: str) -> Path:
    e = registry.entry(name)
    folder = tmp_path / "models" / name
    folder.mkdir(parents=True)
    for f in e.release:
        (folder / f.name).write_bytes(b"weights of " + f.name.encode())
    return folder / e.release[0].name


def test_release_file_found_in_models_dir_and_hash_checked(tmp_path, monkeypatch):
    first = _release(tmp_path, "panns_cnn14_16k")
    found = registry.resolve_release("panns_cnn14_16k", models_root=tmp_path / "models")
    assert found.path == first and found.weight_files() == [first]
    # VGGish's release names carry the sha256 prefix (torch.hub convention): fake bytes must be refused
    _release(tmp_path, "vggish")
    with pytest.raises(ModelUnavailable, match="has sha256") as info:
        registry.resolve_release("vggish", models_root=tmp_path / "models")
    assert "10086976" in str(info.value)
    with pytest.raises(ModelUnavailable, match="no file"):
        registry.resolve_release("passt", models_root=tmp_path / "models")


def test_require_names_every_missing_model_at_once(tmp_path):
    _release(tmp_path, "panns_cnn14_16k")
    with pytest.raises(ModelUnavailable) as info:
        registry.require({"panns_cnn14_16k": None, "passt": None, "synchformer": None}, tmp_path / "models")
    message = str(info.value)
    assert "2 model(s) missing" in message and "passt" in message and "synchformer" in message
    assert "https://github.com/kkoutini/PaSST/releases" in message and "--passt-weights" in message


def test_check_command_says_what_is_present_and_where_it_looked(tmp_path):
    _release(tmp_path, "panns_cnn14_16k")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "core.registry", "check", "--models-dir", str(tmp_path / "models")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert str(tmp_path / "models") in lines[0] and str(tmp_path / "hf") in lines[0]
    for name in registry.entries():
        status = "present" if name == "panns_cnn14_16k" else "MISSING"
        assert any(line.startswith(status) and f" {name} " in line for line in lines), (name, out.stdout)
    assert f"1 of {len(registry.entries())} present" in out.stdout
    ok = subprocess.run([sys.executable, "-m", "core.registry", "check", "panns_cnn14_16k", "--hashes",
                         "--models-dir", str(tmp_path / "models")], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=120)
    digest = hashlib.sha256(b"weights of Cnn14_16k_mAP=0.438.pth").hexdigest()
    assert ok.returncode == 0 and digest in ok.stdout


def test_docs_models_table_is_generated_from_the_registry():
    text = (ROOT / "docs" / "models.md").read_text()
    assert registry.table() in text, "docs/models.md is stale: regenerate with python -m core.registry table"
