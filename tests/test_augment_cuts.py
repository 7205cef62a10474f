"""Concat and stretch recipes know the real scene cuts of their sources (ledger ``scene_cuts``)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from augment.config import AugmentConfig, AugmentConfigError
from augment.plan import build_plan
from augment.recipe import Recipe, read_plan, write_plan
from shards.encode_stage import sample_json
from test_augment_plan import ledger

# seconds from each window's start (clean's scene_cuts); the windows of v-dog1-000020 start at 10 s
CUTS = {"v-dog1-000020": [3.0], "v-dog2-000000": [6.5], "v-cat1-000000": [1.0, 8.0], "v-saw1-000000": [2.0]}


def cut_ledger():
    df = ledger()
    df["scene_cuts"] = [CUTS.get(k, []) for k in df["key"]]
    return df


def played_cuts(recipe: Recipe, df) -> list[float]:
    """What the test expects: every source cut strictly inside a played span, in output seconds."""
    out = []
    for seg in recipe.segments:
        start = float(df.loc[seg.source_key, "start_s"])
        for c in CUTS.get(seg.source_key, []):
            if seg.src_start_s + 1e-9 < start + c < seg.src_end_s - 1e-9:
                out.append(seg.to_output(start + c))
    return out


def test_avoid_plays_no_real_cut_in_a_concat():
    df = cut_ledger().set_index("key")
    recipes, summary = build_plan(cut_ledger(), AugmentConfig(concat_per_clip=3, seed=5))
    concat = [r for r in recipes if r.kind == "concat"]
    assert concat and all(played_cuts(r, df) == [] and r.real_cuts_s == () for r in concat)
    for r in concat:
        if r.segments[0].source_key == "v-dog1-000020":  # A's real cut at 3 s: the synthetic cut comes first
            assert r.cut_s <= 3.0
    assert summary.skipped["concat: a real scene cut before the earliest cut (--real-cuts avoid)"] == 2  # cat, saw
    # a stretch cannot avoid its clip's own cut: it records it where the output plays it
    slow = next(r for r in recipes if r.key == "v-dog1-000020-ts080")
    assert slow.real_cuts_s == pytest.approx(played_cuts(slow, df)) and len(slow.real_cuts_s) == 1
    assert summary.with_real_cuts == sum(1 for r in recipes if r.real_cuts_s) > 0


def test_cut_free_sources_plan_exactly_as_before():
    plain, _ = build_plan(ledger(), AugmentConfig(concat_per_clip=2, seed=9))
    none_cut = ledger().assign(scene_cuts=[[] for _ in range(len(ledger()))])
    same, _ = build_plan(none_cut, AugmentConfig(concat_per_clip=2, seed=9))
    assert [r.as_row() for r in same] == [r.as_row() for r in plain]


def test_record_keeps_the_pairs_and_lists_the_real_cuts_with_the_synthetic_one():
    df = cut_ledger().set_index("key")
    recipes, summary = build_plan(cut_ledger(), AugmentConfig(concat_per_clip=3, seed=5, real_cuts="record"))
    concat = [r for r in recipes if r.kind == "concat"]
    assert not any("real" in reason for reason in summary.skipped)
    for r in concat:
        assert list(r.real_cuts_s) == pytest.approx(played_cuts(r, df))
        assert all(c != pytest.approx(r.cut_s) for c in r.real_cuts_s)
    assert sum(1 for r in concat if r.real_cuts_s) >= 2
    with pytest.raises(AugmentConfigError, match="real_cuts"):
        AugmentConfig(real_cuts="ignore")


def test_real_cuts_survive_the_plan_file_and_reach_the_sample_json(tmp_path):
    recipes, _ = build_plan(cut_ledger(), AugmentConfig(concat_per_clip=3, seed=5, real_cuts="record"))
    path = write_plan(tmp_path / "plan.parquet", recipes, {})
    plan, _ = read_plan(path)
    back = [Recipe.from_row(r) for r in plan.to_dict("records")]
    assert back == recipes
    with_cut = next(r for r in back if r.kind == "concat" and r.real_cuts_s)
    meta = json.loads(sample_json({**with_cut.as_row(), "status": ""}, 20, 16000, 16000))
    assert meta["real_cuts_s"] == pytest.approx(list(with_cut.real_cuts_s))
    assert meta["augmentation"]["cut_s"] == with_cut.cut_s  # the synthetic cut, told apart
    clip = json.loads(sample_json({"key": "v-cat1-000000", "scene_cuts": [1.0, 8.0]}, 20, 16000, 16000))
    assert clip["real_cuts_s"] == [1.0, 8.0] and clip["augmentation"] is None
    assert json.loads(sample_json({"key": "x"}, 20, 16000, 16000))["real_cuts_s"] is None
    # a plan written before real_cuts_s existed still reads: no real cut recorded
    old = tmp_path / "old.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop(["real_cuts_s"]).replace_schema_metadata(table.schema.metadata), old)
    assert all(Recipe.from_row(r).real_cuts_s == () for r in read_plan(old)[0].to_dict("records"))
