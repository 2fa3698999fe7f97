"""Stream a transformer's blocks from pinned host memory to the GPU, each one just before it runs.

Why this exists (notebook 08 tells the whole story):

* FLUX's NF4 transformer is about 5.5 GiB of 4-bit weights in 57 blocks. A card that cannot hold it,
  or can hold it only with no room for activations, can still run it if each block visits the GPU
  only while it computes. 4-bit weights make that cheap: a step moves 5.5 GiB over PCIe, while the
  GPU spends ~7.4e13 FLOP on a 1024x1024 step, so the copy of block k+1 can hide behind block k.
* diffusers' group offload does this for bf16 weights (57.8 GiB of pinned host RAM for FLUX), and
  bitsandbytes' 4-bit weights break it: with ``use_stream=True`` it moves each ``Params4bit``'s
  ``.data`` but not its ``quant_state`` (``absmax``, ``code`` and the nested statistics of double
  quantization), which is a plain Python object beside the tensor, not a parameter or a buffer. The
  4-bit kernels then read statistics from wherever they were when offloading started.
  ``enable_sequential_cpu_offload`` fails with 4-bit weights too (bitsandbytes #1525, diffusers #10800).

How it works, with public PyTorch only (forward hooks, CUDA streams and events):

* every streamed block's tensors -- weights, biases, norms, and each 4-bit weight's ``quant_state``
  tensors -- are packed once into **one pinned host buffer per block**, so a block moves in one copy at
  the link's full speed;
* the GPU holds ``slots`` buffers (default 2) the size of the largest streamed block. Before block k
  runs, block k+1 is copied into the other slot on a side stream. CUDA events order each copy after
  the compute that last read its slot, and each block's compute after its copy: the CPU never waits,
  and the streamed blocks never take more than ``slots`` buffers of VRAM;
* ``resident_blocks`` blocks stay on the GPU for good. Single-stream blocks (the smaller ones) are
  streamed first, spread evenly, so each copy hides behind the resident blocks between.

The same code runs with ``device="cpu"`` (no pinning, no streams): the tiny course and the tests use
that to check the logic. It changes where tensors live, never their values, nor the kernels that compute
with them (:func:`cpu_weight_layout`: a CPU with AVX512-BF16 gives bitsandbytes' 4-bit layers another
weight layout, streamed or not).

How it is applied, in the shape of diffusers' own hooks (``diffusers.hooks``: ``apply_group_offloading``,
``apply_first_block_cache``): a config dataclass (:class:`BlockStreamingConfig`), an apply function
(:func:`apply_block_streaming`), a hook registered by name (:data:`BLOCK_STREAMING_HOOK`) in diffusers'
``HookRegistry`` on the transformer, a public accessor (:func:`get_block_streamer`) and remover
(:func:`remove_block_streaming`). Why the registry, and why only there:

* ``HookRegistry.register_hook`` always wraps the module's ``forward``. On the transformer the wrapper is
  diffusers' pass-through: :class:`BlockStreamingHook` keeps ``ModelHook``'s ``pre_forward`` and
  ``post_forward``, which return their arguments and the output unchanged, so a step computes exactly
  what it did (tests/test_streaming.py compares outputs bit for bit). The hook sets streaming up when it
  is registered (``initialize_hook``, as group offloading offloads there) and undoes it when removed.
* The per-block work stays in PyTorch's forward pre/post hooks on each streamed block, not in
  ``ModelHook``s on the blocks: those would replace each block's ``forward``, which diffusers' caches
  (first block cache, in notebook 09) wrap with their own hooks; a torch pre-hook runs in
  ``Module.__call__`` before whatever wraps ``forward``, so the block's weights are in its slot whichever
  hooks a block carries.
* Only streamed transformers carry the hook: a transformer that never streams keeps its own ``forward``
  (notebook 09 compiles it and caches its steps), and :func:`remove_block_streaming` gives it back the
  class's ``forward``. torch.compile is refused for a streamed transformer
  (:func:`fluxnb.faster.compile_blocker`): it cannot trace the hooks that repoint the weights.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from fluxnb import environment  # environment.free_vram_gib(), as tests and envelopes set it
from fluxnb.capacity import GIB, largest_size_where, step_bytes
from fluxnb.exceptions import FluxnbError

ALIGN = 256  # bytes: every tensor in a packed buffer starts on a boundary the GPU kernels like
QUANT_STATE_TENSORS = ("absmax", "code", "offset")  # bitsandbytes QuantState fields that are tensors
NESTED_STATE_TENSORS = ("absmax", "code")  # the same for its nested state (double quantization)


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


@dataclass
class _Entry:
    """One tensor of a block: where it lives in the packed buffer, and who points at it."""

    owner: Any  # a Parameter or buffer (repointed through ``.data``) or a QuantState (through setattr)
    attr: str | None  # None: ``owner.data``; else the attribute of ``owner`` that holds the tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """This tensor as it is packed in ``buffer`` (a block's host buffer, or a GPU slot)."""
        return buffer[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def point_to(self, buffer: torch.Tensor) -> None:
        view = self.view(buffer)
        if self.attr is None:
            self.owner.data = view
        else:
            setattr(self.owner, self.attr, view)


def _block_tensors(block: torch.nn.Module) -> list[tuple[Any, str | None, torch.Tensor]]:
    """Every tensor ``block`` computes with: parameters, buffers, and 4-bit weights' quant states."""
    found: list[tuple[Any, str | None, torch.Tensor]] = []
    seen: set[tuple[int, str | None]] = set()

    def add(owner: Any, attr: str | None, tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor) and (id(owner), attr) not in seen:
            seen.add((id(owner), attr))
            found.append((owner, attr, tensor.data if attr is None else tensor))

    for module in block.modules():
        for param in module.parameters(recurse=False):
            add(param, None, param)
            state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit
            if state is not None:
                for name in QUANT_STATE_TENSORS:
                    add(state, name, getattr(state, name, None))
                nested = getattr(state, "state2", None)
                if nested is not None:
                    for name in NESTED_STATE_TENSORS:
                        add(nested, name, getattr(nested, name, None))
        for buffer in module.buffers(recurse=False):
            add(buffer, None, buffer)
    return found


def cpu_weight_layout(block: torch.nn.Module) -> int:
    """Give each bitsandbytes 4-bit layer of ``block`` the CPU weight layout its own forward would give it.

    On a CPU with AVX512-BF16, ``bnb.nn.Linear4bit`` repacks its weight into a layout for a faster kernel
    the first time it runs (``support_avx512bf16_for_cpu``, bitsandbytes 0.49+), replacing the weight and
    its ``quant_state`` tensors. A streamed block must not change its tensors between being packed and
    running, and it must compute exactly what the same block computes resident. So the repack happens
    here, once, before packing, with bitsandbytes' own function and under the condition its
    ``Linear4bit.forward`` uses (eval mode; the flag off, or no AVX512-BF16, means no repack): streamed
    and resident blocks then run the same kernel on any CPU. Returns how many layers were repacked.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes (or one without the CPU repack): nothing to match
        return 0
    repacked = 0
    for module in block.modules():
        if not isinstance(module, Linear4bit) or module.training or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None or module.weight.device.type != "cpu" or getattr(state, "packing_format_for_cpu", False):
            continue
        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(module.weight.data, state)
        repacked += 1
    return repacked


def _packed_size(tensors: list[tuple[Any, str | None, torch.Tensor]]) -> int:
    return sum(math.ceil(t.numel() * t.element_size() / ALIGN) * ALIGN for _, _, t in tensors)


def block_bytes(block: torch.nn.Module) -> int:
    """Bytes one block takes packed for streaming (weights, 4-bit statistics, alignment)."""
    return _packed_size(_block_tensors(block))


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """FLUX's blocks in the order they run: 19 double-stream, then 38 single-stream."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def choose_streamed(n_double: int, n_single: int, resident_blocks: int) -> list[int]:
    """Indices (in run order) of the blocks to stream when ``resident_blocks`` stay on the GPU.

    Single-stream blocks go first (they are smaller, so the slots are smaller), spread evenly so that
    resident blocks sit between streamed ones and hide their copies; then double-stream blocks.
    """
    total = n_double + n_single
    if not 0 <= resident_blocks <= total:
        raise ValueError(f"resident_blocks must be between 0 and {total} (the number of blocks), not {resident_blocks}")
    n_streamed = total - resident_blocks

    def spread(count: int, among: list[int]) -> list[int]:
        if count >= len(among):
            return list(among)
        return [among[int(i * len(among) / count)] for i in range(count)]

    singles = list(range(n_double, total))
    doubles = list(range(n_double))
    chosen = spread(min(n_streamed, n_single), singles) + spread(max(0, n_streamed - n_single), doubles)
    return sorted(chosen)


@dataclass
class _Streamed:
    block: torch.nn.Module
    entries: list[_Entry]
    host: torch.Tensor  # the packed buffer, pinned on a GPU machine
    nbytes: int
    slot: int | None = None  # which GPU slot holds it now, if any


@dataclass
class StreamStats:
    """What streaming costs, per streamed block, from CUDA events (``profile=True``)."""

    copy_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    copy_bytes: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        """Means per streamed block (None before anything was timed), and the copies' GB/s."""
        def mean(values: list[float]) -> float | None:
            return round(sum(values) / len(values), 3) if values else None

        copy_s = sum(self.copy_ms) / 1e3
        return dict(copies=len(self.copy_ms), copy_ms_mean=mean(self.copy_ms), compute_ms_mean=mean(self.compute_ms),
                    copy_gb_per_s=round(sum(self.copy_bytes) / 1e9 / copy_s, 2) if copy_s else None)


class BlockStreamer:
    """Keeps some of a model's blocks in (pinned) host memory and streams them to ``device`` on use.

    Built by :func:`apply_block_streaming` (found again with :func:`get_block_streamer`);
    :func:`remove_block_streaming` puts the streamed blocks back on the GPU and takes the hooks off.
    """

    def __init__(self, blocks: list[torch.nn.Module], streamed: list[int], device: torch.device | str,
                 slots: int = 2, profile: bool = False) -> None:
        if slots < 2 and streamed:
            raise ValueError("slots must be at least 2: one block computes while the next one is copied")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.n_slots = slots
        self.profile = profile  # timed with CUDA events: on a GPU only
        self.stats = StreamStats()
        self._pending: list[tuple[str, Any, Any, int]] = []  # profiled (kind, start, end, bytes), read lazily
        self._blocks: list[_Streamed] = []
        self._order: dict[int, int] = {}  # id(block) -> position among streamed blocks
        self._handles: list[Any] = []
        self._loads = 0
        packed = []
        for index in streamed:
            if not self.cuda:
                cpu_weight_layout(blocks[index])  # before its tensors are listed: the layout changes them
            self._order[id(blocks[index])] = len(packed)
            packed.append((blocks[index], _block_tensors(blocks[index])))
        sizes = [_packed_size(tensors) for _, tensors in packed]
        # One host buffer for all streamed blocks, page-locked with cudaHostRegister (what torch's own
        # checkpoint stager does): pin_memory=True would round each allocation up to a power of two,
        # up to 1.7x the host RAM for FLUX's block sizes.
        self._host = torch.empty(sum(sizes), dtype=torch.uint8)
        if self.cuda and self._host.numel():
            code = int(torch.cuda.cudart().cudaHostRegister(self._host.data_ptr(), self._host.numel(), 1))
            if code != 0:
                raise RuntimeError(f"could not page-lock {self._host.numel() / 2**30:.2f} GiB of host memory for "
                                   f"streaming (cudaError {code}): free host RAM, or keep more blocks resident")
            weakref.finalize(self._host, _unregister, self._host.data_ptr())
        offset = 0
        for (block, tensors), size in zip(packed, sizes):
            self._blocks.append(self._pack(block, tensors, self._host[offset:offset + size]))
            offset += size
        del packed
        for index, block in enumerate(blocks):
            if id(block) not in self._order:
                block.to(self.device)  # resident: bitsandbytes' Params4bit.to moves its quant_state too
        slot_bytes = max((s.nbytes for s in self._blocks), default=0)
        self.slot_bytes = slot_bytes
        self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(slots)] if streamed else []
        self._holder: list[_Streamed | None] = [None] * len(self._slots)
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in self._slots]  # copy into the slot done
            self._free = [torch.cuda.Event() for _ in self._slots]  # compute reading the slot done
            self._free_recorded = [False] * len(self._slots)
        for item in self._blocks:
            self._handles.append(item.block.register_forward_pre_hook(self._before))
            self._handles.append(item.block.register_forward_hook(self._after))

    # -- packing ------------------------------------------------------------------------------------
    def _pack(self, block: torch.nn.Module, tensors: list[tuple[Any, str | None, torch.Tensor]],
              host: torch.Tensor) -> _Streamed:
        """Copy ``block``'s tensors into ``host`` and point the block at them (the originals are freed)."""
        entries, offset = [], 0
        for owner, attr, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes:
                host[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            entries.append(_Entry(owner, attr, offset, nbytes, tensor.dtype, tensor.shape))
            offset += math.ceil(nbytes / ALIGN) * ALIGN
        tensors.clear()
        for entry in entries:
            entry.point_to(host)
        return _Streamed(block, entries, host, host.numel())

    @property
    def active(self) -> bool:
        """True until :func:`remove_block_streaming`."""
        return bool(self._handles)

    @property
    def host_bytes(self) -> int:
        """Host memory the streamed blocks take (pinned on a GPU machine)."""
        return sum(s.nbytes for s in self._blocks)

    @property
    def device_bytes(self) -> int:
        """GPU memory the slots take: what streaming costs on the card, whatever the model's size."""
        return self.slot_bytes * len(self._slots)

    # -- moving -------------------------------------------------------------------------------------
    def _load(self, item: _Streamed) -> None:
        """Start copying ``item`` into the next slot (round robin: the least recently used one)."""
        slot = self._loads % self.n_slots
        self._loads += 1
        previous = self._holder[slot]
        if previous is not None and previous is not item:
            previous.slot = None  # a block never in use is the only kind that can be displaced
        self._holder[slot] = item
        item.slot = slot
        target = self._slots[slot][:item.nbytes]
        if not self.cuda:
            target.copy_(item.host)
            return
        start = end = None
        if self._free_recorded[slot]:
            self._copy_stream.wait_event(self._free[slot])  # the compute that read this slot is done
        with torch.cuda.stream(self._copy_stream):
            if self.profile:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            target.copy_(item.host, non_blocking=True)
            if self.profile:
                end.record()
                self._pending.append(("copy", start, end, item.nbytes))
            self._ready[slot].record()

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        position = self._order[id(module)]
        item = self._blocks[position]
        if item.slot is None:  # not prefetched: the first block of a run
            self._load(item)
        slot = item.slot
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        for entry in item.entries:
            entry.point_to(self._slots[slot])
        following = position
        for _ in range(self.n_slots - 1):  # the next blocks' copies overlap with this block's compute
            following = (following + 1) % len(self._blocks)
            if self._blocks[following] is item:
                break
            if self._blocks[following].slot is None:
                self._load(self._blocks[following])
        if self.profile and self.cuda:
            self._compute_start = torch.cuda.Event(enable_timing=True)
            self._compute_start.record()

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        item = self._blocks[self._order[id(module)]]
        slot = item.slot
        if self.cuda:
            self._free[slot].record(torch.cuda.current_stream(self.device))
            self._free_recorded[slot] = True
            if self.profile:  # inside `if self.cuda`
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._pending.append(("compute", self._compute_start, end, 0))
        for entry in item.entries:
            entry.point_to(item.host)
        item.slot = None
        self._holder[slot] = None

    def timings(self) -> StreamStats:
        """Copy and compute time per streamed block so far (synchronizes; needs ``profile=True``)."""
        if self._pending:
            torch.cuda.synchronize(self.device)
            for kind, start, end, nbytes in self._pending:
                ms = start.elapsed_time(end)
                if kind == "copy":
                    self.stats.copy_ms.append(ms)
                    self.stats.copy_bytes.append(nbytes)
                else:
                    self.stats.compute_ms.append(ms)
            self._pending.clear()
        return self.stats

    def _restore(self) -> None:
        """Take the hooks off and put every streamed block back on ``device`` as ordinary tensors.

        Private: :func:`remove_block_streaming` calls it, through the hook, and takes the hook off the
        transformer too, so that the transformer can be streamed again."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for item in self._blocks:
            for entry in item.entries:
                moved = entry.view(item.host).to(self.device, copy=True)
                if entry.attr is None:
                    entry.owner.data = moved
                else:
                    setattr(entry.owner, entry.attr, moved)
            item.slot = None
        self._blocks.clear()
        self._slots.clear()


BLOCK_STREAMING_HOOK = "fluxnb_block_streaming"  # its name in the transformer's diffusers HookRegistry


@dataclass(frozen=True)
class BlockStreamingConfig:
    """How :func:`apply_block_streaming` streams a FLUX transformer's blocks.

    ``resident_blocks``: how many of the blocks stay on the GPU for good (0: stream them all; all of
    them: nothing streams); :func:`choose_streamed` says which: single-stream blocks first, spread evenly.
    ``device``: where the blocks compute (None: CUDA if there is a GPU, else the CPU). ``slots``: how many
    GPU buffers the streamed blocks take turns in (2: one computes while the next is copied).
    ``profile``: time copies and computes with CUDA events (:meth:`BlockStreamer.timings`).
    """

    resident_blocks: int = 0
    device: torch.device | str | None = None
    slots: int = 2
    profile: bool = False

    def streamed(self, transformer: torch.nn.Module) -> list[int]:
        """Indices (in run order, :func:`transformer_blocks`) of ``transformer``'s blocks that stream."""
        return choose_streamed(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks),
                               self.resident_blocks)


