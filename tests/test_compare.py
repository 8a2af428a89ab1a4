"""tools/compare.py: one run per arm, arms of several seeds (mean, spread, the difference's 95%
interval, paired or Welch), runs that are not one recipe refused, and the picture."""

import contextlib
import importlib.util
import io
import json
import os

import pytest
import yaml
from scipy import stats

from scalenet_d2.utils.statistics import difference, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


EVALUATION = {
    "weights": "model_final.pth",
    "datasets": ["coco_2017_val"],
    "images": {"coco_2017_val": 5000},
    "test_size": "800/1333",
    "machine": "test",
}


def make_run(
    folder, ap, seed, backbone="build_scalenet_fpn_backbone", evaluation=None, machine="test", box=None, **changes
):
    """A train_net.py OUTPUT_DIR with what compare.py reads: box AP `ap` (AP50 = ap + 20, ...)."""
    os.makedirs(folder)
    config = {
        "SEED": seed,
        "OUTPUT_DIR": str(folder),
        "MODEL": {"BACKBONE": {"NAME": backbone}, "WEIGHTS": "w.pkl", "SCALENET": {"ALLOCATION": "scalenet50"}},
        "INPUT": {"MIN_SIZE_TEST": 800},
        "SOLVER": {"MAX_ITER": 90000},
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    box = box or {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 15, "APm": ap, "APl": ap + 10}
    evaluation = dict(EVALUATION, **(evaluation or {}))
    with open(os.path.join(folder, "eval_results.json"), "w") as f:
        json.dump({"datasets": ["coco_2017_val"], "evaluation": evaluation, "results": {"bbox": box}}, f)
    info = {"backbone_arch": backbone, "train_config_file": "c.yaml", "train_machine": machine, "train_s_per_iter": 0.5}
    with open(os.path.join(folder, "run_info.json"), "w") as f:
        json.dump(info, f)
    return str(folder)


def compare(*args):
    """(exit status, what it printed) of tools/compare.py, run in this process."""
    spec = importlib.util.spec_from_file_location("tool_compare", os.path.join(REPO, "tools", "compare.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tool.main(list(args))
            status = 0
        except SystemExit as e:
            status = e.code
    return status, out.getvalue() + err.getvalue()


def test_welch_and_paired_intervals_are_scipys():
    a, b = [37.1, 37.6, 36.9, 37.4], [36.2, 36.9, 36.5]
    ours = difference(dict(enumerate(a)), dict(enumerate(b)), paired=False)
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert ours.method == "Welch t"
    assert ours.mean == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert (ours.low, ours.high) == pytest.approx((welch.low, welch.high), rel=1e-9)
    seeds = {1: 37.1, 2: 37.6, 3: 36.9}, {1: 36.8, 2: 37.2, 3: 36.7}
    ours = difference(*seeds, paired=True)
    paired = stats.ttest_rel([37.1, 37.6, 36.9], [36.8, 37.2, 36.7]).confidence_interval(0.95)
    assert ours.method == "paired t (3 seeds)" and not ours.includes_zero
    assert (ours.low, ours.high) == pytest.approx((paired.low, paired.high), rel=1e-9)
    assert difference({0: 1.0}, {0: 2.0, 1: 3.0}, paired=False) is None  # one run: no spread
    assert summarize([2.0, 4.0]).sd == pytest.approx(2**0.5) and summarize([3.0]).sd is None


def test_arms_of_seeds_give_mean_spread_and_a_paired_interval(tmp_path):
    s = [make_run(tmp_path / f"S{i}", ap, seed=i) for i, ap in ((1, 37.1), (2, 37.6), (3, 36.9))]
    r = [
        make_run(tmp_path / f"R{i}", ap, seed=i, backbone="build_resnet_fpn_backbone", **{"MODEL.WEIGHTS": "r.pkl"})
        for i, ap in ((1, 36.8), (2, 37.2), (3, 36.7))
    ]
    png = tmp_path / "ap.png"
    rc, out = compare("--arm", "S50", *s, "--arm", "R50", *r, "--plot", str(png))
    assert rc == 0, out
    assert "S50 mean ± sd (n)" in out and "37.20 ± 0.36 (n=3)" in out and "36.90 ± 0.26 (n=3)" in out
    assert "box AP: S50 is higher by 0.30 points, 95% interval [+0.05, +0.55] (paired t (3 seeds))." in out
    assert png.stat().st_size > 1000 and f"Wrote {png}" in out


def test_three_arms_compare_the_first_with_each_other_one(tmp_path):
    det = [make_run(tmp_path / f"D{i}", ap, seed=i) for i, ap in ((1, 37.6), (2, 38.1), (3, 37.4))]
    img = [make_run(tmp_path / f"S{i}", ap, seed=i) for i, ap in ((1, 37.1), (2, 37.6), (3, 36.9))]
    res = [
        make_run(tmp_path / f"R{i}", ap, seed=i, backbone="build_resnet_fpn_backbone", **{"MODEL.WEIGHTS": "r.pkl"})
        for i, ap in ((1, 36.8), (2, 37.2), (3, 36.7))
    ]
    rc, out = compare("--arm", "det", *det, "--arm", "img", *img, "--arm", "res", *res)
    assert rc == 0, out
    assert "diff (det - img)" in out and "diff (det - res)" in out
    # each pair as two arms alone would give it: det - img is exactly +0.50 on every seed
    assert "box AP: every run gave the same difference (+0.50): no spread observed" in out
    alone = compare("--arm", "det", *det, "--arm", "res", *res)[1]
    sentence = next(line for line in alone.splitlines() if line.startswith("box AP: det is higher"))
    assert sentence in out and "[+0.55, +1.05]" in sentence  # diffs 0.8, 0.9, 0.7: 0.8 ± 4.303 x 0.1 / sqrt 3
    assert "2 comparisons with det: each interval holds at 95% on its own" in out


def test_an_interval_that_includes_zero_is_said_so_and_other_seeds_are_unpaired(tmp_path):
    s = [make_run(tmp_path / f"S{i}", ap, seed=i) for i, ap in ((1, 37.0), (2, 37.9), (3, 36.6))]
    r = [make_run(tmp_path / f"R{i}", ap, seed=i, backbone="other") for i, ap in ((4, 37.1), (5, 36.6), (6, 37.5))]
    rc, out = compare("--arm", "A", *s, "--arm", "B", *r)
    assert rc == 0, out
    assert "box AP: the 95% interval of A - B, [" in out and "includes 0: these runs do not show a difference" in out
    assert "Welch t" in out and "paired" not in out


def test_one_run_per_arm_keeps_the_table_and_says_no_spread_is_known(tmp_path):
    a, b = make_run(tmp_path / "a", 37.0, 1), make_run(tmp_path / "b", 36.0, 1, backbone="other")
    rc, out = compare(a, b)
    assert rc == 0, out
    assert "diff (a - b)" in out and "1.0" in out
    assert "One run per arm: no spread is known" in out


def test_runs_that_are_not_one_recipe_are_refused_naming_the_keys(tmp_path):
    a = make_run(tmp_path / "a", 37.0, 1)
    b = make_run(tmp_path / "b", 36.0, 2)
    other_size = make_run(tmp_path / "c", 36.0, 1, backbone="other", **{"INPUT.MIN_SIZE_TEST": 600})
    rc, out = compare("--arm", "S", a, b, "--arm", "R", other_size)
    assert rc == 2 and "Traceback" not in out
    assert (
        f"{other_size} and {a} are not one recipe: they differ in INPUT.MIN_SIZE_TEST (INPUT.MIN_SIZE_TEST: 800 vs 600)"
        in out
    )
    # within an arm, not even the backbone may differ
    other_allocation = make_run(tmp_path / "d", 36.0, 3, **{"MODEL.SCALENET.ALLOCATION": "scalenet50_light"})
    rc, out = compare("--arm", "S", a, other_allocation, "--arm", "R", b)
    assert rc == 2
    assert "differ in MODEL.SCALENET.ALLOCATION (MODEL.SCALENET.ALLOCATION: 'scalenet50' vs 'scalenet50_light')" in out
    assert "expected the config of arm S's first run, but for the seed" in out


def twin_arms(tmp_path, s_values, r_values, **kwargs):
    """Two arms, S and R, seeds 1, 2, ...: (S folders, R folders)."""
    s = [make_run(tmp_path / f"S{i}", ap, seed=i, **kwargs) for i, ap in enumerate(s_values, start=1)]
    r = [make_run(tmp_path / f"R{i}", ap, seed=i, backbone="other", **kwargs) for i, ap in enumerate(r_values, start=1)]
    return s, r


def test_non_finite_metrics_are_counted_apart_and_never_give_a_direction(tmp_path):
    nan = float("nan")
    all_nan = {k: nan for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    s = [make_run(tmp_path / f"S{i}", 0, seed=i, box=all_nan) for i in (1, 2, 3)]
    r = [make_run(tmp_path / f"R{i}", 0, seed=i, backbone="other", box=all_nan) for i in (1, 2, 3)]
    rc, out = compare("--arm", "S", *s, "--arm", "R", *r)
    assert rc == 0, out
    assert "nan" not in out.lower() and "higher" not in out
    assert "-; 3 not finite" in out and "no spread known (an arm has < 2 finite values)" in out
    assert "box AP: no spread is known (an arm has fewer than 2 finite values)" in out
    # one run's NaN leaves the others: the mean and the pairs over the finite values
    one_nan = [make_run(tmp_path / f"T{i}", ap, seed=i) for i, ap in ((1, 37.1), (2, 37.6), (3, 36.9))]
    box = {"AP": nan, "AP50": 50.0, "AP75": 30.0, "APs": 20.0, "APm": 40.0, "APl": 50.0}
    one_nan.append(make_run(tmp_path / "T4", 0, seed=4, box=box))
    others = [make_run(tmp_path / f"U{i}", ap, seed=i, backbone="other") for i, ap in ((1, 36.8), (2, 37.2), (3, 36.7))]
    others.append(make_run(tmp_path / "U4", 36.0, seed=4, backbone="other"))
    rc, out = compare("--arm", "S", *one_nan, "--arm", "R", *others)
    assert rc == 0, out
    assert "37.20 ± 0.36 (n=3; 1 not finite)" in out and "nan" not in out.lower()
    assert "box AP: S is higher by 0.30 points, 95% interval [+0.05, +0.55] (paired t (3 seeds))." in out


def test_a_run_given_twice_or_a_repeated_seed_is_refused(tmp_path):
    s, r = twin_arms(tmp_path, (37.1, 37.6), (36.8, 37.2))
    rc, out = compare("--arm", "S", s[0], s[1], s[0], "--arm", "R", *r)
    assert rc == 2 and f"{s[0]} is given twice (arms S and S): each run may count once" in out
    rc, out = compare("--arm", "S", *s, "--arm", "R", r[0], s[1])
    assert rc == 2 and f"{s[1]} is given twice (arms S and R)" in out
    again = make_run(tmp_path / "S1b", 37.3, seed=1)
    rc, out = compare("--arm", "S", *s, again, "--arm", "R", *r)
    assert rc == 2 and f"arm S: SEED 1 is repeated ({s[0]}, {again})" in out


def test_no_spread_observed_gives_no_interval_and_no_verdict(tmp_path):
    s, r = twin_arms(tmp_path, (37.3, 37.3), (37.0, 37.0))
    rc, out = compare("--arm", "S", *s, "--arm", "R", *r)
    assert rc == 0, out
    assert "no spread observed (paired t (2 seeds)): no interval" in out
    assert "box AP: every run gave the same difference (+0.30): no spread observed" in out
    assert "higher" not in out and "[+0.30, +0.30]" not in out


def test_only_the_primary_metric_gets_a_verdict_with_its_caveats(tmp_path):
    s, r = twin_arms(tmp_path, (37.1, 37.6, 36.9), (36.8, 37.2, 36.7))
    rc, out = compare("--arm", "S", *s, "--arm", "R", *r)
    assert rc == 0, out
    assert "box AP50 (exploratory)" in out and "box APs (exploratory)" in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("box ") and " is higher" in line] == [
        "box AP"
    ]
    assert "Primary metric: box AP; the other AP rows are exploratory" in out
    assert "training randomness (the seeds) on fixed evaluation images" in out


def test_a_sign_is_never_rounded_away(tmp_path):
    s, r = twin_arms(tmp_path, (37.1050, 37.1040, 37.1045), (37.1000, 37.1003, 37.1004))
    rc, out = compare("--arm", "S", *s, "--arm", "R", *r)
    assert rc == 0, out
    # mean +0.0043, 95% interval [+0.0026, +0.0059]: shown with 3 decimals, not as 0.00 [+0.00, +0.01]
    assert "box AP: S is higher by 0.004 points, 95% interval [+0.003, +0.006] (paired t (3 seeds))." in out
    assert "37.1045 ± 0.0005 (n=3)" in out  # the spread too


def test_runs_evaluated_differently_are_refused_naming_the_field(tmp_path):
    s, r = twin_arms(tmp_path, (37.1, 37.6), (36.8, 37.2))
    other_weights = make_run(tmp_path / "S3", 37.0, seed=3, evaluation={"weights": "/elsewhere/model_0004999.pth"})
    rc, out = compare("--arm", "S", *s, other_weights, "--arm", "R", *r)
    assert rc == 2 and f"{other_weights}: its results evaluate '/elsewhere/model_0004999.pth'" in out
    other_size = make_run(tmp_path / "S4", 37.0, seed=4, evaluation={"test_size": "600/1000"})
    rc, out = compare("--arm", "S", *s, other_size, "--arm", "R", *r)
    assert rc == 2
    assert f"{other_size} and {s[0]} were evaluated differently: field 'test_size' of eval_results.json" in out
    fewer = make_run(tmp_path / "S5", 37.0, seed=5, evaluation={"images": {"coco_2017_val": 500}})
    rc, out = compare("--arm", "S", *s, fewer, "--arm", "R", *r)
    assert rc == 2 and "field 'images'" in out


def test_other_machines_are_named_and_a_run_without_config_leaves_the_others_checked(tmp_path):
    s, r = twin_arms(tmp_path, (37.1, 37.6), (36.8, 37.2))
    gpu = make_run(tmp_path / "S3", 37.0, seed=3, machine="GPU: 8x A100")
    rc, out = compare("--arm", "S", *s, gpu, "--arm", "R", *r)
    assert rc == 0, out
    assert (
        "the runs ran on different machines, so their timings are not comparable: S: GPU: 8x A100, test; R: test" in out
    )
    os.remove(os.path.join(s[0], "config.yaml"))
    other = make_run(tmp_path / "R3", 36.0, seed=3, backbone="other", **{"SOLVER.MAX_ITER": 100})
    rc, out = compare("--arm", "S", *s, "--arm", "R", *r, other)
    assert rc == 2 and "differ in SOLVER.MAX_ITER" in out


def test_run_info_the_finished_marker_is_renamed_last(tmp_path, monkeypatch, detector_cfg):
    # a crash between the two renames must not leave a "finished" run with another run's results
    from types import SimpleNamespace

    from detectron2.modeling import build_model

    from scalenet_d2.engine.run_record import write_run_record

    cfg = detector_cfg("fpn")
    cfg.OUTPUT_DIR, cfg.DATASETS.TEST, cfg.INPUT.MIN_SIZE_TEST = str(tmp_path), (), 64
    model = build_model(cfg)
    renamed, rename = [], os.replace

    def crash_after_one(source, target):
        renamed.append(os.path.basename(target))
        if len(renamed) > 1:
            raise OSError("killed")
        rename(source, target)

    monkeypatch.setattr(os, "replace", crash_after_one)
    with pytest.raises(OSError, match="killed"):
        write_run_record(cfg, SimpleNamespace(config_file="c.yaml", opts=[]), model, {"bbox": {"AP": 1.0}}, False)
    assert renamed == ["eval_results.json", "run_info.json"]
    assert not os.path.exists(tmp_path / "run_info.json")
