"""Allocation files: the bundled ones, the published row format, and every kind of bad file."""

import json
import os

import pytest

from scalenet_d2.modeling.allocation import (
    BUNDLED_ALLOCATIONS,
    BUNDLED_DIR,
    SCALES,
    Allocation,
    AllocationError,
    StageAllocation,
    branch_kernel_size,
    load_allocation,
)

# The spec's figures: depth, blocks per stage, and c1+c2+c4+c7 of every block of each stage.
PUBLISHED = {
    "scalenet50": (50, (3, 4, 6, 3), (88, 175, 349, 697)),
    "scalenet50_light": (50, (3, 4, 6, 3), (64, 128, 256, 512)),
    "scalenet101": (101, (3, 4, 23, 3), (86, 171, 341, 682)),
    "scalenet152": (152, (3, 8, 36, 3), (90, 179, 358, 715)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_published_allocations_have_the_spec_figures(name):
    allocation = load_allocation(name)
    depth, blocks, sums = PUBLISHED[name]
    assert allocation.name == name
    assert allocation.depth == depth
    assert allocation.blocks_per_stage == blocks
    assert allocation.stem_channels == 64
    assert [s.planes for s in allocation.stages] == [64, 128, 256, 512]
    assert [s.side for s in allocation.stages] == [56, 28, 14, 7]
    for stage, total in zip(allocation.stages, sums):
        assert {sum(widths) for widths in stage.blocks} == {total}, stage.name
    provenance = allocation.provenance
    assert "CVPR 2019" in provenance["source"]
    assert provenance["published_file"] == f"{name}.json"
    assert "transcribed" in provenance["note"]


def test_tiny_allocation_is_small_and_uses_every_scale():
    tiny = load_allocation("scalenet_tiny")
    assert tiny.stem_channels == 16
    assert [s.planes for s in tiny.stages] == [8, 16, 32, 64]
    assert tiny.blocks_per_stage == (1, 1, 1, 1)
    assert tiny.depth == 14
    assert all(min(widths) > 0 for stage in tiny.stages for widths in stage.blocks)
    assert tiny.provenance["source"] == "hand-made for tests and the CPU demo"


def test_bundled_names_are_the_files_shipped():
    shipped = sorted(p.stem for p in BUNDLED_DIR.glob("*.json"))
    assert shipped == sorted(BUNDLED_ALLOCATIONS)
    assert (BUNDLED_DIR / "README.md").is_file()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_row_format_is_read_unchanged(tmp_path, name):
    # the bundled allocation written back in the published row format reads as the same network
    rows = load_allocation(name).to_rows()
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rows))
    published = load_allocation(str(path))
    assert published.same_network(load_allocation(name))
    assert published.to_rows() == rows
    assert published.name == name and published.source == str(path)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_files_transcribe_the_published_ones(published_allocations_dir, name):
    path = published_allocations_dir / f"{name}.json"
    assert load_allocation(name).to_rows() == json.loads(path.read_text())


def test_bundled_files_are_reproduced_by_the_generator(published_allocations_dir, repo_root, capsys):
    import runpy

    module = runpy.run_path(str(repo_root / "tools" / "make_bundled_allocations.py"), run_name="not_main")
    assert module["main"](["--published-dir", str(published_allocations_dir), "--check"]) == 0


def test_save_and_load_round_trip(tmp_path):
    allocation = load_allocation("scalenet101")
    path = tmp_path / "copy.json"
    allocation.save(path)
    assert os.listdir(tmp_path) == ["copy.json"]  # no temporary file left behind
    again = load_allocation(str(path))
    assert again == allocation
    assert again.provenance == allocation.provenance
    assert json.loads(path.read_text())["depth"] == 101
    # the project format's blocks are one per line, readable
    assert "[282, 377, 23, 0]" in path.read_text()


def test_kernel_size_rule_uses_branch_index_not_scale():
    # side / 2**i > 1: res5 (side 7) has a 1x1 scale-7 branch (7 / 8 < 1), though 7 / 7 = 1
    assert [branch_kernel_size(7, i) for i in range(4)] == [3, 3, 3, 1]
    assert [branch_kernel_size(14, i) for i in range(4)] == [3, 3, 3, 3]
    assert [branch_kernel_size(8, i) for i in range(4)] == [3, 3, 3, 1]  # 8 / 8 = 1 is not > 1
    assert [branch_kernel_size(4, i) for i in range(4)] == [3, 3, 1, 1]
    assert load_allocation("scalenet50").stages[3].kernel_sizes == (3, 3, 3, 1)