class BlockStreamingHook(ModelHook):
    """The diffusers hook that holds a transformer's :class:`BlockStreamer` under :data:`BLOCK_STREAMING_HOOK`.

    Registering it (``initialize_hook``) streams the blocks; removing it (``deinitalize_hook``, diffusers'
    spelling) puts them back. Its ``pre_forward`` and ``post_forward`` are ``ModelHook``'s own, which
    pass the arguments and the output through unchanged: the work of a step is in the streamer's
    per-block torch hooks (the module docstring says why).
    """

    def __init__(self, config: BlockStreamingConfig) -> None:
        super().__init__()
        self.config = config
        self.streamer: BlockStreamer | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move what is not a block to the device and stream the blocks the config names."""
        device = self.config.device
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        blocks = transformer_blocks(module)
        streamed = self.config.streamed(module)
        block_ids = {id(b) for b in blocks}
        for name, child in module.named_children():
            if name not in ("transformer_blocks", "single_transformer_blocks") and id(child) not in block_ids:
                child.to(device)
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        self.streamer = BlockStreamer(blocks, streamed, device, slots=self.config.slots, profile=self.config.profile)
        if self.streamer.cuda:
            torch.cuda.empty_cache()  # give the streamed blocks' old GPU memory back to the device
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Put every streamed block back on the device as ordinary tensors."""
        if self.streamer is not None:
            self.streamer._restore()
        return module


