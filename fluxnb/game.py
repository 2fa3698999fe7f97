"""Spot the quantized image: notebook 07's game, an ipywidgets app beside the Studio (:mod:`fluxnb.studio`).

Every scheme of notebooks 05 and 06, and the unquantized reference, made one image from the same
prompt, seed and steps. The game asks one question, :data:`QUESTION`, the one notebook 07 asks:

* each round shows the images in a **fresh random order** (the game's own :class:`random.Random`,
  never the generation seed, and never the same order twice in a row), large enough to judge, each
  with only a number ("image 3") and a dropdown of schemes: nothing the learner can see names the
  scheme of an image (no caption, tooltip, file name or PNG metadata) until the guess is made;
* **Reveal** refuses to score until every image has a guess, then locks every guess, labels every
  image with its scheme (right or wrong), and only then shows the score (this round's and the running
  one) and the metrics table: relative error at a fixed input, PSNR and SSIM against the reference;
* **New round** reshuffles, clears and unlocks the guesses; the running score stays.

With a stand-in checkpoint (random weights) every image is noise and the game says so: what it then
shows is that small numerical errors change an image, not how good any scheme's pictures are.

``import fluxnb`` does not import this module (it needs ipywidgets); notebook 07 does.
"""

from __future__ import annotations

import html
import io
import math
import random
from collections.abc import Mapping
from typing import Any

from PIL import Image

from fluxnb.exceptions import BadSettingError

QUESTION = "Which scheme made which image?"
UNCHOSEN = "pick a scheme"
METRICS = (("relative_error", "rel. error (fixed input)", "{:.4f}"), ("psnr_db", "PSNR vs reference (dB)", "{:.2f}"),
           ("ssim", "SSIM vs reference", "{:.4f}"))
RIGHT, WRONG, ERROR = "#1b7f3b", "#b00020", "#b00020"


def stand_in_note(stand_in: str | None, sliced: bool) -> str:
    """One sentence on where the images come from, so nobody reads image quality into noise.

    ``stand_in`` is :func:`fluxnb.is_stand_in` of the checkpoint (``"tiny"``, ``"random"`` or None);
    ``sliced``: the images come from the first blocks of the transformer only (notebook 07's ``BLOCKS``).
    """
    if stand_in is not None:
        what = ("the tiny stand-in checkpoint (random weights, a few small layers)" if stand_in == "tiny"
                else "a stand-in checkpoint with FLUX.1's real shapes and random weights")
        return (f"These images come from {what}: they are noise, so you are matching noise with noise. What the game "
                "shows is that a small numerical error in the weights changes every pixel; with FLUX.1's real "
                "weights the same cell is a real test.")
    if sliced:
        return ("These images come from FLUX.1's real weights, but only from the first blocks of its transformer (a "
                "slice, so that this GPU holds the unquantized reference): a slice makes no picture, so compare "
                "patterns and textures, not content. BLOCKS = None on a GPU that holds the whole transformer gives "
                "FLUX.1's own pictures.")
    return ("These are FLUX.1's own images, from the same prompt, seed and steps: the composition is the same in all "
            "of them, so look at the fine detail (the letters on the sign, fur, edges, the background).")


