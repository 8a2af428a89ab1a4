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


def make_run(folder, ap, seed, backbone="build_scalenet_fpn_backbone", **changes):
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
    box = {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 15, "APm": ap, "APl": ap + 10}
    with open(os.path.join(folder, "eval_results.json"), "w") as f:
        json.dump({"datasets": ["coco_2017_val"], "results": {"bbox": box}}, f)
    info = {"backbone_arch": backbone, "train_config_file": "c.yaml", "train_machine": "test", "train_s_per_iter": 0.5}
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
