"""The augmentation plan: deterministic recipes that respect the split, label and source rules."""
from __future__ import annotations

import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment.config import AugmentConfig, AugmentConfigError
from augment.plan import LedgerError, build_plan
from augment.recipe import PLAN_META_KEY, PlanError, Recipe, find_recipe, read_plan, write_plan
from pipeline.augment import main
from core.keys import is_safe

GRID = 0.5  # 2 fps feature grid


def on_grid(x: float) -> bool:
    return abs(x / GRID - round(x / GRID)) < 1e-9


def row(key, yid, label, split="train", status="ok", start=0.0, dur=10.0, fps=25.0, caption=None):
    return dict(key=key, source="vggsound", youtube_id=yid, video_path=f"/data/{key}.mp4", label=label,
                caption=caption if caption is not None else f"the sound of {label}", split=split, start_s=start,
                duration_s=dur, video_fps=fps, status=status, reason="" if status == "ok" else "clap<0.3")


def ledger() -> pd.DataFrame:
    rows = [
        row("v-dog1-000010", "dog1", "dog barking"),
        row("v-dog1-000020", "dog1", "dog barking", start=10.0),  # a second window of the same video
        row("v-dog2-000000", "dog2", "dog barking"),
        row("v-cat1-000000", "cat1", "cat meowing", fps=30.0),
        row("v-saw1-000000", "saw1", "chainsawing trees", dur=9.98),
        row("v-bird-000000", "bird", "bird chirping", split="test"),
        row("v-horn-000000", "horn", "car horn", status="filtered"),
        row("v-gone-000000", "gone", "ripping paper", status="failed"),
        row("v-short-00000", "short", "hammering", dur=4.0),
        row("v-tiny-000000", "tiny", "typing", dur=0.5),
    ]
    return pd.DataFrame(rows)


def plan_of(df: pd.DataFrame, **cfg) -> list[Recipe]:
    recipes, _ = build_plan(df, AugmentConfig(**cfg))
    return recipes


def test_plan_is_deterministic_whatever_the_row_order():
    df = ledger()
    a = [r.as_row() for r in plan_of(df, concat_per_clip=2, seed=7)]
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    b = [r.as_row() for r in plan_of(shuffled, concat_per_clip=2, seed=7)]
    assert a == b
    c = [r.as_row() for r in plan_of(df, concat_per_clip=2, seed=8)]
    assert a != c  # the seed matters


def test_only_ok_non_test_clips_are_augmented_or_used_as_partners():
    df = ledger()
    recipes = plan_of(df, concat_per_clip=3)
    bad = {"v-bird-000000", "v-horn-000000", "v-gone-000000", "v-tiny-000000"}
    used = {s.source_key for r in recipes for s in r.segments}
    assert used and not used & bad
    assert {"v-dog1-000010", "v-cat1-000000", "v-saw1-000000", "v-short-00000"} <= used
    assert all(r.split == "train" for r in recipes)


def test_concat_partners_have_other_labels_and_other_source_videos():
    df = ledger().set_index("key")
    recipes = [r for r in plan_of(ledger(), concat_per_clip=3) if r.kind == "concat"]
    assert recipes
    for r in recipes:
        a, b = (df.loc[s.source_key] for s in r.segments)
        assert a["label"] != b["label"]
        assert a["youtube_id"] != b["youtube_id"]
        assert a["split"] == b["split"] == r.split
        assert r.key == f"cat-{r.segments[0].source_key}-{r.segments[1].source_key}"
        assert r.caption == f"{a['caption']} then {b['caption']}"
        assert r.label == f"{a['label']} then {b['label']}"


