"""Shared fixtures: the generated sample dataset (made once per session) and the real clips."""
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "data" / "vggsound"


@pytest.fixture(scope="session")
def real_clips_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The bundled synthetic VGGSound-layout dataset (aligned, shifted, static and broken clips)."""
    from pipeline.sample import generate

    root = tmp_path_factory.mktemp("sample") / "vggsound"
    generate(root, kind="vggsound", seed=0)
    return root


@pytest.fixture(scope="session")
def youtube_root(tmp_path_factory) -> Path:
    from pipeline.sample import generate

    root = tmp_path_factory.mktemp("sample_youtube") / "youtube"
    generate(root, kind="youtube", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_clap_dir(tmp_path_factory) -> Path:
    """A tiny random-weight CLAP checkpoint saved with save_pretrained (no download)."""
    from clap_fixture import build_tiny_clap

    return build_tiny_clap(tmp_path_factory.mktemp("clap"))


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    """One S3 server (moto's server mode) on loopback for every module that uses object storage;
    each module works in a bucket of its own."""
    from cluster_fixtures import s3_server

    with s3_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture(scope="session")
def sample_clean_local(sample_root, tmp_path_factory):
    """The local runner's ledger of the sample's first items (``sample_clean_args``): the reference
    the Ray-cluster and Beam portable-runner runs must reproduce, made once."""
    import contextlib
    import io

    from cluster_fixtures import sample_clean_args
    from pipeline.clean import main
    from pipeline.ledger import read_ledger

    out = tmp_path_factory.mktemp("clean-local")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(sample_clean_args(sample_root, out, "--workers", "1")) == 0
    return read_ledger(out / "ledger.parquet")[0]
