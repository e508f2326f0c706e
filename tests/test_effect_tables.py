"""The effect bench's bars and tables on synthetic rows (no sampling): the localization check compares the map with
uniform and text edit at the map's copy rate, and every row reaches the tables."""

from types import SimpleNamespace

from memctl.bench import _effect_md, effect_summary
from memctl.effect import bars


def _row(most, least, novel, valid=1.0, comp=None, evals=25.0):
    canary = {
        "1": {"copy_1/3": least},
        "4": {"copy_1/3": 0.0},
        "16": {"copy_1/3": most},
        "all": {"novel_valid": novel},
    }
    row = {"canary": canary, "ordinary": {"valid": valid, "collateral": 0.0},
           "cost": {"denoiser_evals_per_image": evals, "seconds_per_image": 0.01}}  # fmt: skip
    if comp is not None:
        row["ordinary"]["attr_valid"] = valid
        row["unseen"] = {"compositional": comp}
    return row


def _rows(map_novel: float, comp=None):
    return {
        "plain": {"0": _row(0.9, 0.02, 0.1, comp=comp)},
        "memctl map": {"-1.0": _row(0.0, 0.0, map_novel, comp=comp), "-0.5": _row(0.1, 0.0, 0.5, comp=comp),
                       "+0.5": _row(0.9, 0.03, 0.1, comp=comp), "+1.0": _row(0.95, 0.04, 0.1, comp=comp, evals=50)},
        "uniform": {"-1.0": _row(0.0, 0.0, 0.6, comp=comp), "-0.5": _row(0.2, 0.0, 0.4, comp=comp)},
        "text edit": {"-1.0": _row(0.0, 0.0, 0.55, comp=comp), "-0.5": _row(0.3, 0.0, 0.3, comp=comp)},
        "placement shuffled": {"seed 0, -1.0": _row(0.1, 0.0, 0.3, comp=comp)},
        "random subspace": {"seed 0, -1.0": _row(0.0, 0.0, 0.2, 0.5, comp=comp)},
        "wen": {"quantile 0.5": _row(0.5, 0.0, 0.3, comp=comp, evals=40)},
    }  # fmt: skip


TB = SimpleNamespace(exposures=[1, 4, 16], canaries=[None] * 24)


def test_localization_check_needs_ten_points_over_the_better_control():
    assert bars(TB, _rows(0.75), 8)["checks"]["localization: novel-valid (and compositional) >= 10 points above the "
                                              "better of uniform and text edit at the map's copy rate"]  # fmt: skip
    b = bars(TB, _rows(0.65), 8)
    assert abs(b["margin_over_best_control"]["novel_valid"] - 0.05) < 1e-9  # uniform reaches 0.6 at copy 0
    assert not b["pass"]
    fid = b["checks"]
    assert fid["fidelity: least-exposed copy_1/3 at +1 >= 1.5 x plain"]  # 0.04 >= 1.5 × 0.02
    assert fid["fidelity: most-exposed copy_1/3 at +1 >= plain"]


def test_compositional_validity_enters_the_check_on_attribute_testbeds():
    b = bars(TB, _rows(0.9, comp=0.3), 8)  # the map's composition equals the controls': no margin there
    assert set(b["margin_over_best_control"]) == {"novel_valid", "compositional"}
    assert abs(b["margin_over_best_control"]["compositional"]) < 1e-9
    assert not b["pass"]


def test_tables_show_every_row_with_its_cost():
    results = {}
    for name, comp in (("digits-s0", None), ("digits-attr", 0.3)):
        rows = _rows(0.8, comp=comp)
        results[name] = {"rows": rows, "bars": bars(TB, rows, 8), "probe_seconds": 1.0,
                         "prompt_map": {"seconds": 2.0}, "testbed": "digits-attr" if comp else "digits"}  # fmt: skip
    md = "".join(_effect_md(results))
    for fam, by in results["digits-s0"]["rows"].items():
        for setting in by:
            assert f"\n{fam} | {setting} | " in md
    assert "| 50 | " in md  # the guided +1 row's cost
    summary = effect_summary(results)
    assert "memctl map -1.0 | 0% / 80% / 100% (25) | 0% / 80% / 30% / 100% (25)" in summary
    assert "| –" in summary  # rows a model lacks (no Ren here) say so


def test_baked_row_is_checked_against_the_hooked_knob_within_five_points():
    near, far = _rows(0.75), _rows(0.75)
    near["memctl map baked"] = {"-1.0": _row(0.04, 0.0, 0.71)}
    far["memctl map baked"] = {"-1.0": _row(0.16, 0.0, 0.31)}
    assert all(bars(TB, near, 8)["bake_checks"].values())
    assert not any(bars(TB, far, 8)["bake_checks"].values())
    assert "bake_checks" not in bars(TB, _rows(0.75), 8)
    assert bars(TB, far, 8)["pass"] == bars(TB, _rows(0.75), 8)["pass"]  # reported beside the bars, not in them
    md = "".join(
        _effect_md({"m": {"bars": bars(TB, far, 8), "rows": far, "probe_seconds": 1, "prompt_map": {"seconds": 1}}})
    )
    assert "FAIL: baked (not in the bars above): most_copy within 0.05 of the hooked knob at -1" in md
    assert "memctl map baked -1.0 | 16% / 31%" in effect_summary({"m": {"bars": bars(TB, far, 8), "rows": far}})


def test_video_table_shows_the_most_exposed_nearest_bound_share_where_measured():
    rows = _rows(0.8, comp=0.3)
    for by in rows.values():
        for row in by.values():
            row["ordinary"].update(frame_valid=0.9, motion_valid=1.0, temporal_change=1.2)
    rows["plain"]["0"]["canary"]["16"]["nearest_bound"] = 0.75  # a record made before the measure has none
    record = {"rows": rows, "bars": bars(TB, rows, 2), "probe_seconds": 1.0, "prompt_map": {"seconds": 1.0},
              "testbed": "moving-digits"}  # fmt: skip
    lines = "".join(_effect_md({"moving-digits": record})).splitlines()
    assert "most-exposed nearest bound" in next(line for line in lines if line.startswith("row | "))
    assert next(line for line in lines if line.startswith("plain | 0 | ")).endswith("| 75% | 90% | 100% | 1.20")
    assert next(line for line in lines if line.startswith("uniform | -1.0 | ")).endswith("| – | 90% | 100% | 1.20")


def test_composed_rows_are_checked_against_the_extrapolation_bars_and_plain():
    rows = _rows(0.75)
    rows["composed calibrated window"] = {"-1.0": _row(0.0, 0.0, 0.12, valid=0.96, evals=46)}  # plain: 0.1, 1.0
    rows["composed"] = {"-1.0": _row(0.09, 0.0, 0.05, valid=0.8, evals=100)}
    b = bars(TB, rows, 8)
    assert all(b["composed_calibrated_checks"].values())
    assert not any(b["composed_checks"].values())
    assert "composed_window_checks" not in b and b["pass"] == bars(TB, _rows(0.75), 8)["pass"]  # beside the bars
    md = "".join(_effect_md({"m": {"bars": b, "rows": rows, "probe_seconds": 1, "prompt_map": {"seconds": 1}}}))
    assert "PASS: composed calibrated window (not in the bars above): ordinary valid at -1 >= 0.95 x plain" in md
    assert "FAIL: composed (not in the bars above): most-exposed copy_1/3 at -1 <= 0.05" in md
    assert "composed calibrated window -1.0 | 0% / 12% / 96% (46)" in effect_summary({"m": {"bars": b, "rows": rows}})
