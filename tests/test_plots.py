"""The demo's pictures say what they show: the heat-map's notes, the grid's axis and legend, the demo's row labels."""

import torch
from PIL import Image

import memctl
from memctl.blockmap import BlockMap
from memctl.demo import FRAMES, _ordinary_label, picture_prompts
from memctl.grid import CELL, LABEL_WIDTH, PAD, make_grid
from memctl.plots import heatmap, notes


def _map(scores) -> BlockMap:
    n = len(scores)
    return BlockMap([f"b{i}" for i in range(n)], torch.tensor(scores), torch.tensor([0.1, 0.9]), ["resnet"] * n,
                    ["unet"] * n, {"unet": "x-y"}, method="ablation")  # fmt: skip


def test_heatmap_notes_explain_colours_and_zero_rows():
    tb = memctl.zoo.load_testbed("digits")
    shipped = tb.block_map()
    zero = int((shipped.scores == 0).all(dim=1).sum())
    text = " ".join(notes(shipped))
    assert shipped.lever == "condition"
    assert 0 < zero < shipped.n_blocks
    assert f"{zero} of {shipped.n_blocks} rows are 0" in text
    assert "only the attention blocks" in text
    assert ("none in this map" in text) == (not bool((shipped.scores < 0).any()))
    mixed = " ".join(notes(_map([[0.5, -0.2], [0.0, 0.0]])))
    assert "none in this map" not in mixed
    assert "1 of 2 rows are 0: the probe measured no difference" in mixed
    assert "when the block is zeroed." in mixed
    assert "t = noise level" in mixed
    picture = heatmap(shipped)
    assert picture.height > 56 + 20 * shipped.n_blocks + 3 * 16  # room for the notes under the rows


def test_grid_axis_spans_the_chosen_columns_and_footer_wraps():
    images = torch.zeros(3, 1, 16, 16)
    plain = make_grid([("a seven", images)], header=["bound", "-1", "+1"])
    sheet = make_grid([("a seven", images)], header=["bound", "-1", "+1"], axis=(1, "new", "faithful"),
                      footer=FRAMES)  # fmt: skip
    assert sheet.width == plain.width
    assert sheet.height > plain.height + 26 + 3 * 16  # axis row, wrapped footer
    row = [sheet.getpixel((x, 26 - 6)) for x in range(sheet.width)]  # the arrow's line: top - header - 6
    black = [x for x, p in enumerate(row) if p == (0, 0, 0)]
    first = LABEL_WIDTH + (CELL + PAD) + PAD  # column 1: the axis skips the bound column
    assert min(black) >= first - 2
    assert max(black) >= LABEL_WIDTH + 3 * (CELL + PAD) - 3
    assert isinstance(sheet, Image.Image)


def test_demo_rows_read_right_and_say_why_an_ordinary_row_copies():
    tb = memctl.zoo.load_testbed("digits")
    prompts = picture_prompts(tb)
    assert prompts[8] == "the digit eight"
    assert prompts[7] == "a seven"
    assert not any(" a e" in f" {p}" for p in prompts)
    duplicated = tb.train_indices.index(tb.spec["duplicated"][0])
    copy = tb.train_images[duplicated][None]  # (1, C, H, W): exactly a training image the data repeats 25 times
    assert _ordinary_label(tb, "a seven", copy) == "a seven\n(red: copies a training image\nrepeated 25x in the data)"
    assert _ordinary_label(tb, "a seven", torch.zeros_like(copy)) == "a seven"


def test_docstring_examples():
    import doctest

    import memctl.grid
    import memctl.plots

    for module in (memctl.grid, memctl.plots):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
        assert result.attempted >= 2, module.__name__