def test_load_allocation_accepts_an_allocation_and_a_path_object(tmp_path):
    tiny = load_allocation("scalenet_tiny")
    assert load_allocation(tiny) is tiny
    tiny.save(tmp_path / "t.json")
    assert load_allocation(tmp_path / "t.json") == tiny


# ----------------------------------------------------------------------------- bad files
def _rows():
    """A valid 16-row published-format allocation."""
    return [[30, 20, 10, 4, side] for side, count in zip((56, 28, 14, 7), (3, 4, 6, 3)) for _ in range(count)]


def _write(tmp_path, data, raw=False):
    path = tmp_path / "alloc.json"
    path.write_text(data if raw else json.dumps(data))
    return str(path)


def _project(**changes):
    data = load_allocation("scalenet_tiny").to_dict()
    data.update(changes)
    return data


def test_missing_file(tmp_path):
    path = str(tmp_path / "nothere.json")
    with pytest.raises(AllocationError, match=f"allocation file '{path}' does not exist"):
        load_allocation(path)


def test_unknown_bundled_name_lists_the_known_ones():
    with pytest.raises(AllocationError) as info:
        load_allocation("scalenet51")
    message = str(info.value)
    assert "unknown allocation 'scalenet51'" in message
    for name in BUNDLED_ALLOCATIONS:
        assert name in message


def test_unreadable_file(tmp_path):
    path = _write(tmp_path, "[[1, 2, 3, 4, 56],", raw=True)
    with pytest.raises(AllocationError, match=r"alloc\.json: not valid JSON \(.*line 1"):
        load_allocation(path)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AllocationError, match=r"binary\.json' cannot be read"):
        load_allocation(str(binary))
    with pytest.raises(AllocationError, match="cannot be read"):
        load_allocation(str(tmp_path) + "/")  # a directory


@pytest.mark.parametrize("data, kind", [(42, "a number"), ("scalenet50", "a string"), (None, "null")])
def test_wrong_top_level_type(tmp_path, data, kind):
    path = _write(tmp_path, data)
    with pytest.raises(AllocationError) as info:
        load_allocation(path)
    message = str(info.value)
    assert path in message and f"got {kind}" in message
    assert "[c1, c2, c4, c7, side] rows" in message and "scalenet_d2.allocation" in message


@pytest.mark.parametrize("count", [0, 15, 17, 34])
def test_wrong_number_of_rows(tmp_path, count):
    path = _write(tmp_path, [[30, 20, 10, 4, 56]] * count)
    with pytest.raises(AllocationError) as info:
        load_allocation(path)
    assert str(info.value) == (
        f"{path}: {count} rows; the published format has 16 (depth 50), 33 (depth 101) or 50 (depth 152) rows"
    )


def test_row_of_wrong_length(tmp_path):
    rows = _rows()
    rows[4] = [30, 20, 10, 28]
    path = _write(tmp_path, rows)
    with pytest.raises(
        AllocationError, match=r"row 5 of 16 \(block res3\.1\): \[30, 20, 10, 28\]; expected \[c1, c2, c4, c7, side\]"
    ):
        load_allocation(path)


@pytest.mark.parametrize(
    "bad, shown",
    [(-3, "-3"), (1.5, "1.5"), ("8", "'8'"), (True, "True"), (None, "None"), (4.0, "4.0")],
)
def test_negative_or_non_integer_width_in_a_row(tmp_path, bad, shown):
    rows = _rows()
    rows[8][1] = bad  # res4.1's c2
    path = _write(tmp_path, rows)
    with pytest.raises(AllocationError) as info:
        load_allocation(path)
    assert str(info.value) == f"{path}: row 9 of 16 (block res4.1): width c2 = {shown}; expected a non-negative integer"


def test_block_with_all_widths_zero(tmp_path):
    rows = _rows()
    rows[15][:4] = [0, 0, 0, 0]
    path = _write(tmp_path, rows)
    with pytest.raises(AllocationError) as info:
        load_allocation(path)
    assert str(info.value) == (
        f"{path}: row 16 of 16 (block res5.2): all widths are 0 [0, 0, 0, 0]; "
        "expected at least one branch with width > 0"
    )


def test_side_must_be_the_same_within_a_stage(tmp_path):
    rows = _rows()
    rows[5][4] = 14
    path = _write(tmp_path, rows)
    with pytest.raises(AllocationError, match=r"row 6 of 16 \(block res3\.2\): side = 14; expected 28"):
        load_allocation(path)


