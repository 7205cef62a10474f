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
