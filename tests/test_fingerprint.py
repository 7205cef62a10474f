"""Settings fingerprints (core.fingerprint): stable, order-independent, and they name what changed."""
from dataclasses import dataclass

from core.fingerprint import SettingsRegistry, differences, fingerprint


@dataclass(frozen=True)
class Knobs:
    mode: str = "fast"
    side: int = 64
    taps: tuple = (1, 2)


def test_fingerprint_is_stable_and_sees_every_change():
    a = {"av_align": Knobs(), "clap": {"model": "m", "template": "t"}}
    b = {"clap": {"template": "t", "model": "m"}, "av_align": Knobs()}
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 16
    assert fingerprint(a) != fingerprint({**a, "av_align": Knobs(taps=(1, 3))})
    assert fingerprint({"x": float("nan")}) != fingerprint({"x": None})


def test_differences_and_registry(tmp_path):
    old = {"av_align": Knobs(), "clap": None}
    new = {"av_align": Knobs(mode="reference"), "clap": {"model": "m"}}
    assert differences(old, new) == ["av_align.mode: 'fast' -> 'reference'", "clap: None -> (not set)",
                                     "clap.model: (not set) -> 'm'"]
    registry = SettingsRegistry(tmp_path / "settings.json")
    fp = registry.record(old)
    assert registry.get(fp) == {"av_align": {"mode": "fast", "side": 64, "taps": [1, 2]}, "clap": None}
    assert SettingsRegistry(tmp_path / "settings.json").get(fp) is not None and registry.get("0" * 16) is None
