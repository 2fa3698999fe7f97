"""Notebook 07's game (fluxnb/game.py), driven as a learner would: look, pick a guess under each image, click.

What the learner sees is read from the widgets themselves: every widget's state (captions, HTML, outputs,
tooltips) and the PNG each image widget shows, decoded to find out which recipe's image is where.
"""

import html
import io
import json
import random
import re
from pathlib import Path

import ipywidgets as w
import pytest
from PIL import Image

from fluxnb.game import QUESTION, SpotTheQuantized, stand_in_note

COLOURS = {"bf16": (200, 30, 30), "bnb-nf4": (30, 200, 30), "bnb-int8": (30, 30, 200),
           "torchao-int8wo": (200, 200, 30), "gguf-q4_0": (30, 200, 200)}
METRICS = {"bf16": dict(relative_error=0.0, psnr_db=float("inf"), ssim=1.0),
           "bnb-nf4": dict(relative_error=0.1234, psnr_db=20.51, ssim=0.5012),
           "bnb-int8": dict(relative_error=0.0217, psnr_db=31.07, ssim=0.9377),
           "torchao-int8wo": dict(relative_error=0.0093, psnr_db=38.88, ssim=0.9811),
           "gguf-q4_0": dict(relative_error=0.0861, psnr_db=22.64, ssim=0.6150)}
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "07_spot_the_quantized.ipynb"


def images(n=len(COLOURS)):
    return {name: Image.new("RGB", (32, 24), colour) for name, colour in list(COLOURS.items())[:n]}


def make_game(n=len(COLOURS), **kwargs):
    chosen = images(n)
    return SpotTheQuantized(chosen, {k: METRICS[k] for k in chosen}, **kwargs)


def shown_order(game):
    """The recipe behind each image, in display order, found from the pixels the learner is shown."""
    order = []
    for picture in game.pictures:
        shown = Image.open(io.BytesIO(picture.value)).convert("RGB")
        order.append(next(name for name, colour in COLOURS.items() if shown.getpixel((0, 0)) == colour))
    return order


def all_widgets(root):
    """Every widget reachable from ``root`` (children, layouts, styles, any widget-valued trait)."""
    seen, stack = {}, [root]
    while stack:
        widget = stack.pop()
        if widget.model_id in seen:
            continue
        seen[widget.model_id] = widget
        for name in widget.keys:
            value = getattr(widget, name)
            values = value if isinstance(value, (list, tuple)) else [value]
            stack += [v for v in values if isinstance(v, w.Widget)]
    return list(seen.values())


def visible_state(game):
    """Text and bytes of everything the learner's browser receives, except the dropdowns' option lists
    (which must list every recipe, in one fixed order for every image)."""
    text, blobs = [], []
    for widget in all_widgets(game.widget):
        state = widget.get_state()
        if isinstance(widget, w.Dropdown):
            state = {k: v for k, v in state.items() if k not in ("_options_labels", "index")}
        for key, value in state.items():
            if isinstance(value, (bytes, memoryview)):
                blobs.append(bytes(value))
            else:
                text.append(f"{key}={json.dumps(value, default=str)}")
    return re.sub(r"IPY_MODEL_[0-9a-f]+", "IPY_MODEL_", "\n".join(text)), blobs  # ids are hex: "bf16" can occur


def guess(game, answers):
    for dropdown, answer in zip(game.guesses, answers):
        dropdown.value = answer


def test_before_reveal_nothing_the_learner_sees_names_a_recipe_or_its_numbers():
    game = make_game(stand_in="tiny")
    text, blobs = visible_state(game)
    assert QUESTION in text and "image 1" in text and "noise" in text
    for name in COLOURS:
        assert name not in text, name
        assert all(name.encode() not in blob for blob in blobs), f"{name} in an image's bytes"
    for numbers in METRICS.values():
        assert f"{numbers['relative_error']:.4f}" not in text
    # every image offers the same options in the same order: the dropdowns cannot give the order away
    options = {dropdown.options for dropdown in game.guesses}
    assert len(options) == 1 and {v for _, v in next(iter(options))} == {None, *COLOURS}
    assert all(picture.layout.width == "384px" for picture in game.pictures)
    assert Image.open(io.BytesIO(game.pictures[0].value)).width == 384  # the 32-px image, enlarged to judge it


def test_reveal_locks_the_guesses_labels_the_images_and_scores_known_guesses():
    game = make_game(rng=3)
    order = shown_order(game)
    answers = order[:2] + [order[3], order[2], order[4]]  # two right, then images 3 and 4 swapped, image 5 right
    guess(game, answers)
    game.reveal_button.click()

    assert all(dropdown.disabled for dropdown in game.guesses) and game.reveal_button.disabled
    assert "Round 1: 3 of 5 right." in game.score.value
    for i, name in enumerate(order):
        assert f"image {i + 1}: {name}" in game.captions[i].value
        assert ("✔ right" in game.captions[i].value) == (answers[i] == name)
    for name, numbers in METRICS.items():
        assert name in game.answers.value and f"{numbers['relative_error']:.4f}" in game.answers.value
    assert "∞ (identical)" in game.answers.value and "20.51" in game.answers.value
    assert f"reference was image {order.index('bf16') + 1}" in game.score.value

    game.guesses[0].value = order[1]  # a locked guess cannot change, and the score stays
    assert game.guesses[0].value == answers[0] and "3 of 5 right" in game.score.value
    game.reveal_button.click()  # a second click changes nothing
    assert game.history == [(3, 5)]