def apply_block_streaming(transformer: torch.nn.Module, config: BlockStreamingConfig | None = None) -> BlockStreamer:
    """Stream FLUX's transformer blocks from host memory, as ``config`` says; returns the :class:`BlockStreamer`.

    Everything that is not a block (embedders, final norm and projection: about 0.1 GiB in NF4) moves
    to the config's device. The streamed blocks' tensors move to one pinned host buffer each; the GPU gets
    ``slots`` buffers the size of the largest streamed block. Works for bitsandbytes 4-bit and 8-bit
    weights alike, and for plain bf16/fp16 ones. The streamer's ``host_bytes`` and ``device_bytes`` say
    what it costs, ``timings()`` what it took (with ``profile``); :func:`get_block_streamer` finds it
    again and :func:`remove_block_streaming` undoes it. Refused while the transformer streams already.
    """
    if get_block_streamer(transformer) is not None:
        raise RuntimeError("this transformer streams its blocks already: remove that first "
                           "(fluxnb.remove_block_streaming(transformer))")
    hook = BlockStreamingHook(config or BlockStreamingConfig())
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, BLOCK_STREAMING_HOOK)
    return hook.streamer


def _streaming_hook(transformer: torch.nn.Module) -> BlockStreamingHook | None:
    """The :class:`BlockStreamingHook` in ``transformer``'s diffusers HookRegistry, if one is registered."""
    registry = getattr(transformer, "_diffusers_hook", None)  # diffusers' own test for a registry (modeling_utils)
    return None if registry is None else registry.get_hook(BLOCK_STREAMING_HOOK)