def test_non_positive_side(tmp_path):
    rows = _rows()
    rows[0][4] = 0
    path = _write(tmp_path, rows)
    with pytest.raises(AllocationError, match=r"row 1 of 16 \(block res2\.0\): side = 0; expected a positive integer"):
        load_allocation(path)


@pytest.mark.parametrize("scales", [[1, 2, 3, 7], [1, 2, 4], [1, 2, 4, 8], "1,2,4,7", [1, 2, 4, 7.0]])
def test_unknown_scale_factors(tmp_path, scales):
    path = _write(tmp_path, _project(scales=scales))
    with pytest.raises(AllocationError) as info:
        load_allocation(path)
    assert str(info.value) == (f'{path}: "scales" is {scales!r}; expected [1, 2, 4, 7], the scale factors of ScaleNet')


def test_project_format_block_errors_name_stage_and_block(tmp_path):
    data = _project()
    data["stages"][2]["blocks"][0] = [16, -1, 4, 4]
    path = _write(tmp_path, data)
    with pytest.raises(AllocationError) as info:
        load_allocation(path)
    assert str(info.value) == (
        f"{path}: stages[2] (res4) blocks[0] (block res4.0): width c2 = -1; expected a non-negative integer"
    )

    data = _project()
    data["stages"][0]["blocks"][0] = [4, 2, 1, 1, 56]
    path = _write(tmp_path, data)
    with pytest.raises(
        AllocationError,
        match=r"stages\[0\] \(res2\) blocks\[0\] \(block res2\.0\): widths \[4, 2, 1, 1, 56\]; expected a list of 4 integers",
    ):
        load_allocation(path)

    data = _project()
    data["stages"][1]["blocks"][0] = [0, 0, 0, 0]
    path = _write(tmp_path, data)
    with pytest.raises(AllocationError, match=r"stages\[1\] \(res3\) blocks\[0\] \(block res3\.0\): all widths are 0"):
        load_allocation(path)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d.pop("stem_channels"), 'missing field "stem_channels"'),
        (lambda d: d.update(format="other"), "\"format\" is 'other'; expected 'scalenet_d2.allocation'"),
        (lambda d: d.update(version=2), '"version" is 2; this scalenet_d2 reads version 1'),
        (lambda d: d.update(depth=50), '"depth" is 50 but the stages have 4 blocks, i.e. depth 14'),
        (lambda d: d.update(stem_channels=0), '"stem_channels" = 0; expected a positive integer'),
        (lambda d: d["stages"].pop(), '"stages" has 3 entries; expected a list of 4 stages'),
        (lambda d: d["stages"][1].update(name="res4"), "stages[1]: \"name\" is 'res4'; expected 'res3'"),
        (lambda d: d["stages"][3].update(planes=-64), 'stages[3] (res5): "planes" = -64; expected a positive integer'),
        (lambda d: d["stages"][3].update(side=7.5), 'stages[3] (res5): "side" = 7.5; expected a positive integer'),
        (lambda d: d["stages"][0].update(blocks=[]), 'stages[0] (res2): "blocks" is []; expected a non-empty list'),
        (lambda d: d["stages"][0].pop("planes"), 'stages[0] (res2): missing field "planes"'),
    ],
)
def test_project_format_field_errors(tmp_path, change, expected):
    data = _project()
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(AllocationError) as info:
        load_allocation(path)
    assert str(info.value).startswith(path + ": ")
    assert expected in str(info.value)


def test_allocations_built_in_code_are_validated():
    with pytest.raises(
        AllocationError, match=r"stage res3 block res3\.1: width c7 = -2; expected a non-negative integer"
    ):
        StageAllocation("res3", 16, 28, ((8, 4, 2, 2), (8, 4, 2, -2)))
    with pytest.raises(AllocationError, match=r"stage res2: planes = 0; expected a positive integer"):
        StageAllocation("res2", 0, 56, ((1, 1, 1, 1),))
    tiny = load_allocation("scalenet_tiny")
    with pytest.raises(AllocationError, match=r"stages \['res2', 'res3', 'res4'\]; expected 4 StageAllocation"):
        Allocation("broken", 16, tiny.stages[:3])


def test_numpy_and_list_widths_are_normalised():
    np = pytest.importorskip("numpy")
    stage = StageAllocation("res2", np.int64(8), 56, [[np.int64(4), 2, 1, 1]])
    assert stage.blocks == ((4, 2, 1, 1),) and type(stage.blocks[0][0]) is int
    assert stage == StageAllocation("res2", 8, 56, ((4, 2, 1, 1),))
    assert len(SCALES) == 4
