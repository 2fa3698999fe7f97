"""Errors that teach: each check says what is wrong and what to do next, before any model loads.

A new user's bad input should end in one sentence they can act on, not in a traceback from deep
inside a tokenizer or a 34 GB download that fails at the end. The checks here are called by
:mod:`fluxnb.stages` and :mod:`fluxnb.environment` (and so by every notebook):

* arguments: :func:`check_prompt`, :func:`check_seed`, :func:`check_side`, :func:`check_steps`,
  :func:`check_guidance`, :func:`check_max_sequence_length`;
* a size this GPU cannot hold, from the measured memory of the course's recipes
  (:func:`check_size_fits`, :func:`estimate_vram_gib`);
* files that are missing, cut off or corrupted (:func:`check_safetensors_file`,
  :func:`check_model_folder`, :func:`check_checkpoint_folder`, :func:`load_image_with_settings`);
* embeddings made by another checkpoint (:func:`check_embeddings`, :func:`check_embeddings_settings`);
* a prompt longer than CLIP's or T5's limit: one line (:func:`prompt_truncation_notice`);
* CUDA out of memory, answered with the memory in use and the next recipe (:func:`oom_advice`);
* the Hub: a repo that does not exist, a bad token, a gated repo, no network (:func:`check_hub_access`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fluxnb import capacity  # called as capacity.next_recipe(): the one answer to "what next?"
from fluxnb.capacity import GIB, course_recipe, estimate_vram_gib, largest_size_that_fits
from fluxnb.checkpoints import is_stand_in
from fluxnb.hub import stand_in_gb
from fluxnb import environment  # called as environment.x(): the machine, as tests replace it
from fluxnb.exceptions import (  # noqa: F401  (raised here and by the modules below)
    BadSettingError, DamagedFileError, FluxnbError, HubAccessError, HubUnreachableError, MissingFileError, NeedsGPUError)
from fluxnb.quiet import DropMessages



MAX_SIDE = 4096  # FLUX.1 was trained up to about 2 megapixels; beyond 4096 px a side is not a FLUX image
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_STEPS = 1000  # the scheduler's training timesteps: more steps than that repeat timesteps
MAX_T5_TOKENS = 512  # FLUX.1's T5 was trained on at most 512 tokens (schnell: 256)


# --- arguments --------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_prompt(prompt: Any) -> None:
    """A prompt is one non-empty string (a list would be a batch, which the course does not teach)."""
    if not isinstance(prompt, str):
        raise BadSettingError(f"prompt must be a string, not {type(prompt).__name__} ({prompt!r:.60}): "
                        "for several prompts, call once per prompt.")
    if not prompt.strip():
        raise BadSettingError("prompt is empty: describe the image, e.g. PROMPT = \"A cat holding a sign that says hello world\".")


def check_seed(seed: Any) -> None:
    """A seed is an integer in 0 .. 2**64-1 (``torch.Generator.manual_seed``'s range)."""
    if not _is_int(seed):
        raise BadSettingError(f"seed must be an integer, not {type(seed).__name__} ({seed!r}): e.g. seed=0. "
                        "For a random one: seed = random.randrange(2**32).")
    if not 0 <= seed <= MAX_SEED:
        raise BadSettingError(f"seed={seed} is out of range: use 0 <= seed <= 2**64 - 1, e.g. seed=0.")


def check_side(name: str, value: Any) -> None:
    """``height``/``width``: a positive multiple of 16 (FLUX packs 2x2 patches of 8x-downsampled latents)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        nearest = min(MAX_SIDE, max(16, round(value / 16) * 16))
    else:
        nearest = 1024
    if not _is_int(value) or value <= 0 or value % 16:
        raise BadSettingError(f"{name}={value!r} must be a positive multiple of 16 (FLUX packs 2x2 patches of "
                         f"8x-downsampled latents); try {name}={nearest}.")
    if value > MAX_SIDE:
        raise BadSettingError(f"{name}={value} is larger than {MAX_SIDE}: FLUX.1 was trained up to about 2 megapixels "
                         f"(e.g. 1024x1024, 1440x1440); try {name}={nearest}.")


def check_latents_size(latents: torch.Tensor, height: int, width: int) -> None:
    """Before decoding: ``height``/``width`` are valid and are the size the packed ``latents`` were made for
    (one latent patch per 16x16 pixels); else ``ValueError`` naming the sizes that would fit."""
    check_side("height", height)
    check_side("width", width)
    patches = latents.shape[1] if latents.dim() == 3 else None
    if patches != (height // 16) * (width // 16):
        raise BadSettingError(f"These latents hold {patches} patches of 16x16 pixels but {height}x{width} needs "
                         f"{(height // 16) * (width // 16)}: decode with the height and width you denoised with.")


def check_steps(steps: Any) -> None:
    """``num_inference_steps``: an integer from 1 to :data:`MAX_STEPS`."""
    if not _is_int(steps) or steps < 1:
        raise BadSettingError(f"num_inference_steps={steps!r} must be an integer >= 1 "
                         "(FLUX.1-dev: about 28-50, FLUX.1-schnell: 4).")
    if steps > MAX_STEPS:
        raise BadSettingError(f"num_inference_steps={steps} is more than the scheduler's {MAX_STEPS} timesteps: "
                         "FLUX.1-dev needs about 28-50, FLUX.1-schnell 4.")


def check_guidance(guidance: Any) -> None:
    """``guidance_scale``: a finite number >= 0 (dev is trained around 3.5; schnell ignores it)."""
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise BadSettingError(f"guidance_scale must be a number, not {guidance!r} (dev: 3.5, schnell: 0).")
    if guidance < 0:
        raise BadSettingError(f"guidance_scale={guidance!r} must be >= 0 (dev: 3.5, schnell: 0).")


def check_max_sequence_length(max_sequence_length: Any) -> None:
    """T5's token budget: an integer from 1 to 512 (FLUX.1-dev: 512, schnell: 256)."""
    if not _is_int(max_sequence_length) or not 1 <= max_sequence_length <= MAX_T5_TOKENS:
        raise BadSettingError(f"max_sequence_length={max_sequence_length!r} must be an integer from 1 to "
                         f"{MAX_T5_TOKENS} (FLUX.1-dev: 512, FLUX.1-schnell: 256): "
                         "use fluxnb.generation_settings(MODEL_ID)['max_sequence_length'].")


def check_generation_request(height: int, width: int, steps: int, guidance: float | None = None,
                             seed: int | None = None, prompt: str | None = None) -> None:
    """Raise ``ValueError``/``TypeError`` for settings FLUX cannot use, with the nearest ones it can.

    FLUX packs 2x2 latent patches and the VAE downsamples 8x, so sides must be multiples of 16.
    ``seed`` and ``prompt`` are checked when given (the checks above say what each accepts).
    """
    check_side("height", height)
    check_side("width", width)
    check_steps(steps)
    if guidance is not None:
        check_guidance(guidance)
    if seed is not None:
        check_seed(seed)
    if prompt is not None:
        check_prompt(prompt)


# --- a size this GPU cannot hold ------------------------------------------------------------------
# The memory model is fluxnb.capacity's (one place for "does it fit?" and "what next?"): course_recipe,
# estimate_vram_gib and largest_size_that_fits are imported from there, and stay importable here.


def check_size_fits(height: int, width: int, checkpoint: str | None = None, recipe: str | None = None,
                    vram_gib: float | None = None) -> None:
    """Raise ``ValueError`` before loading if ``height`` x ``width`` cannot fit this GPU's VRAM.

    ``vram_gib``: the GPU's total (default: this one's, or the rehearsed envelope's); without a GPU,
    or for the tiny stand-in on this machine (its memory is not FLUX's), nothing is checked. A ``vram_gib``
    given asks about FLUX.1 on that GPU, whatever this machine runs. ``recipe``: a name in
    :data:`fluxnb.capacity.SIZE_MODEL_RECIPES` (default: the course's staged NF4 flow in this GPU's dtype).
    """

    check_side("height", height)
    check_side("width", width)
    if vram_gib is None:
        if checkpoint is not None and is_stand_in(checkpoint) == "tiny":
            return  # this machine runs the tiny stand-in, whose memory is not FLUX's: nothing to check here
        vram_gib = environment.machine_info().vram_gib
        if vram_gib is None:
            return
    recipe = recipe or course_recipe(environment.pick_dtype())
    need = estimate_vram_gib(recipe, height, width)
    if need <= vram_gib:
        return
    fits = largest_size_that_fits(recipe, height, width, vram_gib)
    instead = (f"try HEIGHT, WIDTH = {fits[0]}, {fits[1]}" if fits else "no size fits this recipe here: next, "
               f"{capacity.next_recipe(recipe, height, width, vram_gib, environment.bf16_supported())}, or a larger GPU")
    raise BadSettingError(
        f"{height}x{width} needs about {need:.1f} GiB of VRAM with the {recipe} recipe (estimated from "
        "benchmarks/results/h100.json: activations grow with the pixel count), and this GPU has "
        f"{vram_gib:.1f} GiB: "
        f"{instead}, or decode in tiles (pipe.vae.enable_tiling())."
    )


# --- files: missing, cut off, corrupted -----------------------------------------------------------


def check_safetensors_file(path: str | Path, what: str, remedy: str) -> None:
    """Raise ``ValueError`` if ``path`` is not a complete safetensors file (cut off while saving, or not
    safetensors at all); ``FileNotFoundError`` if it is missing. ``remedy`` says what to do next.

    Reads only the header: 8 bytes of length, the JSON table of tensors, then checks that the file is
    exactly as long as the table says (a file cut off while it was written is shorter).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist: {remedy}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        problem = None
        if len(head) < 8:
            problem = f"it has {size} bytes, not even a header"
        else:
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                problem = f"its header says {n} bytes of table but the file has {size}"
            else:
                try:
                    table = json.loads(f.read(n))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    table = None
                if not isinstance(table, dict):
                    problem = "its header is not a safetensors table"
                else:
                    end = max((t["data_offsets"][1] for k, t in table.items() if k != "__metadata__"), default=0)
                    if 8 + n + end != size:
                        problem = f"it should be {8 + n + end} bytes long and is {size}: it was cut off"
    if problem:
        raise DamagedFileError(f"{what} {path} is damaged ({problem}): {remedy}")


def check_model_folder(folder: str | Path, what: str, remedy: str) -> None:
    """A folder written by ``save_pretrained`` (one model, e.g. ``<dir>/transformer``): its
    ``config.json`` parses and every weight file it needs is there and complete. Else ``ValueError``
    (or ``FileNotFoundError``) saying ``what`` is damaged and ``remedy``."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise MissingFileError(f"{what} {folder} has no config.json: {remedy}")
    try:
        json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(f"{what} {config} is not valid JSON ({error}): {remedy}") from error
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            files = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as error:
            raise DamagedFileError(f"{what} {indexes[0]} is damaged ({error}): {remedy}") from error
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
        if not files:
            raise MissingFileError(f"{what} {folder} has no .safetensors weights: {remedy}")
    for name in files:
        check_safetensors_file(folder / name, what, remedy)


def check_part(source: str, part: str) -> None:
    """Before ``from_pretrained(source, subfolder=part)``: if ``source`` is a folder here, its ``part``
    must be complete (a Hub id is checked by :func:`check_hub_access` and the download itself)."""
    if Path(source).is_dir():
        folder = Path(source) / part
        if not folder.is_dir() and (Path(source) / "config.json").is_file():
            folder = Path(source)  # one model saved alone: from_pretrained reads the folder itself
        check_model_folder(folder, f"The {part} in", "save or download it again (nothing was deleted: "
                           "remove the damaged folder yourself, or pass another folder).")


def looks_like_path(checkpoint: str) -> bool:
    """A folder name rather than a Hub id (``org/name``): absolute, relative, home, or more than one /."""
    return (checkpoint.startswith(("/", ".", "~")) or "\\" in checkpoint or checkpoint.count("/") > 1
            or os.path.isabs(checkpoint))


def check_checkpoint_folder(folder: str | Path) -> None:
    """A local FLUX checkpoint: exists, has ``model_index.json``; each model folder in it is complete."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingFileError(
            f"There is no folder {folder}. Check the path (it is relative to {Path.cwd()}), or use a Hub id such "
            "as \"black-forest-labs/FLUX.1-schnell\", or the offline stand-in: FLUXNB_CHECKPOINT=tiny."
        )
    if not (folder / "model_index.json").is_file():
        raise MissingFileError(
            f"{folder} is not a FLUX checkpoint in diffusers' layout: it has no model_index.json. Point at the "
            "folder that holds model_index.json, transformer/, vae/, text_encoder/ ... (what save_pretrained writes)."
        )
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        if (folder / part).is_dir():
            check_model_folder(folder / part, f"The {part} of", "download or save the checkpoint again "
                               "(delete the damaged folder yourself: nothing was deleted).")


def load_image_with_settings(path: str | Path) -> tuple[Any, dict[str, str]]:
    """Open a PNG saved by :func:`fluxnb.save_image`: the image (fully read) and its settings.

    A cut-off or corrupted file raises ``ValueError`` naming it; nothing is deleted or rewritten.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # PIL reads lazily: only this notices a file cut off in the middle
            return image.copy(), dict(getattr(image, "text", {}))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL's errors for damaged files
        if isinstance(error, FileNotFoundError):
            raise
        raise DamagedFileError(f"{path} is not a complete PNG ({error}): it was cut off or damaged. It was left as it is; "
                         "delete it yourself, or generate it again from the settings you saved with it.") from error


# --- embeddings made by another checkpoint --------------------------------------------------------


def check_embeddings(embeds: Mapping[str, torch.Tensor], transformer: Any) -> None:
    """Raise ``ValueError`` if ``embeds`` cannot feed ``transformer``: wrong keys, or widths of another
    model's text encoders (``joint_attention_dim`` for T5, ``pooled_projection_dim`` for CLIP)."""
    need = ("prompt_embeds", "pooled_prompt_embeds")
    missing = [key for key in need if key not in embeds]
    if missing:
        raise BadSettingError(f"The embeddings have no {', '.join(missing)} (they have {sorted(embeds)}): make them "
                         "with fluxnb.encode_prompt / fluxnb.encode_and_save and read them with fluxnb.load_embeddings.")
    config = transformer.config
    widths = {"prompt_embeds": (embeds["prompt_embeds"].shape[-1], config.joint_attention_dim, "T5"),
              "pooled_prompt_embeds": (embeds["pooled_prompt_embeds"].shape[-1], config.pooled_projection_dim, "CLIP")}
    for key, (have, want, encoder) in widths.items():
        if have != want:
            raise BadSettingError(
                f"These embeddings were made by another checkpoint: {key} is {have} wide but this transformer "
                f"expects {want} ({encoder}'s width). Encode the prompt again with the checkpoint you denoise with "
                "(fluxnb.encode_and_save(CHECKPOINT, ...)); the saved file's metadata says which made it."
            )


def check_embeddings_settings(metadata: Mapping[str, str], checkpoint: str) -> None:
    """Raise ``ValueError`` if embeddings saved with ``metadata`` (by :func:`fluxnb.save_embeddings`)
    were made by a checkpoint other than ``checkpoint``."""
    made_by = metadata.get("checkpoint")
    if made_by is None:
        raise BadSettingError("These embeddings carry no 'checkpoint' in their metadata, so nothing says which model "
                         "made them: save them with fluxnb.save_embeddings(..., checkpoint=CHECKPOINT, ...).")
    if made_by != str(checkpoint):
        raise BadSettingError(f"These embeddings were made by {made_by}, not by {checkpoint}: encode the prompt again "
                         f"with {checkpoint} (fluxnb.encode_and_save), or denoise with {made_by}.")


# --- prompts longer than CLIP's or T5's limit -------------------------------------------------------

_TRUNCATION_LOGS = (
    ("diffusers.pipelines.flux.pipeline_flux", "The following part of your input was truncated"),
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than"),
)


@contextmanager
def _without_truncation_logs() -> Iterator[None]:
    """Drop exactly the libraries' truncation warnings (which print the whole cut text) while inside."""
    filters = [(logging.getLogger(name), DropMessages(prefix, at_start=True)) for name, prefix in _TRUNCATION_LOGS]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def truncation_message(prompt: str, clip_tokenizer: Any, t5_tokenizer: Any, max_sequence_length: int) -> str | None:
    """One line saying how many tokens of ``prompt`` CLIP and T5 will not see, or None if none are cut."""
    with _without_truncation_logs():
        n_clip = len(clip_tokenizer(prompt).input_ids) if clip_tokenizer is not None else 0
        n_t5 = len(t5_tokenizer(prompt).input_ids) if t5_tokenizer is not None else 0
    clip_max = clip_tokenizer.model_max_length if clip_tokenizer is not None else n_clip
    cut = []
    if n_clip > clip_max:
        cut.append(f"CLIP reads {clip_max} tokens: {n_clip - clip_max} of the prompt's {n_clip} were cut")
    if n_t5 > max_sequence_length:
        cut.append(f"T5 reads {max_sequence_length}: {n_t5 - max_sequence_length} of {n_t5} were cut")
    if not cut:
        return None
    if n_t5 <= max_sequence_length:
        cut.append(f"T5 read all {n_t5} (it carries most of the prompt's meaning)")
    return "Long prompt: " + "; ".join(cut) + "."


@contextmanager
def prompt_truncation_notice(pipe: Any, prompt: str, max_sequence_length: int) -> Iterator[None]:
    """Around ``pipe.encode_prompt``: check the prompt, print one line if CLIP or T5 cut it, and drop the
    libraries' own truncation warnings (which print the whole cut text) -- there and only there."""
    check_prompt(prompt)
    check_max_sequence_length(max_sequence_length)
    line = truncation_message(prompt, getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None),
                              max_sequence_length)
    if line:
        print(line)
    with _without_truncation_logs():
        yield


