"""Which FLUX checkpoint the notebooks load, and the stand-ins fluxnb builds offline.

The notebooks always name the real model (``black-forest-labs/FLUX.1-dev``, or
``black-forest-labs/FLUX.2-klein-4B`` for the FLUX.2 [klein] lesson) and pass it through
:func:`fluxnb.switch.resolve_checkpoint`. The environment variable ``FLUXNB_CHECKPOINT`` swaps it for a stand-in
of the same family (:func:`family_of`: ``"flux1"`` or ``"klein"``):

* unset or empty: the model id written in the notebook (downloaded from the Hub as usual);
* ``tiny``: a tiny pipeline of the notebook's own model with random weights (real diffusers/transformers
  classes, real tokenizers made locally), built in about a second on a CPU: FLUX.1-dev or -schnell
  (``FluxPipeline``), or FLUX.2 [klein] 4B (``Flux2KleinPipeline``). Every notebook runs end to end on it;
* ``random-dev`` / ``random-schnell``: the real FLUX.1-dev / schnell shapes (11.9B-parameter
  transformer, T5-XXL, CLIP-L, VAE) with random weights, about 34 GB on disk, laid out as the Hub's
  repositories are: the same file names, shards of the same sizes (to the byte, see
  :data:`REAL_MAX_SHARD_BYTES`), index files of the same form, and the repositories' own
  ``config.json`` files (``fluxnb/configs``). Memory and speed depend on shapes, not on values, so this
  rehearses a run -- loading 10 GB shards on a 12.7 GB VM included -- before the 34 GB download. Its
  images are noise: it says nothing about image quality. The weights are written one tensor at a time
  (:func:`save_file_streamed`), so building needs a few hundred MB of memory, not 24 GB. It is built
  only where a GPU can use it (:func:`build_random` refuses a machine without one, unless asked);
* ``random-klein``: the same for FLUX.2 [klein] 4B (4.0B-parameter transformer, Qwen3-4B text encoder,
  the FLUX.2 VAE; about 16 GB on disk, in ``black-forest-labs/FLUX.2-klein-4B``'s layout);
* anything else: a Hub id or a local folder, used as given.

A notebook gets its stand-in through the Hub's own client: :func:`fluxnb.switch.resolve_checkpoint` returns the
real id and the kernel's stand-in Hub (:mod:`fluxnb.hub`) serves each repository's own stand-in under it
(``tiny`` the tiny ones, any ``random-*`` the random ones), so one ``FLUXNB_CHECKPOINT`` serves every notebook,
FLUX.1 and klein alike. The tools that load a stand-in straight from its folder (the benchmark, the dry run)
use :func:`stand_in_folder`, where ``random-schnell`` on FLUX.1-dev still means schnell's stand-in and any
``random-*`` on klein means ``random-klein`` (:func:`random_variant`).

Stand-ins are built once, into ``FLUXNB_CACHE`` (default ``~/.cache/fluxnb``), written to a temporary
folder first and renamed when complete, so an interrupted build never leaves a half checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from fluxnb.environment import check_free_disk
from fluxnb.exceptions import BadSettingError, NeedsGPUError
from fluxnb.quiet import no_progress_bars

ENV_VAR = "FLUXNB_CHECKPOINT"
WITHOUT_GPU_VAR = "FLUXNB_BUILD_WITHOUT_GPU"  # 1: build random-dev/-schnell/-klein on a machine without a GPU anyway
STAND_INS = ("tiny", "random-dev", "random-schnell", "random-klein")
VARIANTS = ("dev", "schnell", "klein")  # "klein": FLUX.2 [klein] 4B
_DONE = "fluxnb_done.json"
RANDOM_LAYOUT = 2  # 2: the Hub's file layout and configs; 1 (or none): fluxnb's own 2 GB shards, rebuilt on use

CONFIGS = Path(__file__).resolve().parent / "configs"
"""The real repositories' config files, as the Hub serves them (``FLUX.1-dev/transformer/config.json`` ...),
and their weight files' byte sizes (``FLUX.1-dev.files.json``). They were gathered from public copies of
those files, since no machine of this project can download the gated repository: see ``fluxnb/configs/README.md``."""
REPOSITORIES = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell", "klein": "FLUX.2-klein-4B"}

# --- configs ------------------------------------------------------------------------------------
# The full-size configs are those of black-forest-labs/FLUX.1-dev and FLUX.1-schnell (diffusers
# format): the keyword arguments that build each model, equal to the values in CONFIGS' files
# (tests/test_checkpoints.py checks it). Only the transformer's guidance embedding and the scheduler
# differ between the two. The random stand-ins write those files themselves, not configs saved anew.

FULL_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FULL_T5: dict[str, Any] = dict(  # google/t5-v1_1-xxl, encoder only
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    is_encoder_decoder=False, use_cache=False,
)
FULL_CLIP: dict[str, Any] = dict(  # openai/clip-vit-large-patch14, text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
FULL_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.3611,
    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
# Tiny: every Linear width is a multiple of 64 (bitsandbytes' 4-bit CPU kernels need it), and the
# VAE keeps four blocks so images are 8x the latents, as in the real model (sizes: multiples of 16).
TINY_TRANSFORMER: dict[str, Any] = dict(
    FULL_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
)
TINY_T5: dict[str, Any] = dict(FULL_T5, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2)
TINY_CLIP: dict[str, Any] = dict(
    FULL_CLIP, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    projection_dim=64,
)
TINY_VAE: dict[str, Any] = dict(
    FULL_VAE, layers_per_block=1, norm_num_groups=8, block_out_channels=(16, 16, 32, 32), sample_size=256,
)
SCHEDULER_DEV: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
SCHEDULER_SCHNELL: dict[str, Any] = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

# FLUX.2 [klein] 4B (black-forest-labs/FLUX.2-klein-4B, diffusers format): the keyword arguments that
# build each model, equal to CONFIGS / "FLUX.2-klein-4B" (tests/test_checkpoints.py checks it). The
# text encoder is Qwen3-4B (Qwen3ForCausalLM); the pipeline feeds the transformer the hidden states of
# three of its layers side by side (KLEIN_TEXT_LAYERS), hence joint_attention_dim = 3 x 2560.
KLEIN_TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers default
FULL_KLEIN_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=5, num_single_layers=20, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
FULL_QWEN3: dict[str, Any] = dict(  # Qwen/Qwen3-4B's shapes
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_theta=1000000, attention_bias=False, attention_dropout=0.0, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, max_window_layers=36, use_sliding_window=False, sliding_window=None,
)
FULL_KLEIN_VAE: dict[str, Any] = dict(  # AutoencoderKLFlux2: 32 latent channels, patchified 2x2 into 128
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=32, norm_num_groups=32, sample_size=1024, use_quant_conv=True,
    use_post_quant_conv=True, mid_block_add_attention=True, batch_norm_eps=1e-4, batch_norm_momentum=0.1,
    patch_size=(2, 2),
)
SCHEDULER_KLEIN: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)
# Tiny klein: the text encoder keeps 28 layers (tiny ones), since the pipeline reads layers 9, 18 and 27;
# the VAE keeps 32 latent channels (the transformer sees 4 x 32 = 128) and four blocks (images 16x the
# packed latents, as in the real model); every Linear width is a multiple of 64.
TINY_KLEIN_TRANSFORMER: dict[str, Any] = dict(
    FULL_KLEIN_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=3 * 64, axes_dims_rope=(8, 8, 8, 8),
)
TINY_QWEN3: dict[str, Any] = dict(
    FULL_QWEN3, hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_window_layers=28, max_position_embeddings=1024,
)
TINY_KLEIN_VAE: dict[str, Any] = dict(
    FULL_KLEIN_VAE, layers_per_block=1, norm_num_groups=8, block_out_channels=(16, 16, 32, 32), sample_size=256,
)


def config_path(part: str) -> str:
    """Where a diffusers-format repository keeps ``part``'s config ("transformer", ..., "scheduler",
    or "model_index"), relative to the repository: ``transformer/config.json``, ``model_index.json`` ..."""
    return {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}.get(part, f"{part}/config.json")


def real_config(variant: str, part: str) -> dict[str, Any]:
    """The Hub repository's own config of ``part`` (:func:`config_path`) for FLUX.1-``variant`` (or, for
    ``"klein"``, FLUX.2-klein-4B), as its file holds it (``_diffusers_version`` and all; see
    ``fluxnb/configs/README.md`` for what of klein's files could not be found)."""
    return json.loads((CONFIGS / REPOSITORIES[variant] / config_path(part)).read_text())


def real_files(variant: str) -> dict[str, int]:
    """Byte sizes of the ``variant``'s files on the Hub, by path (the weights, and for schnell and klein the small
    files). Klein's weight sizes are derived, not found: see ``FLUX.2-klein-4B.files.json``'s ``derived``."""
    return json.loads((CONFIGS / f"{REPOSITORIES[variant]}.files.json").read_text())["files"]


def cache_dir() -> Path:
    """Folder that holds the stand-ins: ``$FLUXNB_CACHE``, else ``~/.cache/fluxnb``."""
    return Path(os.environ.get("FLUXNB_CACHE", Path.home() / ".cache" / "fluxnb")).expanduser()


def stand_in_dir(kind: str, variant: str) -> Path:
    """The folder that stand-in ``kind`` (``"tiny"`` or ``"random"``) of ``variant`` is built into:
    ``cache_dir() / "{kind}-{repository, lower case}"``, e.g. ``~/.cache/fluxnb/random-flux.1-dev``, and for
    klein ``~/.cache/fluxnb/random-flux.2-klein-4b``."""
    return cache_dir() / f"{kind}-{REPOSITORIES[variant].lower()}"


def family_of(model_id: str) -> str:
    """``"klein"`` if the model id (or folder) names FLUX.2 [klein], else ``"flux1"``."""
    return "klein" if "klein" in str(model_id).lower() else "flux1"


def variant_of(model_id: str) -> str:
    """``"klein"`` if the model id names FLUX.2 [klein], else ``"schnell"`` if it names FLUX.1-schnell, else ``"dev"``."""
    if family_of(model_id) == "klein":
        return "klein"
    return "schnell" if "schnell" in model_id.lower() else "dev"


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'dev', 'schnell' or 'klein', not {variant!r}")


def generation_settings(model_id: str) -> dict[str, Any]:
    """The settings each FLUX.1 variant was trained for: steps, guidance, and T5 tokens.

    FLUX.1-dev is guidance-distilled: about 28-50 steps with ``guidance_scale`` 3.5, prompts up to
    512 T5 tokens. FLUX.1-schnell is timestep-distilled: 1-4 steps, no guidance input (0), at most
    256 tokens. The notebooks read them from here, so changing ``MODEL_ID`` changes all three.

    FLUX.2 [klein] 4B is step-distilled: 4 steps, ``guidance_scale`` 1.0 (the model card's example;
    ``Flux2KleinPipeline`` ignores guidance above 1 for a distilled model, with a warning, and its own
    defaults, 50 steps and 4.0, are those of the undistilled base models), prompts up to 512 Qwen3
    tokens (the pipeline's ``max_sequence_length`` default).
    """
    if variant_of(model_id) == "klein":
        return dict(steps=4, guidance=1.0, max_sequence_length=512)
    if variant_of(model_id) == "schnell":
        return dict(steps=4, guidance=0.0, max_sequence_length=256)
    return dict(steps=50, guidance=3.5, max_sequence_length=512)


def stand_in_kind(choice: str) -> str | None:
    """``"tiny"`` or ``"random"`` for a ``FLUXNB_CHECKPOINT`` value that names a stand-in, else None."""
    choice = choice.strip()
    return None if choice not in STAND_INS else ("tiny" if choice == "tiny" else "random")


def stand_in_folder(model_id: str, choice: str) -> str:
    """The folder of the stand-in ``choice`` of ``model_id``'s family, built on first use, or ``choice`` itself
    if it names no stand-in: for the tools that load a stand-in straight from disk (the benchmark, the dry
    run), where what is measured is memory and speed, not a download. ``tiny`` follows ``model_id``'s variant;
    ``random-dev``/``-schnell`` name theirs within FLUX.1 and ``random-klein`` gives the notebook's own
    (:func:`random_variant`)."""
    choice = choice.strip()
    if choice not in STAND_INS:
        return choice or model_id
    from fluxnb.cpu_bitsandbytes import allow_bitsandbytes_on_cpu

    allow_bitsandbytes_on_cpu()  # no-op on a GPU
    if choice == "tiny":
        return str(build_tiny(variant_of(model_id)))
    return str(build_random(random_variant(model_id, choice)))


def random_variant(model_id: str, choice: str) -> str:
    """Which random stand-in ``choice`` (``random-dev``, ``-schnell`` or ``-klein``) gives for ``model_id``
    in :func:`stand_in_folder`: always one of the notebook's family."""
    if family_of(model_id) == "klein":
        return "klein"
    named = choice.removeprefix("random-")
    return variant_of(model_id) if named == "klein" else named


def is_stand_in(checkpoint: str | os.PathLike[str]) -> str | None:
    """``"tiny"``, ``"random"`` or None: which kind of fluxnb stand-in ``checkpoint`` is: a stand-in's folder,
    or a repository id that this process's stand-in Hub serves (:func:`fluxnb.switch.resolve_checkpoint`)."""
    marker = Path(checkpoint) / _DONE
    if marker.is_file():
        return str(json.loads(marker.read_text())["kind"])
    from fluxnb import hub

    return hub.serving() if hub.served_repository(str(checkpoint)) is not None else None


def describe(checkpoint: str | os.PathLike[str]) -> str:
    """``checkpoint`` as a measurement's record should name it: the id or folder, and which stand-in it is if
    it is one (``"black-forest-labs/FLUX.1-dev (the tiny stand-in: random weights)"``)."""
    kind = is_stand_in(checkpoint)
    return str(checkpoint) if kind is None else f"{checkpoint} (the {kind} stand-in: random weights)"


# --- tokenizers ---------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte-to-printable-character table (the 256 symbols byte-level BPE starts from)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def make_clip_tokenizer() -> Any:
    """A real ``CLIPTokenizer`` (byte-level BPE) with a character-level vocabulary and no merges.

    The real CLIP vocabulary cannot be downloaded here; ids stay below CLIP-L's 49408 so the same
    tokenizer serves the tiny and the full-size stand-ins.
    """
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def make_t5_tokenizer() -> Any:
    """A real ``T5TokenizerFast`` (Unigram) over printable ASCII, ids below T5's 32128."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [("\u2581" + chr(c), -2.5) for c in range(33, 127)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


# A chat template of Qwen3's form, short: what Flux2KleinPipeline._get_qwen3_prompt_embeds renders
# (apply_chat_template with add_generation_prompt=True, enable_thinking=False) comes out as Qwen3's does:
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n".
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
QWEN3_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def make_qwen3_tokenizer() -> Any:
    """A real ``Qwen2TokenizerFast`` (byte-level BPE, as Qwen3's) with the 256 byte symbols as its vocabulary,
    no merges, Qwen3's special tokens and a chat template of Qwen3's form (:data:`QWEN3_CHAT_TEMPLATE`).

    Qwen3's 151,646-token vocabulary cannot be downloaded here; ids stay below 262, so the same tokenizer
    serves the tiny and the full-size klein stand-ins. Padding is ``<|endoftext|>``, as Qwen3's."""
    from transformers import Qwen2TokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode())}
    for token in QWEN3_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN3_SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# --- building -----------------------------------------------------------------------------------


