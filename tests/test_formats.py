"""docs/formats.md: the safe stock-WebDataset decoder list it shows never unpickles a member."""
from __future__ import annotations

import collections
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def _safe_decoders_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith("# safe decoders")]
    assert len(found) == 1, "docs/formats.md must show exactly one '# safe decoders' block"
    return found[0]


def _untrusted_shard(folder: Path, extra: dict[str, bytes]) -> None:
    """A shard as an attacker could publish it: valid members plus pickles."""
    flac = io.BytesIO()
    sf.write(flac, np.zeros(1600, np.float32), 16000, format="FLAC")
    clip = io.BytesIO()
    np.save(clip, np.ones((2, 4), np.float16), allow_pickle=False)
    members = {"json": b'{"key": "k0"}', "clip.npy": clip.getvalue(), "audio.flac": flac.getvalue(), **extra}
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"k0.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / "index.json").write_text(json.dumps({"shards": [{"name": "train-000000.tar"}]}))


def _read(folder: Path, block: str):
    scope = {"folder": str(folder)}
    exec(compile(block, str(DOC), "exec"), scope)  # the documented code, as a user would run it
    return list(scope["dataset"])


def test_documented_decoders_leave_pickles_as_bytes(tmp_path):
    import webdataset as wds

    payload = pickle.dumps(collections.OrderedDict(unpickled=True))
    _untrusted_shard(tmp_path, {"evil.pyd": payload, "evil.pickle": payload})
    stock = list(wds.WebDataset([str(tmp_path / "train-000000.tar")], shardshuffle=False).decode())
    assert isinstance(stock[0]["evil.pyd"], collections.OrderedDict)  # the default decoder does unpickle

    [sample] = _read(tmp_path, _safe_decoders_block())
    assert sample["evil.pyd"] == payload and sample["evil.pickle"] == payload  # left as bytes
    assert sample["json"] == {"key": "k0"}
    assert sample["clip.npy"].dtype == np.float16 and sample["clip.npy"].shape == (2, 4)
    audio, sr = sample["audio.flac"]
    assert sr == 16000 and audio.shape == (1600,)


def test_documented_decoders_refuse_a_pickled_npy(tmp_path):
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _untrusted_shard(tmp_path, {"clip.npy": obj.getvalue()})
    with pytest.raises(Exception) as err:  # webdataset wraps it in its DecodingError
        _read(tmp_path, _safe_decoders_block())
    assert isinstance(err.value.__cause__, ValueError) and "allow_pickle" in str(err.value.__cause__)