# --- CUDA out of memory ---------------------------------------------------------------------------

class NotEnoughVRAMError(FluxnbError, torch.OutOfMemoryError):
    """CUDA ran out of memory; the message says what was in use and which recipe to try next
    (:func:`fluxnb.capacity.next_recipe`)."""


def memory_in_use() -> str:
    """What the GPU holds now, in words: this process's tensors and cache, and the device's total."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to this process"
    free, total = torch.cuda.mem_get_info()
    return (f"{torch.cuda.memory_allocated() / GIB:.2f} GiB in tensors, {torch.cuda.memory_reserved() / GIB:.2f} GiB "
            f"reserved by PyTorch, {(total - free) / GIB:.2f} of {total / GIB:.2f} GiB in use on the device")


@contextmanager
def oom_advice(height: int, width: int, recipe: str | None = None, vram_gib: float | None = None) -> Iterator[None]:
    """Turn a CUDA out-of-memory error inside the block into :class:`NotEnoughVRAMError`: the memory in
    use when it happened, and the next recipe that fits (:func:`fluxnb.capacity.next_recipe`).
    ``recipe``: what is running (default: the course's staged NF4 flow in this GPU's dtype); ``vram_gib``:
    the GPU's total (default: this one's). The original error stays attached as the cause."""

    recipe = recipe or course_recipe(environment.pick_dtype())
    try:
        yield
    except torch.OutOfMemoryError as error:
        if isinstance(error, NotEnoughVRAMError):
            raise

        in_use = memory_in_use()
        total = vram_gib if vram_gib is not None else (environment.machine_info().vram_gib or 0.0)
        next_one = capacity.next_recipe(recipe, height, width, total, environment.bf16_supported())
        raise NotEnoughVRAMError(
            f"CUDA ran out of memory during {recipe} at {height}x{width} ({in_use}). Next: {next_one}. "
            "Restart the runtime (or del pipe; fluxnb.flush()) first: the failed run still holds its memory."
        ) from error


def missing_resources_for(checkpoint: str, vram_gib: float | None = None, ram_gib: float | None = None) -> str | None:
    """:func:`fluxnb.missing_resources` for a section that loads ``checkpoint``: the figures asked for are
    FLUX.1's, and the tiny stand-in (:func:`fluxnb.is_stand_in`) needs a few MB, so for it the answer is None
    (it runs anywhere); for any other checkpoint, what this machine lacks now, or None."""
    if is_stand_in(checkpoint) == "tiny":
        return None
    return environment.missing_resources(vram_gib=vram_gib, ram_gib=ram_gib)


# --- the Hub: missing repo, bad token, gated, no network ---------------------------------------------


def check_repo_id(checkpoint: str) -> None:
    """Raise ``ValueError`` if ``checkpoint`` is neither a folder nor a well-formed Hub id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(checkpoint)
    except HFValidationError as error:
        raise BadSettingError(f"{checkpoint!r} is neither a folder here nor a Hub model id like "
                         f"\"black-forest-labs/FLUX.1-schnell\" ({error}).") from error


