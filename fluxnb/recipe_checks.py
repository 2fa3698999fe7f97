"""What every script in ``recipes/`` checks before it loads anything, and a save that loses nothing.

A recipe that stops after its loads (zero steps, an output folder it cannot write, a misspelt
checkpoint) costs a T4 user minutes; one that stops at its last line, in the save, loses the image. So
each script makes one call at the top of ``main()``, :func:`check_before_loading`, which checks

* the settings (``--prompt``, ``--height``/``--width``, ``--steps``, ``--guidance``, ``--seed``,
  ``--max-sequence-length``), with :mod:`fluxnb.errors`' checks, each message led by its flag;
* the output folder: created, and a file written into it and deleted (:func:`check_output_folder`),
  with room on its disk for the PNG;
* the checkpoint (:func:`check_checkpoint`): a complete folder, or a Hub id that is cached (offline) or
  reachable, with a token where it is gated, a GPU to run it, and disk space for its download;

and ends the script on bad input with ONE line on stderr and exit status 2, before diffusers or
transformers is imported. At the end, :func:`save_or_keep` saves the image in ``--out``, or, if that
fails now (the folder vanished, a full disk), in the current folder, then the system's temporary
folder, and says where in one line.

Exit statuses, as the scripts' docstrings say: 0, the image is in ``--out``; 2, bad input, nothing was
loaded; 1, a failure after the loads (non-finite latents, ...), or the image could not be saved in
``--out`` and was kept elsewhere. That last one is 1, not 0, because the run did not do what it was
asked: a shell script that reads ``--out`` next must not go on as if the image were there, and the line
on stderr (and the result line's ``image``) say where it is.

The checks are :mod:`fluxnb.errors`' and :mod:`fluxnb.environment`'s; where their advice is a notebook's
(``FLUXNB_CHECKPOINT=tiny``, the parameters cell), the sentence here is a script's (``--checkpoint tiny``).

The stand-ins: a script resolves its ``--checkpoint`` (its ``checkpoint_path``, which calls
:func:`fluxnb.resolve_checkpoint` for ``tiny``, ``random-dev`` ...) through the ``resolve`` it passes in,
after the settings and the folder are checked and before anything here imports ``huggingface_hub``:
``resolve_checkpoint`` may point ``HF_ENDPOINT`` at a local Hub, which ``huggingface_hub`` reads once,
when first imported. What a stand-in resolves to is fluxnb's own: a folder is checked for completeness,
a Hub id (served locally) not at all -- no token, GPU or download applies to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fluxnb import environment
from fluxnb.checkpoints import WITHOUT_GPU_VAR, family_of, real_files, variant_of
from fluxnb.errors import (GATED_PREFIXES, check_checkpoint_folder, check_guidance, check_hub_access,
                           check_max_sequence_length, check_part, check_prompt, check_repo_id, check_seed, check_side,
                           check_steps, looks_like_path)
from fluxnb.exceptions import (BadSettingError, FluxnbError, HubAccessError, HubUnreachableError, MissingFileError,
                               NeedsGPUError, UnwritableFolderError)
from fluxnb.prequantized import NF4_PARTS

BAD_INPUT = 2  # the exit status for bad input, as argparse's own
NF4_PACKAGE_GB = 13.0  # hf-internal-testing/flux.1-dev-nf4-pkg: T5 6.3 GB + transformer 6.7 GB (fluxnb.prequantized)
PIPELINES = {"flux1": "FluxPipeline", "klein": "Flux2KleinPipeline"}  # what each family's model_index.json names
TRY_TINY = "or try the recipe offline on the CPU with --checkpoint tiny"


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message is one sentence; this makes sure of the line)."""
    return " ".join(str(error).split())


# --- settings ------------------------------------------------------------------------------------


def check_settings(args: argparse.Namespace) -> None:
    """``args.prompt``, ``height``, ``width``, ``steps``, ``guidance``, ``seed`` and ``max_sequence_length``
    are ones FLUX can use; else :class:`BadSettingError` whose message starts with the flag and its value."""
    checks: list[tuple[str, Any, Callable[[Any], None]]] = [
        ("--prompt", args.prompt, check_prompt),
        ("--height", args.height, lambda value: check_side("height", value)),
        ("--width", args.width, lambda value: check_side("width", value)),
        ("--steps", args.steps, check_steps),
        ("--guidance", args.guidance, check_guidance),
        ("--seed", args.seed, check_seed),
        ("--max-sequence-length", args.max_sequence_length, check_max_sequence_length),
    ]
    for flag, value, check in checks:
        try:
            check(value)
        except BadSettingError as error:
            shown = repr(value) if isinstance(value, str) else value
            raise BadSettingError(f"{flag} {shown}: {error}") from error