def test_concat_cut_is_on_the_feature_grid_and_segments_tile_the_output():
    df = ledger().set_index("key")
    recipes = [r for r in plan_of(ledger(), concat_per_clip=3, seed=11) if r.kind == "concat"]
    cuts = set()
    for r in recipes:
        seg_a, seg_b = r.segments
        assert 2.5 <= r.cut_s <= 7.5 and on_grid(r.cut_s)
        cuts.add(r.cut_s)
        assert seg_a.dst_start_s == 0 and seg_a.src_start_s == df.loc[seg_a.source_key, "start_s"]
        assert seg_a.dst_end_s == pytest.approx(r.cut_s) == pytest.approx(seg_b.dst_start_s)
        assert seg_a.rate == seg_b.rate == 1.0
        b = df.loc[seg_b.source_key]
        assert on_grid(seg_b.src_start_s - b["start_s"])
        assert b["start_s"] <= seg_b.src_start_s and seg_b.src_end_s <= b["start_s"] + b["duration_s"] + 1e-9
        expected = r.cut_s + min(10.0 - r.cut_s, b["duration_s"])
        assert r.duration_s == pytest.approx(expected) and r.target_s == 10.0
        assert r.crossfade_s == pytest.approx(0.010)
        assert is_safe(r.key)
    assert len(cuts) > 1  # cuts are drawn, not fixed


def test_concat_span_and_crossfade_come_from_the_config():
    recipes = [r for r in plan_of(ledger(), concat_per_clip=3, concat_span=(4.0, 4.0), crossfade_ms=20)
               if r.kind == "concat"]
    assert recipes and all(r.cut_s == 4.0 and r.crossfade_s == pytest.approx(0.02) for r in recipes)


def test_stretch_recipes_per_rate_with_mapped_spans():
    df = ledger().set_index("key")
    recipes = {r.key: r for r in plan_of(ledger(), concat_per_clip=0)}
    assert all(r.kind == "stretch" for r in recipes.values())
    slow, fast = recipes["v-dog1-000020-ts080"], recipes["v-dog1-000020-ts125"]
    for r, rate in ((slow, 0.8), (fast, 1.25)):
        (seg,) = r.segments
        assert r.rate == seg.rate == rate
        assert seg.src_end_s - seg.src_start_s == pytest.approx(r.duration_s * rate)
        assert 10.0 <= seg.src_start_s and seg.src_end_s <= 20.0 + 1e-9  # inside the ledger window
        assert on_grid(seg.src_start_s - 10.0)
        # an event at source time s lands at s / r after the segment start
        assert r.map_time("v-dog1-000020", seg.src_start_s + 2.0) == pytest.approx(2.0 / rate)
    assert slow.duration_s == 10.0 and slow.video_fps == pytest.approx(25.0 * 0.8)
    # a 10 s window played 1.25x faster covers only 8 s: shorter output, valid length recorded
    assert fast.duration_s == pytest.approx(8.0) and fast.target_s == 10.0
    assert fast.segments[0].src_start_s == 10.0 and fast.video_fps == pytest.approx(31.25)
    short = recipes["v-short-00000-ts080"]
    assert short.duration_s == pytest.approx(4.0 / 0.8) and short.segments[0].src_end_s == pytest.approx(4.0)
    assert "v-tiny-000000-ts080" not in recipes and "v-bird-000000-ts080" not in recipes
    assert all(is_safe(k) and "." not in k for k in recipes)


def test_stretch_and_concat_can_be_switched_off():
    assert {r.kind for r in plan_of(ledger(), stretch_per_clip=0)} == {"concat"}
    assert {r.kind for r in plan_of(ledger(), stretch_rates=())} == {"concat"}
    assert {r.kind for r in plan_of(ledger(), concat_per_clip=0)} == {"stretch"}


def test_stretch_range_draws_quantised_rates_deterministically():
    cfg = dict(concat_per_clip=0, stretch_range=(0.7, 1.4), stretch_per_clip=3, seed=5)
    a, b = plan_of(ledger(), **cfg), plan_of(ledger(), **cfg)
    assert [r.as_row() for r in a] == [r.as_row() for r in b]
    per_clip: dict[str, list[float]] = {}
    for r in a:
        assert 0.7 <= r.rate <= 1.4 and r.rate != 1.0 and round(r.rate, 2) == r.rate
        assert r.key.endswith(f"-ts{int(round(r.rate * 100)):03d}")
        per_clip.setdefault(r.segments[0].source_key, []).append(r.rate)
    assert all(len(v) == 3 and len(set(v)) == 3 for v in per_clip.values())
    assert len({tuple(v) for v in per_clip.values()}) > 1