def _png(image: Image.Image, width_px: int) -> bytes:
    """``image`` as PNG bytes, at least ``width_px`` wide, with no metadata (a PNG's text chunks could name
    its scheme). Smaller images are enlarged with nearest-neighbour, so every pixel stays a sharp square
    and no smoothing hides a difference; larger ones keep every pixel (the browser shows them scaled)."""
    rgb = image.convert("RGB")
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)
    if clean.width < width_px:
        clean = clean.resize((width_px, round(clean.height * width_px / clean.width)), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG")
    return buffer.getvalue()


def _number(value: float, spec: str) -> str:
    if math.isinf(value):
        return "∞ (identical)" if value > 0 else "-∞"
    return "n/a" if math.isnan(value) else spec.format(value)


class SpotTheQuantized:
    """The game: :data:`QUESTION` over ``images`` (scheme name -> PIL image), scored, round after round.

    ``metrics`` (scheme name -> ``relative_error``, ``psnr_db``, ``ssim``) is shown only after Reveal.
    ``reference`` names the unquantized image (its option says so). ``checkpoint`` (the notebook's
    ``CHECKPOINT``: the game asks :func:`fluxnb.is_stand_in` whether it is a stand-in) or ``stand_in`` itself,
    and ``sliced``, say where the images come from (:func:`stand_in_note`). ``not_run`` (scheme -> why) lists, after Reveal, the
    schemes this machine skipped. ``rng``: a :class:`random.Random`, or a seed for one (tests); by
    default a fresh one from the operating system, so each run and each round has its own order.
    ``image_px``: the width each image is shown at; ``columns``: images per row.

    Drive it as a learner does: set each dropdown in :attr:`guesses` (in display order), click
    :attr:`reveal_button`, then :attr:`new_round_button`; :attr:`status`, :attr:`score` and
    :attr:`answers` hold what the learner reads.
    """

    def __init__(self, images: Mapping[str, Image.Image], metrics: Mapping[str, Mapping[str, float]],
                 reference: str = "bf16", stand_in: str | None = None, sliced: bool = False,
                 not_run: Mapping[str, str] | None = None, rng: random.Random | int | None = None,
                 image_px: int = 384, columns: int = 2, checkpoint: str | None = None) -> None:
        if checkpoint is not None and stand_in is None:
            from fluxnb.checkpoints import is_stand_in

            stand_in = is_stand_in(checkpoint)
        if len(images) < 2:
            raise BadSettingError(f"The game needs at least two images to tell apart, got {len(images)}: run the cells "
                                   "that make the reference's and the schemes' images first.")
        if reference not in images:
            raise BadSettingError(f"reference={reference!r} is not among the images ({', '.join(images)}): pass the name "
                                   "of the unquantized image, e.g. reference='bf16'.")
        missing = [name for name in images if any(key not in metrics.get(name, {}) for key, _, _ in METRICS)]
        if missing:
            raise BadSettingError(f"No relative_error, psnr_db and ssim for {', '.join(missing)}: compute them for every "
                                   "image (Q.image_metrics) before starting the game.")
        if image_px < 64 or columns < 1:
            raise BadSettingError(f"image_px={image_px} and columns={columns}: show images at least 64 px wide "
                                   "(320 or more to judge them), at least one per row.")
        import ipywidgets as w

        self.images = dict(images)
        self.metrics = {name: dict(metrics[name]) for name in self.images}
        self.reference = reference
        self.not_run = dict(not_run or {})
        self.rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        self.image_px = image_px
        self.round = 0
        self.revealed = False
        self.history: list[tuple[int, int]] = []  # (right, images) of every revealed round
        self._order: list[str] = []  # scheme of each image, in display order: never shown before Reveal
        self._locked: list[str | None] = []

        others = sorted(name for name in self.images if name != reference)
        options = [(UNCHOSEN, None), (f"{reference} (unquantized reference)", reference)] + [(n, n) for n in others]
        self.captions = [w.HTML() for _ in self.images]
        self.pictures = [w.Image(format="png", layout=w.Layout(width=f"{image_px}px")) for _ in self.images]
        self.guesses = [w.Dropdown(options=options, value=None, layout=w.Layout(width=f"{image_px}px"))
                        for _ in self.images]
        for guess in self.guesses:
            guess.observe(self._guess_changed, "value")
        cards = [w.VBox([caption, picture, guess]) for caption, picture, guess
                 in zip(self.captions, self.pictures, self.guesses)]
        self.reveal_button = w.Button(description="Reveal", button_style="primary", icon="eye")
        self.new_round_button = w.Button(description="New round", icon="refresh")
        self.reveal_button.on_click(lambda _: self.reveal())
        self.new_round_button.on_click(lambda _: self.new_round())
        self.status = w.HTML()
        self.score = w.HTML()
        self.answers = w.HTML()
        intro = w.HTML(f"<b>{html.escape(QUESTION)}</b> Each image was made by one scheme (one of them is the "
                       "unquantized reference), from the same prompt, seed and steps. Pick a scheme under every image, "
                       "then press Reveal: it locks your guesses and shows the answers, your score and the numbers. "
                       "New round shows the images in a new order.<br><i>"
                       + html.escape(stand_in_note(stand_in, sliced)) + "</i>")
        self.widget = w.VBox([
            intro,
            w.GridBox(cards, layout=w.Layout(grid_template_columns=f"repeat({columns}, max-content)",
                                             grid_gap="16px 16px")),
            w.HBox([self.reveal_button, self.new_round_button]),
            self.status, self.score, self.answers,
        ])
        self.widget.add_class("fluxnb-game")
        self.new_round()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # --- a round ----------------------------------------------------------------------------------

    def _shuffled(self) -> list[str]:
        """A random order of the images, never the one of the round before (the learner would notice)."""
        order = list(self.images)
        while True:
            self.rng.shuffle(order)
            if order != self._order or len(order) < 2:
                return order

    def new_round(self) -> None:
        """The New round button: a new order, no guesses, nothing labelled; the running score stays."""
        self._order = self._shuffled()
        self.round += 1
        self.revealed = False
        self._locked = []
        for i, (caption, picture, guess) in enumerate(zip(self.captions, self.pictures, self.guesses)):
            caption.value = f"<b>image {i + 1}</b>"
            picture.value = _png(self.images[self._order[i]], self.image_px)
            guess.value = None
            guess.disabled = False
        self.reveal_button.disabled = False
        self.answers.value = ""
        self.status.value = f"Round {self.round}: pick a scheme under every image, then press Reveal."

    def _guess_changed(self, change: dict[str, Any]) -> None:
        """After Reveal a guess stays what it was (the dropdowns are disabled too)."""
        if self.revealed:
            i = self.guesses.index(change["owner"])
            if change["new"] != self._locked[i]:
                change["owner"].value = self._locked[i]

    def reveal(self) -> None:
        """The Reveal button: with every image guessed, lock the guesses, label the images, score the
        round, and show the metrics table; with a guess missing, say which images still need one."""
        if self.revealed:
            self.status.value = "This round is revealed: press New round to play again."
            return
        open_ = [str(i + 1) for i, guess in enumerate(self.guesses) if guess.value is None]
        if open_:
            self.status.value = (f"<span style='color:{ERROR}'>Image {', '.join(open_)} "
                                 f"{'has' if len(open_) == 1 else 'have'} no guess yet: pick a scheme under every "
                                 "image, then press Reveal.</span>")
            return
        self.revealed = True
        self._locked = [guess.value for guess in self.guesses]
        for guess in self.guesses:
            guess.disabled = True
        self.reveal_button.disabled = True
        right = 0
        for i, (name, guess) in enumerate(zip(self._order, self._locked)):
            ok = guess == name
            right += ok
            label = html.escape(name + (" (unquantized reference)" if name == self.reference else ""))
            verdict = (f"<span style='color:{RIGHT}'>✔ right</span>" if ok
                       else f"<span style='color:{WRONG}'>✘ you said {html.escape(str(guess))}</span>")
            self.captions[i].value = f"<b>image {i + 1}: {label}</b> {verdict}"
        self.history.append((right, len(self._order)))
        total_right = sum(r for r, _ in self.history)
        total = sum(n for _, n in self.history)
        where = self._order.index(self.reference) + 1
        said = self._locked[where - 1]
        spotted = ("you spotted it" if said == self.reference
                   else f"you called it {html.escape(str(said))}")
        self.score.value = (f"<b>Round {self.round}: {right} of {len(self._order)} right.</b> "
                            f"All revealed rounds: {total_right} of {total} over {len(self.history)} round(s). "
                            f"Random guesses get 1 right per round on average. The unquantized reference was "
                            f"image {where}: {spotted}.")
        self.answers.value = self.table()
        self.status.value = "Revealed: your guesses are locked. Press New round to play again in a new order."

    def table(self) -> str:
        """The metrics of every image in display order, with the guess (HTML); then the schemes not run."""
        head = "".join(f"<th>{html.escape(title)}</th>" for title in
                       ("image", "scheme", "your guess", "", *(t for _, t, _ in METRICS)))
        rows = []
        for i, name in enumerate(self._order):
            guess = self._locked[i] if self._locked else None
            cells = [f"image {i + 1}", name, str(guess), "✔" if guess == name else "✘"]
            cells += [_number(float(self.metrics[name][key]), spec) for key, _, spec in METRICS]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        table = f"<table><tr>{head}</tr>{''.join(rows)}</table>"
        if self.not_run:
            table += "<p>Not run on this machine:</p><ul>" + "".join(
                f"<li>{html.escape(name)}: {html.escape(why)}</li>" for name, why in self.not_run.items()) + "</ul>"
        return table