# --- the output folder -----------------------------------------------------------------------------


def png_bytes_at_most(height: int, width: int) -> int:
    """An upper bound on a ``height`` x ``width`` RGB PNG with its settings: the raw pixels plus 1 MiB
    (PNG compresses; it never grows much beyond the raw bytes)."""
    return height * width * 3 + 2**20


def remove_created(folders: list[Path]) -> None:
    """Remove ``folders`` (as :func:`check_output_folder` returned them), deepest first, while empty:
    only what the check made, never a folder with anything in it."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def check_output_folder(folder: str | os.PathLike[str], need_bytes: int = 0) -> list[Path]:
    """Make sure a file can be saved in ``folder``: create it (and its parents) if missing, write a small
    file into it and delete it, and check that its disk has ``need_bytes`` free.

    Trying is the only sure test (a read-only mount, a full disk, a folder under a file, no permission,
    /proc all answer differently), and it costs a millisecond, not the run. Returns the folders it
    created, parents first, so that a caller whose later checks fail can remove them (:func:`remove_created`).
    Raises :class:`UnwritableFolderError`; the probe file's name is new (``tempfile.mkstemp``), so nothing
    is overwritten.
    """
    folder = Path(folder)
    missing: list[Path] = []
    existing = folder
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        where = "it is a file, not a folder" if existing == folder else f"{existing} is a file, not a folder"
        raise UnwritableFolderError(f"--out {folder}: {where}: pass a folder to save the image in, e.g. --out images.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UnwritableFolderError(f"--out {folder}: it cannot be created in {existing} ({error.strerror}): pass a "
                                    "folder you can write, e.g. --out images.") from error
    created = list(reversed(missing))
    try:
        handle, probe = tempfile.mkstemp(prefix=".fluxnb-write-check-", dir=folder)
        try:
            os.write(handle, b"\0" * 4096)
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
        free = shutil.disk_usage(folder).free
    except OSError as error:
        remove_created(created)
        raise UnwritableFolderError(f"--out {folder}: nothing can be written in it ({error.strerror}): pass a "
                                    "folder you can write, e.g. --out images.") from error
    if free < need_bytes:
        remove_created(created)
        raise UnwritableFolderError(f"--out {folder}: its disk has {free / 1e6:.1f} MB free and the PNG may need "
                                    f"{need_bytes / 1e6:.1f} MB: free some space, or pass a folder on another disk.")
    return created


# --- the checkpoint --------------------------------------------------------------------------------


def download_gb(checkpoint: str, skip: tuple[str, ...] = ()) -> float:
    """GB (10^9 bytes) of weights ``from_pretrained`` downloads from the Hub repo ``checkpoint``, but for the
    parts in ``skip``: the real repository's file sizes (``fluxnb/configs``) of its variant (dev, schnell,
    klein; a fine-tune counts as the variant it names, else dev)."""
    files = real_files(variant_of(checkpoint))
    return sum(size for path, size in files.items()
               if path.endswith(".safetensors") and "/" in path and path.split("/")[0] not in skip) / 1e9


def _check_family(checkpoint: str, found: str, model_id: str) -> None:
    """``found`` (a pipeline class, or the family a Hub id names) must be the recipe's own."""
    want = PIPELINES[family_of(model_id)]
    if found != want:
        raise BadSettingError(f"--checkpoint {checkpoint} is a {found} checkpoint and this recipe runs {model_id} "
                              f"({want}): pass a {want} checkpoint, or use the recipe for that model "
                              "(recipes/t4_flux2_klein_fp16.py for FLUX.2 [klein], the others for FLUX.1).")


def _check_folder(checkpoint: str, model_id: str) -> None:
    if not Path(checkpoint).is_dir():
        raise MissingFileError(f"--checkpoint {checkpoint}: there is no such folder (relative to {Path.cwd()}): check "
                               f"the path, pass a Hub id such as {model_id}, {TRY_TINY}.")
    check_checkpoint_folder(checkpoint)
    index = json.loads((Path(checkpoint) / "model_index.json").read_text())
    _check_family(checkpoint, str(index.get("_class_name")), model_id)