def test_rare_partners_are_found_and_impossible_ones_reported():
    rows = [row(f"v-dog-{i:03d}", f"dog{i}", "dog barking") for i in range(40)] + [row("v-cat-000", "cat", "cat")]
    recipes, summary = build_plan(pd.DataFrame(rows), AugmentConfig(concat_per_clip=1, stretch_rates=(0.8,)))
    concat = [r for r in recipes if r.kind == "concat"]
    assert len(concat) == 41  # every dog pairs with the only cat, the cat with a dog
    assert all("v-cat-000" in {s.source_key for s in r.segments} for r in concat)
    same = [row(f"v-dog-{i:03d}", f"dog{i}", "dog barking") for i in range(3)]
    recipes, summary = build_plan(pd.DataFrame(same), AugmentConfig(concat_per_clip=1))
    assert not [r for r in recipes if r.kind == "concat"]
    assert any("not enough partners" in k for k in summary.skipped)


def test_unlabelled_clips_are_stretched_but_never_concatenated():
    rows = [row("v-yt-a", "ytA", ""), row("v-yt-b", "ytB", ""), row("v-dog", "dog", "dog barking"),
            row("v-cat", "cat", "cat meowing")]
    recipes, summary = build_plan(pd.DataFrame(rows), AugmentConfig(concat_per_clip=3))
    concat_sources = {s.source_key for r in recipes if r.kind == "concat" for s in r.segments}
    assert concat_sources == {"v-dog", "v-cat"}
    assert {r.segments[0].source_key for r in recipes if r.kind == "stretch"} == {"v-yt-a", "v-yt-b", "v-dog", "v-cat"}
    assert summary.skipped["concat: clip has no label"] == 2


def test_ledger_errors_are_specific():
    with pytest.raises(LedgerError, match="lacks columns .*youtube_id"):
        build_plan(ledger().drop(columns=["youtube_id"]), AugmentConfig())
    dup = pd.concat([ledger(), ledger().head(1)])
    with pytest.raises(LedgerError, match="duplicate keys"):
        build_plan(dup, AugmentConfig())


@pytest.mark.parametrize("cfg, match", [
    (dict(stretch_rates=(0.8, 1.0)), "differ from 1"),
    (dict(stretch_rates=(3.0,)), r"\[0.5, 2.0\]"),
    (dict(stretch_range=(1.2, 0.9)), "LO < HI"),
    (dict(concat_span=(2.6, 2.9)), "no point of the 2.0 fps"),
    (dict(concat_span=(2.5, 12.0)), "before the output length"),
    (dict(stretch_method="pvoc"), "stretch_method"),
])
def test_bad_config_is_rejected(cfg, match):
    with pytest.raises(AugmentConfigError, match=match):
        AugmentConfig(**cfg)


def test_plan_file_round_trip_with_parameters(tmp_path):
    recipes, _ = build_plan(ledger(), AugmentConfig(concat_per_clip=1, seed=3))
    path = write_plan(tmp_path / "plan.parquet", recipes, {"config": AugmentConfig(seed=3).to_json()})
    table = pq.read_table(path)
    assert table.schema.field("segments").type == pa.list_(pa.struct([
        ("source_key", pa.string()), ("video_path", pa.string()), ("src_start_s", pa.float64()),
        ("src_end_s", pa.float64()), ("dst_start_s", pa.float64()), ("rate", pa.float64())]))
    assert json.loads(table.schema.metadata[PLAN_META_KEY])["config"]["seed"] == 3
    plan, meta = read_plan(path)
    assert [Recipe.from_row(r) for r in plan.to_dict("records")] == recipes
    assert find_recipe(plan, recipes[0].key) == recipes[0]
    with pytest.raises(PlanError, match="no recipe 'nope'"):
        find_recipe(plan, "nope")