def where_to_put_the_token(runtime: str | None = None) -> str:
    """What to do with a Hugging Face read token on ``runtime`` (default: this one,
    :func:`fluxnb.environment.runtime`) so that :func:`fluxnb.environment.find_hub_token` finds it."""
    runtime = runtime or environment.runtime()
    if runtime == environment.COLAB:
        return ("on Colab, store it as a secret: the key icon in the left bar -> Add new secret, name HF_TOKEN, the "
                "token as its value, and switch on Notebook access for it")
    if runtime == environment.KAGGLE:
        return ("on Kaggle, store it as a secret: Add-ons -> Secrets -> Add Secret, label HF_TOKEN, the token as its "
                "value, and tick it so that it is attached to this notebook; Internet must be on too (Settings -> "
                "Internet, which needs a phone-verified Kaggle account)")
    return ("on this machine, set the HF_TOKEN environment variable to it before starting Jupyter, or run "
            "`hf auth login` once in a terminal")


def check_hub_access(repo_id: str, token: str | None) -> None:
    """Ask the Hub whether ``token`` may download ``repo_id`` (one small request, no weights).

    Offline (``HF_HUB_OFFLINE=1``) the repo must be in the cache. Raises ``FileNotFoundError`` (no such
    repo, or private), ``PermissionError`` (bad token; gated and the licence not accepted),
    ``ConnectionError`` (no network and not cached). Never prints the token.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    if constants.is_offline_mode():
        if cached:
            return
        raise HubUnreachableError(
            f"Offline (HF_HUB_OFFLINE=1) and {repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}). "
            "Connect and unset HF_HUB_OFFLINE to download it, or use the offline stand-in: FLUXNB_CHECKPOINT=tiny."
        )
    import httpx

    try:
        HfApi().auth_check(repo_id, token=token or False)
    except GatedRepoError as error:
        raise HubAccessError(
            f"{repo_id} is gated and this token has no access yet: open https://huggingface.co/{repo_id}, accept "
            "the licence with the account the token belongs to, then run it again."
        ) from error
    except RepositoryNotFoundError as error:
        raise MissingFileError(
            f"The Hub has no model {repo_id} (or it is private and this token cannot see it). Check the spelling: "
            "\"black-forest-labs/FLUX.1-dev\" or \"black-forest-labs/FLUX.1-schnell\"."
        ) from error
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise HubAccessError(
                "The Hugging Face token was refused (invalid or revoked): make a new read token on "
                f"https://huggingface.co/settings/tokens and put it in place of the old one: {where_to_put_the_token()} "
                "(an HF_TOKEN environment variable, where one is set, comes first: replace or unset it). Then "
                + ("restart the session (Runtime -> Restart session: Colab's secret is read once a session) and run "
                   "the notebook again." if environment.runtime() == environment.COLAB else "run this cell again.")
            ) from error
        raise
    except httpx.TransportError as error:
        if cached:
            return  # the download is cached: from_pretrained can run without the network
        internet = ("turn Internet on (Settings -> Internet, which needs a phone-verified Kaggle account)"
                    if environment.runtime() == environment.KAGGLE else "check the internet connection (a firewall, a proxy)")
        raise HubUnreachableError(
            f"The Hugging Face Hub cannot be reached ({type(error).__name__}) and {repo_id} is not cached: "
            f"{internet}, or use the offline stand-in: FLUXNB_CHECKPOINT=tiny."
        ) from error


# Hub repos that need an accepted licence and a token. FLUX.1-schnell is Apache-2.0 and open.
GATED_PREFIXES = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Fill-dev",
                  "black-forest-labs/FLUX.1-Kontext-dev", "black-forest-labs/FLUX.1-Krea-dev")
DOWNLOAD_GB = {"dev": 34.0, "schnell": 34.0}


def check_checkpoint_access(checkpoint: str) -> None:
    """Before any download: the folder or Hub repo exists, a gated repo has a token that may read it,
    and the download fits on the disk.

    A local folder must hold a complete checkpoint (``model_index.json``, weights not cut off). For a
    Hub id, raise ``NeedsGPUError`` (a ``RuntimeError``) on a machine without a GPU (a Colab CPU runtime: the real model
    would download 34 GB, then crawl), ``PermissionError`` if the repo is gated and no token is
    configured, or the token is refused or has not accepted the licence, ``FileNotFoundError`` if
    there is no such repo, ``ConnectionError`` without network (or offline) when it is not cached,
    ``OSError`` if the Hugging Face cache's disk is too small for a download that is not cached yet.
    The token is never printed.
    """
    if Path(checkpoint).expanduser().is_dir() or looks_like_path(checkpoint):
        check_checkpoint_folder(checkpoint)
        return
    check_repo_id(checkpoint)
    from huggingface_hub import constants, try_to_load_from_cache

    stand_in = is_stand_in(checkpoint)  # "tiny": served by the stand-in Hub of this process, runs on a CPU
    if not torch.cuda.is_available() and stand_in != "tiny":
        gpu = {environment.COLAB: "Runtime -> Change runtime type -> T4 GPU (if the free GPU quota is used up, try "
                                  "again later)",
               environment.KAGGLE: "Settings -> Accelerator -> GPU T4 x2 (Kaggle's GPUs need a phone-verified account)"}
        where = environment.runtime()
        raise NeedsGPUError(
            f"No GPU in this runtime, so {checkpoint} would download tens of GB and then run for hours on the CPU. "
            + (f"Choose a GPU: {gpu[where]}. " if where in gpu else
               f"Run it on a machine with an NVIDIA GPU, on Colab ({gpu[environment.COLAB]}) or on Kaggle "
               f"({gpu[environment.KAGGLE]}). ")
            + "Or learn the steps without a GPU on the tiny offline stand-in: uncomment "
            "os.environ[\"FLUXNB_CHECKPOINT\"] = \"tiny\" in the parameters cell and run the notebook again."
        )

    token = environment.find_hub_token()
    if checkpoint.startswith(GATED_PREFIXES) and not token:
        raise HubAccessError(
            f"{checkpoint} is gated: accept its licence on https://huggingface.co/{checkpoint}, make a read token "
            f"on https://huggingface.co/settings/tokens, then {where_to_put_the_token()}, and run this cell again. "
            "No token? Use "
            "MODEL_ID = 'black-forest-labs/FLUX.1-schnell', which is open."
        )
    check_hub_access(checkpoint, token)
    cached = try_to_load_from_cache(checkpoint, "model_index.json")
    if not isinstance(cached, str):
        need = stand_in_gb(checkpoint) if stand_in else DOWNLOAD_GB["schnell" if "schnell" in checkpoint.lower() else "dev"]
        environment.check_free_disk(constants.HF_HUB_CACHE, need, what=f"Downloading {checkpoint}")