def get_block_streamer(transformer: torch.nn.Module) -> BlockStreamer | None:
    """The :class:`BlockStreamer` that :func:`apply_block_streaming` registered on ``transformer``; None if
    its blocks do not stream."""
    hook = _streaming_hook(transformer)
    return None if hook is None else hook.streamer


def remove_block_streaming(transformer: torch.nn.Module) -> None:
    """Put every streamed block of ``transformer`` back on its device and take the streaming hook off.

    Nothing to do if its blocks do not stream. The transformer's ``forward`` is the class's own again
    (diffusers' registry leaves the bound method as an instance attribute: it goes too).
    """
    if _streaming_hook(transformer) is None:
        return
    transformer._diffusers_hook.remove_hook(BLOCK_STREAMING_HOOK, recurse=False)
    forward = vars(transformer).get("forward")
    if getattr(forward, "__self__", None) is transformer and getattr(forward, "__func__", None) is type(transformer).forward:
        del transformer.forward


class DoesNotFit(FluxnbError, ValueError):
    """Even with every transformer block streamed from host RAM, the stage does not fit the free VRAM."""


def most_resident(sizes: Sequence[int], n_double: int, budget_bytes: int, slots: int = 2) -> int:
    """The most blocks that can stay resident when the blocks may use ``budget_bytes`` of VRAM: the
    resident blocks' bytes plus ``slots`` buffers the size of the largest streamed block (what
    :func:`apply_block_streaming` allocates). 0 if even full streaming does not fit."""
    n_single = len(sizes) - n_double
    for resident in range(len(sizes), -1, -1):
        streamed = set(choose_streamed(n_double, n_single, resident))
        need = sum(s for i, s in enumerate(sizes) if i not in streamed)
        need += slots * max((sizes[i] for i in streamed), default=0)
        if need <= budget_bytes:
            return resident
    return 0