def good_row() -> dict:
    return plan_of(ledger(), concat_per_clip=1)[0].as_row()


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.update(key="a.b"), "key must be"),
    (lambda r: r.update(kind="mixup"), "kind must be one of"),
    (lambda r: r.update(segments=[]), "segments must be a non-empty list"),
    (lambda r: r["segments"][1].update(dst_start_s=r["segments"][1]["dst_start_s"] + 0.5), "must tile"),
    (lambda r: r["segments"][0].update(rate=0.0), "rate 0.0 is outside"),
    (lambda r: r["segments"][0].update(src_end_s=-1.0), "empty or negative"),
    (lambda r: r["segments"][0].pop("video_path"), "lacks video_path"),
    (lambda r: r["segments"][0].update(src_start_s=float("nan")), "src_start_s must be a finite number"),
    (lambda r: r.update(duration_s=3.0), "does not match the segments"),
    (lambda r: r.update(stretch_method="pvoc"), "stretch_method must be"),
])
def test_malformed_recipes_get_clear_errors(mutate, match):
    r = good_row()
    assert r["kind"] == "concat"
    mutate(r)
    with pytest.raises(PlanError, match=match):
        Recipe.from_row(r)


def test_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match="plan file not found"):
        read_plan(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(PlanError, match="not a readable parquet plan"):
        read_plan(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(PlanError, match="missing columns kind"):
        read_plan(tmp_path / "other.parquet")


def test_cli_plan_writes_the_same_plan_on_rerun(tmp_path, capsys):
    lpath = tmp_path / "ledger.parquet"
    ledger().to_parquet(lpath)
    args = ["plan", "--ledger", str(lpath), "--concat-per-clip", "2", "--stretch-range", "0.8:1.2", "--seed", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "concat" in out and "stretch" in out and str(tmp_path / "plan.parquet") in out
    first = pq.read_table(tmp_path / "plan.parquet")
    assert main(args + ["--out", str(tmp_path / "again.parquet")]) == 0
    again = pq.read_table(tmp_path / "again.parquet")
    assert first.equals(again)
    meta = json.loads(first.schema.metadata[PLAN_META_KEY])
    assert meta["config"]["seed"] == 4 and meta["config"]["stretch_range"] == [0.8, 1.2]
    assert meta["counts"]["concat"] == sum(1 for k in first.column("kind").to_pylist() if k == "concat")
    rates = [r for r in first.column("rate").to_pylist() if r is not None and not math.isnan(r)]
    assert rates and all(0.8 <= r <= 1.2 for r in rates)


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["plan", "--ledger", str(tmp_path / "none.parquet")]) == 2
    assert "ledger not found" in capsys.readouterr().err
    lpath = tmp_path / "ledger.parquet"
    ledger().to_parquet(lpath)
    assert main(["plan", "--ledger", str(lpath), "--stretch-rates", "0.8,1"]) == 2
    assert "differ from 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--ledger", str(lpath), "--stretch-rates", "0.8", "--stretch-range", "0.8:1.2"])


def test_plan_format_and_column_types_are_checked(tmp_path):
    recipes, _ = build_plan(ledger(), AugmentConfig(concat_per_clip=1))
    path = write_plan(tmp_path / "plan.parquet", recipes, {"config": {}})
    table = pq.read_table(path)
    assert json.loads(table.schema.metadata[PLAN_META_KEY])["format"] == "v2a-plan/1"
    newer = table.replace_schema_metadata({PLAN_META_KEY: json.dumps({"format": "v2a-plan/2"}).encode()})
    pq.write_table(newer, tmp_path / "newer.parquet")
    with pytest.raises(PlanError, match="format 'v2a-plan/2'"):
        read_plan(tmp_path / "newer.parquet")
    legacy = table.replace_schema_metadata({PLAN_META_KEY: json.dumps({"config": {}}).encode()})
    pq.write_table(legacy, tmp_path / "legacy.parquet")  # written before plans carried a format
    assert len(read_plan(tmp_path / "legacy.parquet")[0]) == len(recipes)
    i = table.schema.get_field_index("duration_s")
    typed = table.set_column(i, "duration_s", pa.array([str(v) for v in table["duration_s"].to_pylist()]))
    pq.write_table(typed, tmp_path / "typed.parquet")
    with pytest.raises(PlanError, match="duration_s: string"):
        read_plan(tmp_path / "typed.parquet")