def _check_nf4_folder(package: str) -> None:
    if not Path(package).is_dir():
        raise MissingFileError(f"--prequantized {package}: there is no such folder (relative to {Path.cwd()}): pass "
                               "a folder holding text_encoder_2/ and transformer/ saved in NF4, or leave it out.")
    for part in NF4_PARTS:
        check_part(package, part)
        if "quantization_config" not in json.loads((Path(package) / part / "config.json").read_text()):
            raise BadSettingError(f"--prequantized {package}: its {part} is not quantized (its config.json has no "
                                  "quantization_config): pass a package saved in NF4, or leave --prequantized out.")


def _cached(repo: str, file: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, file), str)


def _check_hub_id(flag: str, repo: str, cached: bool) -> None:
    """A Hub id that is well formed and, offline, cached: what can be said without the network."""
    from huggingface_hub import constants

    try:
        check_repo_id(repo)
    except BadSettingError as error:
        raise BadSettingError(f"{flag} {repo}: there is no such folder here, and {error}") from error
    if constants.is_offline_mode() and not cached:
        raise HubUnreachableError(
            f"{flag} {repo}: there is no such folder here, and offline (HF_HUB_OFFLINE=1) the Hub model {repo} is "
            f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}): check the name, connect and unset "
            f"HF_HUB_OFFLINE to download it, pass a folder instead, {TRY_TINY}.")


def _check_hub_access(flag: str, repo: str, token: str | None) -> None:
    """The Hub lets this token read ``repo`` (:func:`fluxnb.errors.check_hub_access`; a gated one needs a token)."""
    if repo.startswith(GATED_PREFIXES) and not token:
        raise HubAccessError(
            f"{flag} {repo} is gated and no Hugging Face token was found: accept its licence on "
            f"https://huggingface.co/{repo}, then set HF_TOKEN (or run huggingface_hub.login()), or use the open "
            "--checkpoint black-forest-labs/FLUX.1-schnell --steps 4 --guidance 0 --max-sequence-length 256.")
    try:
        check_hub_access(repo, token)
    except HubUnreachableError as error:
        raise HubUnreachableError(f"{flag} {repo}: the Hugging Face Hub cannot be reached and {repo} is not in its "
                                  "cache: check the internet connection (a firewall, a proxy), pass a folder "
                                  f"instead, {TRY_TINY}.") from error
    except (HubAccessError, MissingFileError) as error:
        raise type(error)(f"{flag} {repo}: {error}") from error


def check_checkpoint(checkpoint: str | None, model_id: str, nf4_package: str | None = None) -> None:
    """Before any load: ``checkpoint`` (``--checkpoint`` as given; None for a stand-in, which fluxnb made) is a
    complete folder of the recipe's model family, or a Hub id that can be downloaded and run here; so is
    ``nf4_package`` (``--prequantized``: ``text_encoder_2/`` and ``transformer/`` saved in NF4), if given.

    A Hub id must be well formed and, offline, cached; it needs a GPU (without one it would download tens
    of GB and then run for hours: ``--checkpoint tiny`` runs on a CPU); a gated one needs a token; online,
    the Hub must let this machine's token read it; and its download must fit on the Hugging Face cache's
    disk (:func:`fluxnb.environment.check_free_disk`, sizes from :func:`download_gb`). In that order: what
    needs no network first. Raises a :class:`FluxnbError` or ``OSError`` whose message is one sentence
    starting with the flag.
    """
    hub_ids = []  # (flag, repo, cached)
    if checkpoint is not None and (Path(checkpoint).is_dir() or looks_like_path(checkpoint)):
        _check_folder(checkpoint, model_id)
    elif checkpoint is not None:
        _check_family(checkpoint, PIPELINES[family_of(checkpoint)], model_id)  # as far as its name tells
        hub_ids.append(("--checkpoint", checkpoint, _cached(checkpoint, "model_index.json")))
    if nf4_package is not None and (Path(nf4_package).is_dir() or looks_like_path(nf4_package)):
        _check_nf4_folder(nf4_package)
    elif nf4_package is not None:
        hub_ids.append(("--prequantized", nf4_package, _cached(nf4_package, "transformer/config.json")))
    if not hub_ids:
        return
    for flag, repo, cached in hub_ids:
        _check_hub_id(flag, repo, cached)
    if not torch.cuda.is_available():
        flag, repo, _ = hub_ids[0]
        raise NeedsGPUError(
            f"{flag} {repo}: this machine has no GPU, so it would download tens of GB and then run for hours on "
            "the CPU: run the recipe on a machine with a GPU (on Colab: Runtime -> Change runtime type -> T4 GPU), "
            f"{TRY_TINY}.")
    token = environment.find_hub_token()
    for flag, repo, _ in hub_ids:
        _check_hub_access(flag, repo, token)
    need = sum(NF4_PACKAGE_GB if flag == "--prequantized" else download_gb(repo, NF4_PARTS if nf4_package else ())
               for flag, repo, cached in hub_ids if not cached)
    if need:
        from huggingface_hub import constants

        names = " and ".join(repo for _, repo, cached in hub_ids if not cached)
        environment.check_free_disk(constants.HF_HUB_CACHE, need, what=f"Downloading {names}")