_PARTS = ("scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "transformer")
KLEIN_PARTS = ("scheduler", "tokenizer", "text_encoder", "vae", "transformer")
# The full-size build streams these two to disk (11.9B and 4.8B parameters); the others are small
# (CLIP-L 0.12B, the VAE 0.08B: under 0.3 GB in bf16) and are made whole, as in the tiny build.
STREAMED_PARTS = ("text_encoder_2", "transformer")
# How big each weight file may get, as the libraries that wrote FLUX.1's repositories (2024-08) cut them:
# diffusers' save_pretrained then and now writes shards of at most "10GB", transformers' then "5GB" (5.x
# writes "50GB"). With these caps, in the models' own parameter order, the random stand-ins' shards
# come out at the byte sizes of the Hub's files (real_files(); tests/test_checkpoints.py checks it).
REAL_MAX_SHARD_BYTES = {"transformer": 10 * 10**9, "text_encoder_2": 5 * 10**9}
# FLUX.2-klein-4B (2026-01): diffusers' "10GB" for the transformer (one 7.75 GB file) and, for Qwen3-4B, the
# "5GB" of transformers 4.x (two shards; the config says 4.57): the Hub's sizes are derived from these.
KLEIN_STREAMED_PARTS = ("text_encoder", "transformer")
KLEIN_MAX_SHARD_BYTES = {"transformer": 10 * 10**9, "text_encoder": 5 * 10**9}
SHARD_BYTES = 2 * 10**9  # write_streamed's default shard size, for other models


def parts_of(variant: str) -> tuple[str, ...]:
    """The pipeline's components, in build order (each part's seed is its place here)."""
    return KLEIN_PARTS if variant == "klein" else _PARTS


def streamed_parts(variant: str) -> tuple[str, ...]:
    """The components the full-size build streams to disk, one tensor at a time."""
    return KLEIN_STREAMED_PARTS if variant == "klein" else STREAMED_PARTS


def max_shard_bytes(variant: str) -> dict[str, int]:
    """The Hub's shard caps for the streamed components of ``variant``."""
    return KLEIN_MAX_SHARD_BYTES if variant == "klein" else REAL_MAX_SHARD_BYTES
INIT_STD = 0.02  # normal(0, 0.02) for Linear and Embedding weights: finite through FLUX's 57 blocks


def _make_klein_part(name: str, tiny: bool) -> Any:
    """Instantiate one FLUX.2 [klein] 4B component (random weights, current default device/dtype)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if name == "scheduler":
        return FlowMatchEulerDiscreteScheduler(**SCHEDULER_KLEIN)
    if name == "tokenizer":
        return make_qwen3_tokenizer()
    if name == "text_encoder":
        cfg = dict(TINY_QWEN3 if tiny else FULL_QWEN3)
        if tiny:
            tok = make_qwen3_tokenizer()
            cfg.update(vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return Qwen3ForCausalLM(Qwen3Config(**cfg))
    if name == "vae":
        return AutoencoderKLFlux2(**(TINY_KLEIN_VAE if tiny else FULL_KLEIN_VAE))
    if name == "transformer":
        return Flux2Transformer2DModel(**(TINY_KLEIN_TRANSFORMER if tiny else FULL_KLEIN_TRANSFORMER))
    raise ValueError(f"unknown FLUX.2 [klein] component {name!r}")


def _make_part(name: str, variant: str, tiny: bool) -> Any:
    """Instantiate one FLUX component; models get random weights (current default device/dtype)."""
    if variant == "klein":
        return _make_klein_part(name, tiny)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if name == "scheduler":
        return FlowMatchEulerDiscreteScheduler(**(SCHEDULER_DEV if variant == "dev" else SCHEDULER_SCHNELL))
    if name == "tokenizer":
        return make_clip_tokenizer()
    if name == "tokenizer_2":
        return make_t5_tokenizer()
    if name == "text_encoder":
        tok = make_clip_tokenizer()
        cfg = dict(TINY_CLIP if tiny else FULL_CLIP, bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if tiny:
            cfg["vocab_size"] = len(tok)
        return CLIPTextModel(CLIPTextConfig(**cfg))
    if name == "text_encoder_2":
        cfg = dict(TINY_T5 if tiny else FULL_T5)
        if tiny:
            cfg["vocab_size"] = len(make_t5_tokenizer())
        return T5EncoderModel(T5Config(**cfg))
    if name == "vae":
        return AutoencoderKL(**(TINY_VAE if tiny else FULL_VAE))
    if name == "transformer":
        return FluxTransformer2DModel(**dict(TINY_TRANSFORMER if tiny else FULL_TRANSFORMER,
                                             guidance_embeds=variant == "dev"))
    raise ValueError(f"unknown FLUX component {name!r}")


COMPONENTS = {"transformer": "transformer", "text_encoder_2": "T5-XXL encoder", "text_encoder": "CLIP-L text",
              "vae": "VAE"}  # the four models of a FLUX.1 pipeline, biggest first, with the names people use
KLEIN_COMPONENTS = {"transformer": "transformer", "text_encoder": "Qwen3-4B text encoder", "vae": "VAE"}


def components_of(variant: str) -> dict[str, str]:
    """The models of ``variant``'s pipeline (:data:`COMPONENTS`, or :data:`KLEIN_COMPONENTS` for klein)."""
    return KLEIN_COMPONENTS if variant == "klein" else COMPONENTS


def parameter_counts(variant: str = "dev") -> dict[str, int]:
    """Parameters of each model (keys of :func:`components_of`: FLUX.1's four, klein's three), counted without any weights.

    Each model is built from the real config (the ones above, equal to the Hub's ``config.json``) on
    PyTorch's ``meta`` device: every tensor has its shape but no memory, so counting all of FLUX's
    parameters takes a second and no download, on any machine. The counts are computed once per variant
    (the configs are fixed): the Studio and notebook 12 ask again at every load."""
    _check_variant(variant)
    return dict(_parameter_counts(variant))  # a copy: the caller may change it


@functools.cache
def _parameter_counts(variant: str) -> dict[str, int]:
    with torch.device("meta"), no_progress_bars():
        return {name: sum(p.numel() for p in _make_part(name, variant, tiny=False).parameters())
                for name in components_of(variant)}


# --- streaming a big model to disk --------------------------------------------------------------


def init_rule(model: torch.nn.Module, key: str) -> str:
    """How :func:`write_streamed` fills weight ``key``, from the module that owns it: ``"normal"``
    (Linear and Embedding weights), ``"zeros"`` (biases) or ``"ones"`` (norm scales). Anything else
    is refused rather than guessed."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf == "bias":
        return "zeros"
    if leaf == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return "normal"
    if leaf == "weight" and "norm" in type(module).__name__.lower():  # LayerNorm, RMSNorm, T5LayerNorm
        return "ones"
    raise ValueError(f"no initialisation rule for {key!r} (a {type(module).__name__}'s {leaf!r})")


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, rule: str, seed: int,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """One weight, returned on the CPU. Its values depend on ``seed``, ``key`` and ``device`` (the CPU's
    and CUDA's generators differ) only, not on what was made before it."""
    if rule == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if rule == "ones":
        return torch.ones(shape, dtype=dtype)
    if rule != "normal":
        raise ValueError(f"unknown initialisation rule {rule!r}")
    # one 32-bit seed per (seed, key): the CPU's Mersenne Twister ignores a seed's upper 32 bits
    generator = torch.Generator(device).manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    values = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=generator)
    return values.cpu()


_SAFETENSORS_DTYPES = {  # safetensors' names, in the order its writer sorts tensors (the largest dtypes first)
    torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def safetensors_header(specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, list[str]]:
    """The header ``safetensors.torch.save_file`` writes for tensors of these shapes and dtypes (its
    8-byte length included), and the order the tensors' bytes follow it in: ``__metadata__`` first,
    tensors by dtype (largest first) then name, JSON without spaces, padded with spaces to 8 bytes."""
    order = sorted(specs, key=lambda name: (list(_SAFETENSORS_DTYPES).index(specs[name][1]), name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        shape, dtype = specs[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def safetensors_size(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None) -> int:
    """Bytes of the safetensors file these tensors make (header and data), without making them."""
    header, _ = safetensors_header(specs, metadata)
    return len(header) + sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())


def save_file_streamed(path: str | os.PathLike[str], specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                       make: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are made one at a time by ``make(name)``.

    ``specs`` gives each tensor's shape and dtype, so the header is written first and each tensor's
    bytes follow as soon as it is made: memory holds one tensor, not the file. The bytes are exactly
    what ``safetensors.torch.save_file`` writes for the same tensors (tests/test_checkpoints.py
    compares them).
    """
    header, order = safetensors_header(specs, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for name in order:
            tensor = make(name)
            if tuple(tensor.shape) != tuple(specs[name][0]) or tensor.dtype != specs[name][1]:
                raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, the header says "
                                 f"{tuple(specs[name][0])} {specs[name][1]}")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor


def write_hub_json(path: Path, data: dict[str, Any]) -> None:
    """JSON as the Hub's configs and indexes are written: two-space indent, sorted keys, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def shard_layout(model: Any, max_shard_bytes: int = SHARD_BYTES) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The weight files :func:`write_streamed` writes for ``model`` (on any device, ``meta`` too):
    ``{file name: {tensor name: (shape, dtype)}}``, cut at ``max_shard_bytes`` the way ``save_pretrained``
    cuts them (huggingface_hub's splitter, the parameters in the model's own order), and the name of
    the index file if there are several files (else None)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import PreTrainedModel

    state = model.state_dict()
    buffers = sorted(name for name, _ in model.named_buffers() if name in state)
    if buffers:  # their values come from the module's code, not from an initialisation rule
        raise NotImplementedError(f"{type(model).__name__} has persistent buffers {buffers}: save it whole")
    names = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise NotImplementedError(f"{type(model).__name__}'s state dict has entries that are not parameters: {unknown}")
    first_name: dict[int, str] = {}  # tied weights (T5's embeddings): save_pretrained keeps the first name
    for name, param in names.items():
        first_name.setdefault(id(param), name)
    kept = set(first_name.values())
    state = {key: value for key, value in state.items() if key in kept}
    if isinstance(model, PreTrainedModel):  # what transformers' save_pretrained leaves out
        for key in model._keys_to_ignore_on_save or ():
            state.pop(key, None)
        pattern, index_name = "model{suffix}.safetensors", "model.safetensors.index.json"
    else:
        pattern, index_name = "diffusion_pytorch_model{suffix}.safetensors", "diffusion_pytorch_model.safetensors.index.json"
    split = split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=max_shard_bytes)
    files = {filename: {key: (tuple(state[key].shape), state[key].dtype) for key in keys}
             for filename, keys in split.filename_to_tensors.items()}
    return files, index_name if split.is_sharded else None


def write_streamed(model: Any, folder: str | os.PathLike[str], seed: int, device: str | torch.device = "cpu",
                   max_shard_bytes: int = SHARD_BYTES, config: dict[str, Any] | None = None) -> None:
    """Save ``model`` -- a diffusers or transformers model instantiated on the ``meta`` device -- with
    random weights, in the layout its ``save_pretrained`` writes, so plain ``from_pretrained`` loads it.

    Each weight is made (:func:`random_tensor`, on ``device``: a GPU is faster) just before its bytes
    are written (:func:`save_file_streamed`), so memory holds one tensor, whatever ``max_shard_bytes``.
    Files: the config (``config.json``: ``config`` as given, e.g. the real repository's, else the model's
    own), the weight files of :func:`shard_layout`, and, if there are several, the index
    (``diffusion_pytorch_model.safetensors.index.json`` or ``model.safetensors.index.json``, with
    ``metadata.total_size`` as the Hub's FLUX.1 indexes have it). Deterministic: the same ``seed`` and
    ``device`` give the same files.
    """
    from transformers import PreTrainedModel

    folder = Path(folder)
    files, index_name = shard_layout(model, max_shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        write_hub_json(folder / "config.json", config)
    elif isinstance(model, PreTrainedModel):  # what transformers' save_pretrained writes besides the weights
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
    else:
        model.save_config(folder)
    for filename, specs in files.items():
        save_file_streamed(folder / filename, specs, metadata={"format": "pt"}, make=lambda key: random_tensor(
            key, specs[key][0], specs[key][1], init_rule(model, key), seed, device))
    if index_name is not None:
        total = sum(math.prod(shape) * dtype.itemsize for specs in files.values() for shape, dtype in specs.values())
        weight_map = {key: filename for filename, specs in files.items() for key in specs}
        write_hub_json(folder / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_pipeline(folder: Path, variant: str, tiny: bool, device: str, dtype: torch.dtype) -> None:
    """Build and save the components one at a time, so peak memory is one model, not five.

    In the full-size build the transformer and T5 are streamed (:func:`write_streamed`), cut into the
    real repository's shards, and every component gets the real repository's config file: the folder
    then looks, file by file, like the Hub's FLUX.1 (but for the locally made tokenizers).
    """
    index: dict[str, Any] = {"_class_name": "Flux2KleinPipeline" if variant == "klein" else "FluxPipeline",
                             "_diffusers_version": version("diffusers")}
    if variant == "klein":
        index["is_distilled"] = True  # FLUX.2-klein-4B is step-distilled (its model_index.json says so)
    for seed, name in enumerate(parts_of(variant)):
        stream = not tiny and name in streamed_parts(variant)
        real = None if tiny or name.startswith("tokenizer") else real_config(variant, name)
        torch.manual_seed(seed)  # a component's weights depend on its own seed only
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta" if stream else device):
                part = _make_part(name, variant, tiny)
        finally:
            torch.set_default_dtype(previous)
        if stream:
            write_streamed(part, folder / name, seed=seed, device=device, max_shard_bytes=max_shard_bytes(variant)[name],
                           config=real)
            extra = CONFIGS / REPOSITORIES[variant] / name / "generation_config.json"
            if extra.is_file():  # Qwen3's, as the Hub's klein holds it
                write_hub_json(folder / name / extra.name, json.loads(extra.read_text()))
        elif name == "scheduler":
            part.save_config(folder / name)
        else:
            with no_progress_bars():  # "Writing model shards": fluxnb's bookkeeping, not the learner's
                part.save_pretrained(folder / name)
        if real is not None and not stream:  # the Hub's own file, not the one saved anew
            write_hub_json(folder / config_path(name), real)
        library = "transformers" if type(part).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(part).__name__]
        del part
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if tiny:
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        write_hub_json(folder / config_path("model_index"), real_config(variant, "model_index"))


def _is_complete(folder: Path, kind: str) -> bool:
    """A finished build of ours, in the current layout (random stand-ins of an older layout are rebuilt)."""
    marker = folder / _DONE
    if not marker.is_file():
        return False
    return kind != "random" or json.loads(marker.read_text()).get("layout") == RANDOM_LAYOUT


def _build(kind: str, variant: str, device: str, dtype: torch.dtype, need_gb: float) -> Path:
    """Build a stand-in once into the cache; return its folder. Reuses a complete earlier build."""
    _check_variant(variant)
    final = stand_in_dir(kind, variant)
    if _is_complete(final, kind):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    check_free_disk(final.parent, need_gb, what=f"the {kind} {REPOSITORIES[variant]} stand-in")
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # ours: a build that was interrupted
    staging.mkdir()
    _write_pipeline(staging, variant, tiny=kind == "tiny", device=device, dtype=dtype)
    (staging / "README.md").write_text(_CARD.format(kind=kind, name=REPOSITORIES[variant],
                                                    tokenizers=_TOKENIZERS["klein" if variant == "klein" else "flux1"]))
    marker = {"kind": kind, "variant": variant, **({"layout": RANDOM_LAYOUT} if kind == "random" else {})}
    (staging / _DONE).write_text(json.dumps(marker) + "\n")
    if final.exists():  # ours (it has our marker, or none): incomplete, or of an older layout
        shutil.rmtree(final)
    staging.rename(final)
    return final


def build_tiny(variant: str = "dev") -> Path:
    """Build (once) the tiny random pipeline of ``variant`` (``"dev"``, ``"schnell"`` or ``"klein"``) in fp32
    on the CPU; a few MB, about a second.

    Deterministic: the same fluxnb, torch and library versions give byte-identical files.
    """
    return _build("tiny", variant, device="cpu", dtype=torch.float32, need_gb=0.1)


def random_stand_in_gb(variant: str = "dev") -> float:
    """GB (10^9 bytes) of weights the random stand-in writes: those of the real repository's files."""
    return sum(size for path, size in real_files(variant).items() if path.endswith(".safetensors")) / 1e9


def _cpu_random_numbers_per_second() -> float:
    """How fast this CPU makes bf16 normal random numbers, as :func:`random_tensor` does (timed now, ~0.05 s)."""
    values = torch.empty(2**22, dtype=torch.bfloat16)
    generator = torch.Generator("cpu").manual_seed(0)
    start = time.perf_counter()
    values.normal_(0.0, INIT_STD, generator=generator)
    return values.numel() / max(time.perf_counter() - start, 1e-6)


def no_gpu_message(variant: str = "dev") -> str:
    """Why the random stand-in is not built on a machine without a GPU, what it would cost, and what to do."""
    numbers = sum(parameter_counts(variant).values())
    minutes = numbers / _cpu_random_numbers_per_second() / 60
    return (f"FLUXNB_CHECKPOINT=random-{variant} is {REPOSITORIES[variant]}'s real shapes with random weights: it would "
            f"write {random_stand_in_gb(variant):.1f} GB to {cache_dir()} (at least {max(minutes, 0.1):.1f} min here "
            f"for the random numbers alone, timed just now on this CPU's {os.cpu_count()} cores, plus the disk's "
            "time), and nothing in the course can run it without a GPU. This machine has none: use "
            "FLUXNB_CHECKPOINT=tiny, which runs every notebook on a CPU in seconds. To build it anyway (to rehearse "
            f"the disk space and the files), set {WITHOUT_GPU_VAR}=1 or call fluxnb.build_random(..., without_gpu=True).")


def build_random(variant: str = "dev", device: str | None = None, without_gpu: bool | None = None) -> Path:
    """Build (once) FLUX.1-``variant`` (or, for ``"klein"``, FLUX.2-klein-4B) with the real shapes and random
    bf16 weights, in the Hub's file layout: ~34 GB (klein: ~16 GB).

    The weights are written one tensor at a time, so the build needs a few hundred MB of RAM (and, on
    a GPU, a few hundred MB of VRAM) whatever the machine: a free Colab T4 can build it. The random
    numbers are made on the GPU when there is one (about a minute, mostly disk writes).
    The same ``device`` gives the same files; the CPU and a GPU give different random values.

    On a machine without a GPU nothing can run it, so the build is refused before anything is written
    (:class:`fluxnb.exceptions.NeedsGPUError`, with its size and time) unless ``without_gpu`` is True or
    ``FLUXNB_BUILD_WITHOUT_GPU=1``. A complete earlier build is returned anywhere.
    """
    _check_variant(variant)
    cuda = torch.cuda.is_available()
    if not cuda and not _is_complete(stand_in_dir("random", variant), "random"):
        allowed = os.environ.get(WITHOUT_GPU_VAR, "").strip() == "1" if without_gpu is None else without_gpu
        if not allowed:
            raise NeedsGPUError(no_gpu_message(variant))
    device = device or ("cuda" if cuda else "cpu")
    return _build("random", variant, device=device, dtype=torch.bfloat16, need_gb=18.0 if variant == "klein" else 36.0)


_TOKENIZERS = {"flux1": "The tokenizers are real CLIP and T5 tokenizer classes with a small character-level vocabulary.",
               "klein": "The tokenizer is a real Qwen2TokenizerFast (byte-level BPE) with a 261-token vocabulary and a\n"
                        "chat template of Qwen3's form."}
_CARD = """# fluxnb {kind} stand-in for {name}

Random weights in the diffusers layout of {name}, built offline by fluxnb
(`fluxnb.checkpoints`). This is NOT {name}: its images are noise. It exists so that notebooks, tests
and memory/speed measurements run where the real weights cannot be downloaded.
{tokenizers}
The random (full-size) stand-ins otherwise look like the Hub's repository file by file: the same weight
files and shard sizes, index files and config files (copied from `fluxnb/configs`).
"""