def resident_blocks(sizes: Sequence[int], n_double: int, need_bytes: int, free_bytes: int, slots: int = 2) -> int | None:
    """How many blocks may stay on the GPU so that ``need_bytes`` (a step, a decode) fits next to them.

    ``sizes``: the blocks' packed sizes, all resident now; ``free_bytes``: the VRAM free now. None: all
    blocks may stay. Raises :class:`DoesNotFit` if streaming every block would still leave too little.
    """
    shortfall = need_bytes - free_bytes
    if shortfall <= 0:
        return None
    budget = sum(sizes) - shortfall
    keep = most_resident(sizes, n_double, budget, slots)
    if keep == 0 and slots * max(sizes, default=0) > budget:
        raise DoesNotFit(f"{need_bytes / GIB:.2f} GiB are needed and {free_bytes / GIB:.2f} GiB are free: streaming "
                         f"every block would free {(sum(sizes) - slots * max(sizes, default=0)) / GIB:.2f} GiB, not enough")
    return keep


def largest_size_resident(transformer: torch.nn.Module, height: int, width: int,
                          free_bytes: int | None = None) -> tuple[int, int] | None:
    """The largest size with about the aspect ratio of ``height`` x ``width`` (multiples of 16, at least 256
    pixels a side) whose step fits next to all of ``transformer``'s blocks (:func:`blocks_to_keep` says
    None); None if no such size fits. For a cell that needs every block resident (torch.compile)."""
    free = _free_bytes(free_bytes)
    sizes = [block_bytes(b) for b in transformer_blocks(transformer)]  # once, not once per size tried
    return largest_size_where(height, width, lambda h, w: _keep(sizes, len(transformer.transformer_blocks),
                                                                step_bytes(h, w), free) is None, start_percent=100)