# --- all of it, before anything loads --------------------------------------------------------------


def check_request(args: argparse.Namespace, model_id: str, resolve: Callable[[str], str],
                  nf4_package: str | None = None) -> str:
    """The settings (:func:`check_settings`), the output folder ``args.out`` (:func:`check_output_folder`),
    then ``resolve(args.checkpoint)`` (the script's stand-in branch), then the checkpoint
    (:func:`check_checkpoint`, unless ``resolve`` turned it into a stand-in: see the module docstring).
    Returns what ``from_pretrained`` should load. Raises :class:`FluxnbError` or ``OSError``; folders the
    output check created are removed again if a later check fails.
    """
    check_settings(args)
    created = check_output_folder(args.out, png_bytes_at_most(args.height, args.width))
    try:
        try:
            resolved = resolve(args.checkpoint)
        except NeedsGPUError as error:
            raise NeedsGPUError(f"--checkpoint {args.checkpoint} is a full-size stand-in (the real model's shapes, "
                                "random weights: tens of GB to build) and this machine has no GPU to run it: use "
                                f"--checkpoint tiny on a CPU, or set {WITHOUT_GPU_VAR}=1 to build it anyway."
                                ) from error
        stand_in = resolved != args.checkpoint  # fluxnb's: built in its cache, or served under the real id
        if stand_in and Path(resolved).is_dir():
            check_checkpoint_folder(resolved)  # complete? (a build is renamed into place only when done)
        check_checkpoint(None if stand_in else args.checkpoint, model_id, nf4_package)
    except (FluxnbError, OSError):
        remove_created(created)
        raise
    return resolved


def check_before_loading(args: argparse.Namespace, model_id: str, resolve: Callable[[str], str],
                         nf4_package: str | None = None) -> str:
    """:func:`check_request` for a script's ``main()``: return what to load, or end the script with the
    problem in one line on stderr and exit status 2 (bad input, nothing loaded), not a traceback.

    ``args``: the script's parsed arguments (``prompt``, ``out``, ``checkpoint``, ``steps``, ``guidance``,
    ``height``, ``width``, ``seed``, ``max_sequence_length``); ``model_id``: the model the recipe is
    written for; ``resolve``: its stand-in branch (``checkpoint_path``); ``nf4_package``: a pre-quantized
    package it loads too (``prequantized_from_hub.py``), checked as the checkpoint is.
    """
    try:
        return check_request(args, model_id, resolve, nf4_package)
    except (FluxnbError, OSError) as error:
        print(one_line(error), file=sys.stderr)
        raise SystemExit(BAD_INPUT) from None


# --- a save that loses nothing ---------------------------------------------------------------------


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def save_or_keep(save: Callable[[Any, Path, dict[str, Any]], Path], image: Any, folder: Path,
                 settings: dict[str, Any]) -> Path:
    """``save(image, folder, settings)`` (the script's own ``save_png``, which never overwrites); if that
    fails with ``OSError`` -- the folder was removed or replaced by a file, its disk is full or read-only,
    since :func:`check_output_folder` said it was fine -- save the same way into the current folder, else
    the system's temporary folder, and say in one line on stderr why and where. Returns the path saved.

    The image took the whole run to make, so it is kept wherever it can be; the script then exits with
    status 1 (see the module docstring). If no folder takes it, the script ends (status 1) with one line
    saying why.
    """
    try:
        return save(image, folder, settings)
    except OSError as error:
        reason = error.strerror or str(error)
    for other in (Path.cwd(), Path(tempfile.gettempdir())):
        if _same_folder(other, folder):
            continue
        try:
            path = save(image, other, settings)
        except OSError:
            continue
        print(f"Could not save the image in {folder} ({reason}): it is kept as {path} instead.", file=sys.stderr)
        return path
    raise SystemExit(f"Could not save the image in {folder} ({reason}), nor in {Path.cwd()} or "
                     f"{tempfile.gettempdir()}: free some disk space (or pass --out on another disk) and run it again.")
