"""One output-folder lock (core.lock) for clean, encode and train: refuse at once, take over stale locks."""
import json
import os
import socket
import subprocess
import sys

import pytest

from core.lock import LOCK_NAME, FolderLock, FolderLocked


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_second_holder_refused_naming_the_first(tmp_path):
    with FolderLock(tmp_path, purpose="first run"):
        with pytest.raises(FolderLocked, match=f"PID {os.getpid()} on this host .*first run"):
            FolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with FolderLock(tmp_path):  # free again
        pass
    with FolderLock(tmp_path / "new"):  # a folder the lock made is removed again when nothing was written
        pass
    assert not (tmp_path / "new").exists()


def test_stale_lock_taken_over_only_on_this_host(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        with FolderLock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "some-other-node", "pid": _dead_pid()}))
    with pytest.raises(FolderLocked, match="host some-other-node"):
        FolderLock(tmp_path).acquire()


def test_encode_and_train_refuse_a_held_folder(tmp_path, capsys):
    from pipeline.encode import main as encode_main
    from train.__main__ import main as train_main

    ledger = tmp_path / "ledger.parquet"
    ledger.write_bytes(b"")
    with FolderLock(tmp_path / "shards", purpose="another encode"):
        assert encode_main(["--ledger", str(ledger), "--out", str(tmp_path / "shards")]) == 2
    assert "another encode" in capsys.readouterr().err
    with FolderLock(tmp_path / "run", purpose="another training"):
        assert train_main(["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "run")]) == 2
    assert "another training" in capsys.readouterr().err