def resident_blocks_that_fit(transformer: torch.nn.Module, budget_bytes: int, slots: int = 2) -> int:
    """The most blocks that can stay resident when the blocks may use ``budget_bytes`` of VRAM.

    Counts what :func:`apply_block_streaming` would do: the resident blocks' bytes plus ``slots``
    buffers the size of the largest streamed block. 0 if even full streaming does not fit (then the
    caller's budget is too small for the slots alone, and it says so).
    """
    sizes = [block_bytes(b) for b in transformer_blocks(transformer)]
    return most_resident(sizes, len(transformer.transformer_blocks), budget_bytes, slots)


def blocks_to_keep(transformer: torch.nn.Module, height: int, width: int, free_bytes: int | None = None,
                   text_tokens: int = 512, need_bytes: int | None = None) -> int | None:
    """How many blocks may stay resident so a ``height`` x ``width`` step fits; None if all of them may.

    For a transformer whose blocks are all on the GPU (as notebooks 02-04 load it). ``free_bytes``:
    the VRAM free now (default: :func:`fluxnb.free_vram_gib`, which honours the course's envelopes).
    ``need_bytes``: what must fit next to the resident blocks, if more than a step
    (:func:`fluxnb.capacity.step_bytes`; the Studio asks for its decode too). 0 when even streaming
    every block leaves too little (then stream them all: it is the least VRAM there is). On a machine
    without a GPU there is nothing to decide: None.
    """
    need = step_bytes(height, width, text_tokens) if need_bytes is None else need_bytes
    sizes = [block_bytes(b) for b in transformer_blocks(transformer)]
    return _keep(sizes, len(transformer.transformer_blocks), need, _free_bytes(free_bytes))


def _free_bytes(free_bytes: int | None) -> int | None:
    """``free_bytes``, or the VRAM free now (:func:`fluxnb.free_vram_gib`: an envelope's); None without a GPU."""
    if free_bytes is not None:
        return free_bytes
    free_gib = environment.free_vram_gib()
    return None if free_gib is None else int(free_gib * GIB)


def _keep(sizes: Sequence[int], n_double: int, need_bytes: int, free_bytes: int | None) -> int | None:
    """:func:`blocks_to_keep`'s answer from the blocks' sizes: None (all stay; or no GPU), else how many."""
    if free_bytes is None:
        return None
    try:
        return resident_blocks(sizes, n_double, need_bytes, free_bytes)
    except DoesNotFit:
        return 0
