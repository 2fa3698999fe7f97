"""The switch: what a notebook loads for the model it names, honouring ``FLUXNB_CHECKPOINT``.

Every notebook's parameters cell calls :func:`resolve_checkpoint` (and :func:`prequantized_checkpoint`)
first. Unset, they return the Hub's ids. Set to a stand-in (``tiny``, ``random-dev``, ``random-schnell``,
``random-klein``), they return the same ids, and the stand-in Hub of the kernel (:mod:`fluxnb.hub`) serves
the stand-ins under them: FLUX.1-dev (gated, as the real one), FLUX.1-schnell, FLUX.2-klein-4B and FLUX.1-dev's
NF4 package, each built on first use by :mod:`fluxnb.checkpoints` and :mod:`fluxnb.prequantized`. So no
lesson cell after the parameters cell asks which one it runs on: it downloads what it names, through
huggingface_hub's own client.

This module sits above the others it uses (checkpoints, prequantized, hub), so none of them imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fluxnb import hub
from fluxnb.checkpoints import (ENV_VAR, REPOSITORIES, VARIANTS, build_random, build_tiny, cache_dir, stand_in_kind,
                                variant_of)
from fluxnb.exceptions import BadSettingError
from fluxnb.prequantized import NF4_PARTS, ORIGINALS, PREQUANTIZED_REPOS, is_quantized_part, stand_in_package


def stand_in_repositories(kind: str) -> list[hub.Repository]:
    """The repositories a ``kind`` (``"tiny"`` or ``"random"``) stand-in Hub holds, each built on first use:
    FLUX.1-dev (gated, as the real one), FLUX.1-schnell, FLUX.2-klein-4B, and the NF4 package of FLUX.1-dev
    (``hf-internal-testing/flux.1-dev-nf4-pkg``) made from the stand-in in this machine's dtype."""
    build = build_tiny if kind == "tiny" else build_random
    repositories = [hub.Repository(f"black-forest-labs/{REPOSITORIES[variant]}", build=lambda variant=variant: build(variant),
                                   gated=variant == "dev") for variant in VARIANTS]

    def package() -> Path:
        from fluxnb.environment import pick_dtype

        return stand_in_package(kind, pick_dtype())

    repositories.append(hub.Repository(PREQUANTIZED_REPOS["dev"], build=package))
    return repositories


def resolve_checkpoint(model_id: str, choice: str | None = None) -> str:
    """Return what ``from_pretrained`` should load for ``model_id``, honouring ``FLUXNB_CHECKPOINT``.

    ``choice`` overrides the environment variable (a recipe's ``--checkpoint`` uses it).

    * unset: ``model_id``, from the Hub;
    * a stand-in (``tiny``, ``random-dev``, ``random-schnell``, ``random-klein``): ``model_id`` too, the real
      repository id, now served by the stand-in Hub of this process (:func:`fluxnb.hub.serve`): the
      notebook downloads it through huggingface_hub as it would the real model, into the stand-ins' own
      cache. ``tiny`` serves the tiny stand-ins, any ``random-*`` the full-size random ones, each of the
      repository's own model (FLUX.1-dev, -schnell or FLUX.2-klein-4B). The stand-in of ``model_id`` is
      built here if it is not yet (a random one: about a minute on a GPU; refused without one), so no
      download waits for a build. Without a GPU (the tiny course), diffusers' bitsandbytes quantizers
      are opened for the CPU (:func:`fluxnb.cpu_bitsandbytes.allow_bitsandbytes_on_cpu`); on a GPU that
      changes nothing. Must come before diffusers or transformers are imported (see :mod:`fluxnb.hub`);
    * anything else: a Hub id or a local folder, used as given.
    """
    choice = (os.environ.get(ENV_VAR, "") if choice is None else choice).strip()
    kind = stand_in_kind(choice)
    if kind is None:
        return choice or model_id
    repository = hub.serve(kind, lambda: stand_in_repositories(kind), cache_dir() / f"hub-{kind}").repositories.get(
        model_id.strip("/"))
    if repository is None:
        raise BadSettingError(f"FLUXNB_CHECKPOINT={choice} has stand-ins of {', '.join(hub.current().repositories)} only, "
                         f"not of {model_id!r}: set MODEL_ID to one of them, or unset FLUXNB_CHECKPOINT.")
    from fluxnb.cpu_bitsandbytes import allow_bitsandbytes_on_cpu  # it imports diffusers: after serve()

    allow_bitsandbytes_on_cpu()  # no-op on a GPU
    repository.folder()  # built now, not while a download waits
    return model_id


def prequantized_checkpoint(model_id: str, dtype: torch.dtype, choice: str | None = None) -> str | None:
    """Where the NF4 T5 and transformer for ``model_id`` come from, or None to quantize while loading.

    Follows ``FLUXNB_CHECKPOINT`` (``choice`` overrides it) as :func:`fluxnb.resolve_checkpoint` does:

    * unset, or a stand-in: the Hub package of the original FLUX.1 variant (:data:`PREQUANTIZED_REPOS`), None
      if there is none (schnell, klein) or ``model_id`` is not the original (a fine-tune: its own weights
      must be used). With a stand-in the stand-in Hub serves that package under its real id, made from the
      stand-in (:func:`fluxnb.prequantized.stand_in_package`, built here if it is not yet, in this machine's
      :func:`fluxnb.pick_dtype`, the one the notebooks' ``DTYPE`` is);
    * anything else (a folder or Hub id): itself if it has the package layout (``text_encoder_2`` and
      ``transformer`` whose ``config.json`` carry a ``quantization_config``), else None.
    """
    choice = (os.environ.get(ENV_VAR, "") if choice is None else choice).strip()
    variant = variant_of(model_id)
    if choice and stand_in_kind(choice) is None:
        return choice if all(is_quantized_part(choice, part) for part in NF4_PARTS) else None
    official = model_id.strip("/").lower() == ORIGINALS.get(variant, "").lower()  # no FLUX.1 package for klein
    repo = PREQUANTIZED_REPOS.get(variant) if official else None
    if repo is not None and choice:
        resolve_checkpoint(model_id, choice)  # serves the stand-ins (before anything imports huggingface_hub)
        served = hub.served_repository(repo)
        if served is not None:
            served.folder()  # the package is made now, not while a download waits
    return repo