def test_new_round_reshuffles_clears_and_unlocks_and_keeps_the_running_score():
    game = make_game(rng=1)
    first = shown_order(game)
    guess(game, first)
    game.reveal_button.click()
    game.new_round_button.click()

    second = shown_order(game)
    assert second != first and sorted(second) == sorted(first)
    assert all(d.value is None and not d.disabled for d in game.guesses) and not game.reveal_button.disabled
    assert game.answers.value == "" and "Round 2" in game.status.value
    text, _ = visible_state(game)
    assert not any(name in text for name in COLOURS)  # labels hidden again
    guess(game, [second[0]] + ["bf16" if n != "bf16" else "bnb-nf4" for n in second[1:]])
    game.reveal_button.click()
    assert "Round 2: 1 of 5 right." in game.score.value and "6 of 10 over 2 round(s)" in game.score.value


@pytest.mark.parametrize("seed", range(5))
def test_every_round_has_a_new_order_and_the_orders_are_random(seed):
    game = make_game(rng=seed)
    orders = [shown_order(game)]
    for _ in range(7):
        game.new_round_button.click()
        orders.append(shown_order(game))
    assert all(a != b for a, b in zip(orders, orders[1:]))  # never the same order twice in a row
    assert len({tuple(o) for o in orders}) >= 4
    assert shown_order(make_game(rng=seed)) == orders[0]  # a seed repeats its orders (for tests)


def test_the_order_is_not_fixed_by_anything_but_the_game_s_own_rng():
    firsts = {tuple(shown_order(make_game(rng=seed))) for seed in range(12)}
    assert len(firsts) >= 6
    two = make_game(n=2, rng=random.Random(0))  # two images: still a new order every round
    orders = [shown_order(two)]
    for _ in range(4):
        two.new_round()
        orders.append(shown_order(two))
    assert all(a != b for a, b in zip(orders, orders[1:]))
    unseeded = {tuple(shown_order(make_game())) for _ in range(10)}  # the default: a fresh order per game
    assert len(unseeded) >= 2


def test_reveal_before_every_guess_says_what_to_do_and_locks_nothing():
    game = make_game(rng=0)
    order = shown_order(game)
    guess(game, order[:3])
    game.reveal_button.click()
    assert "Image 4, 5 have no guess yet: pick a scheme under every image" in game.status.value
    assert not any(d.disabled for d in game.guesses) and not game.revealed and game.score.value == ""
    assert not any(name in game.answers.value for name in COLOURS)
    game.guesses[3].value, game.guesses[4].value = order[3], order[4]
    game.reveal_button.click()
    assert "5 of 5 right" in game.score.value and "you spotted it" in game.score.value


def test_recipes_not_run_show_after_reveal_only():
    game = make_game(rng=0, not_run={"torchao-fp8": "needs a CUDA GPU of compute capability 8.9 or newer"})
    assert "torchao-fp8" not in visible_state(game)[0]
    guess(game, shown_order(game))
    game.reveal()
    assert "torchao-fp8: needs a CUDA GPU" in game.answers.value


@pytest.mark.parametrize("kwargs, message", [
    (dict(reference="fp16"), "reference='fp16' is not among the images"),
    (dict(n=1), "at least two images"),
    (dict(image_px=10), "at least 64 px"),
])
def test_bad_input_says_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_game(**kwargs)
    with pytest.raises(ValueError, match="No relative_error, psnr_db and ssim for bnb-nf4"):
        SpotTheQuantized(images(2), {"bf16": METRICS["bf16"]})


def test_it_says_where_the_images_come_from():
    assert "noise" in stand_in_note("tiny", True) and "noise" in stand_in_note("random", True)
    assert "slice" in stand_in_note(None, True) and "noise" not in stand_in_note(None, True)
    assert "FLUX.1's own images" in stand_in_note(None, False)
    assert html.escape(stand_in_note(None, False)) in visible_state(make_game(rng=0))[0]


def test_notebook_07_asks_the_game_s_question_and_plays_before_the_numbers():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells]
    assert QUESTION in sources[0]
    game_cell = next(i for i, s in enumerate(sources) if "SpotTheQuantized(" in s)
    labelled = [i for i, s in enumerate(sources) if cells[i]["cell_type"] == "code"
                and ("set_title" in s or "committed_table" in s or "Markdown(" in s)]
    assert all(i > game_cell for i in labelled), "a labelled grid or a table comes before the game"
    assert "play first" in "".join(sources[game_cell + 1:]).lower()
