"""Block streaming (fluxnb.streaming): its logic, on the CPU, with plain and bitsandbytes NF4 weights.

On a CPU the "device" is the CPU too (slots are separate host buffers, copies are synchronous), so
these tests check what the GPU run relies on: which blocks stream, that every tensor a block computes
with -- 4-bit statistics included -- sits in a slot while the block runs and in the packed host copy
otherwise, that outputs are unchanged, and what it costs. The GPU check (latents equal to resident
NF4's within a tolerance, overlap, VRAM) is benchmarks/gpu_offload.sh.
"""

import pytest
import torch

import fluxnb
from fluxnb import streaming
from fluxnb.checkpoints import TINY_TRANSFORMER
from fluxnb.streaming import (
    BLOCK_STREAMING_HOOK,
    BlockStreamingConfig,
    _block_tensors,
    apply_block_streaming,
    block_bytes,
    choose_streamed,
    get_block_streamer,
    remove_block_streaming,
    resident_blocks_that_fit,
    transformer_blocks,
)


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 16, 8
    return dict(hidden_states=torch.randn(1, n_img, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3),
                guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None)


def _run(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs).sample


@pytest.fixture
def plain():
    """A small FLUX transformer with 3 double- and 5 single-stream blocks, fp32."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**dict(TINY_TRANSFORMER, num_layers=3, num_single_layers=5)).eval()


@pytest.fixture(scope="module")
def nf4_checkpoint():
    fluxnb.allow_bitsandbytes_on_cpu()
    return str(fluxnb.build_tiny("dev"))


def test_choose_streamed_streams_single_blocks_first_spread_evenly():
    assert choose_streamed(3, 5, resident_blocks=8) == []
    assert choose_streamed(3, 5, resident_blocks=0) == list(range(8))
    assert choose_streamed(3, 5, resident_blocks=6) == [3, 5]  # two of the singles (3..7), spread
    assert choose_streamed(19, 38, resident_blocks=57 - 38) == list(range(19, 57))
    assert choose_streamed(19, 38, resident_blocks=57 - 40) == [0, 9] + list(range(19, 57))
    with pytest.raises(ValueError, match="between 0 and 8"):
        choose_streamed(3, 5, resident_blocks=9)


@pytest.mark.parametrize("resident", [0, 2, 7])
def test_streamed_outputs_equal_resident_ones(plain, resident):
    inputs = _inputs(plain.config)
    reference = _run(plain, inputs)
    apply_block_streaming(plain, BlockStreamingConfig(resident_blocks=resident, device="cpu"))
    assert torch.equal(_run(plain, inputs), reference)
    assert torch.equal(_run(plain, inputs), reference)  # the second run reuses the prefetched block
    remove_block_streaming(plain)
    assert torch.equal(_run(plain, inputs), reference)


def test_each_block_computes_from_a_slot_and_waits_in_the_host_buffer(nf4_checkpoint):
    transformer = fluxnb.load_transformer_4bit(nf4_checkpoint, torch.float32)
    blocks = transformer_blocks(transformer)
    states = [p.quant_state for p in blocks[0].parameters() if getattr(p, "quant_state", None) is not None]
    assert states, "the tiny NF4 transformer should have 4-bit weights in its blocks"
    reference = _run(transformer, _inputs(transformer.config))
    streamer = apply_block_streaming(transformer, BlockStreamingConfig(resident_blocks=0, device="cpu"))

    def inside(tensor, buffer):
        start = buffer.data_ptr()
        return start <= tensor.data_ptr() < start + buffer.numel()

    seen = []

    def check(module, args):  # runs after the streamer's own pre-hook
        tensors = [t for _, _, t in _block_tensors(module)]
        assert any(t is s.absmax for s in states for t in tensors) or module is not blocks[0]
        seen.append(sorted({i for t in tensors for i, slot in enumerate(streamer._slots) if inside(t, slot)}))
        assert all(any(inside(t, slot) for slot in streamer._slots) for t in tensors if t.numel())

    handles = [b.register_forward_pre_hook(check) for b in blocks]
    assert torch.equal(_run(transformer, _inputs(transformer.config)), reference)
    for h in handles:
        h.remove()
    assert seen == [[0], [1]]  # one slot per block, alternating
    for block in blocks:  # between runs: every tensor back in the packed host buffer
        assert all(inside(t, streamer._host) for _, _, t in _block_tensors(block) if t.numel())
    assert streamer.host_bytes == sum(block_bytes(b) for b in blocks)
    assert streamer.device_bytes == 2 * max(block_bytes(b) for b in blocks)


def test_more_slots_prefetch_further_and_stay_within_their_buffers(plain):
    inputs = _inputs(plain.config)
    reference = _run(plain, inputs)
    streamer = apply_block_streaming(plain, BlockStreamingConfig(resident_blocks=0, device="cpu", slots=3))
    assert torch.equal(_run(plain, inputs), reference)
    assert len(streamer._slots) == 3
    with pytest.raises(ValueError, match="at least 2"):
        remove_block_streaming(plain)
        apply_block_streaming(plain, BlockStreamingConfig(resident_blocks=0, device="cpu", slots=1))
    assert get_block_streamer(plain) is None  # a refused config registers nothing


def test_streaming_twice_is_refused_until_removed(plain):
    apply_block_streaming(plain, BlockStreamingConfig(resident_blocks=4, device="cpu"))
    with pytest.raises(RuntimeError, match="streams its blocks already"):
        apply_block_streaming(plain, BlockStreamingConfig(device="cpu"))
    remove_block_streaming(plain)
    apply_block_streaming(plain, BlockStreamingConfig(device="cpu"))
    remove_block_streaming(plain)
    remove_block_streaming(plain)  # nothing streams: nothing to do


def test_the_streamer_is_a_hook_registered_by_name_and_removing_it_restores_the_model(plain):
    """Issue 18: the streamer is found through diffusers' HookRegistry by its name, not a private
    attribute; the hook passes a step through unchanged (diffusers' cache_context walks it, as FluxPipeline
    does each step), and removing it gives the transformer back the class's own forward."""
    from diffusers.hooks import HookRegistry

    inputs = _inputs(plain.config)
    reference = _run(plain, inputs)
    assert get_block_streamer(plain) is None and "forward" not in vars(plain)
    streamer = apply_block_streaming(plain, BlockStreamingConfig(resident_blocks=2, device="cpu"))
    registry = HookRegistry.check_if_exists_or_initialize(plain)
    assert registry.get_hook(BLOCK_STREAMING_HOOK).streamer is streamer is get_block_streamer(plain)
    assert streamer.active and len(streamer._blocks) == len(transformer_blocks(plain)) - 2
    with plain.cache_context("cond"):
        assert torch.equal(_run(plain, inputs), reference)
    remove_block_streaming(plain)
    assert not streamer.active and get_block_streamer(plain) is None
    assert registry.get_hook(BLOCK_STREAMING_HOOK) is None and "forward" not in vars(plain)
    assert torch.equal(_run(plain, inputs), reference)


def test_resident_blocks_that_fit_counts_the_slots(plain):
    sizes = [block_bytes(b) for b in transformer_blocks(plain)]
    assert resident_blocks_that_fit(plain, sum(sizes)) == len(sizes)
    assert resident_blocks_that_fit(plain, 0) == 0
    budget = sum(sizes) - 1  # one byte short of all resident: streaming must start, and slots cost
    resident = resident_blocks_that_fit(plain, budget)
    streamed = set(choose_streamed(3, 5, resident))
    assert sum(s for i, s in enumerate(sizes) if i not in streamed) + 2 * max(sizes[i] for i in streamed) <= budget
    bigger = set(choose_streamed(3, 5, resident + 1))
    assert sum(s for i, s in enumerate(sizes) if i not in bigger) + 2 * max(sizes[i] for i in bigger) > budget


@pytest.mark.parametrize("repack", [True, False], ids=["avx512bf16-repack-on", "repack-off"])
@pytest.mark.parametrize("resident", [0, 1])
def test_streamed_nf4_equals_resident_with_either_cpu_kernel(nf4_checkpoint, repack, resident):
    """bitsandbytes repacks 4-bit weights for a bf16 kernel on CPUs with AVX512-BF16
    (``support_avx512bf16_for_cpu``): notebook 08's "latents equal the resident model's" must hold on
    CPUs with and without it. The flag is forced both ways on every layer of two fresh loads (the
    resident reference and the streamed model), so this runs both kernels' logic on any CPU (the
    repacked layout through bitsandbytes' fallback where the CPU lacks the instruction)."""
    import bitsandbytes as bnb

    def load():
        transformer = fluxnb.load_transformer_4bit(nf4_checkpoint, torch.float32)
        layers = [m for m in transformer.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers, "the tiny NF4 transformer should have 4-bit layers"
        for layer in layers:
            layer.support_avx512bf16_for_cpu = repack
        return transformer

    inputs = _inputs(load().config)
    reference = _run(load(), inputs)
    streamed = load()
    apply_block_streaming(streamed, BlockStreamingConfig(resident_blocks=resident, device="cpu"))
    for run in range(2):  # the second run starts from the packed host copies again
        torch.testing.assert_close(_run(streamed, inputs), reference, rtol=0, atol=0, equal_nan=True,
                                   msg=f"run {run + 1}: streaming changed the result (repack={repack})")
    remove_block_streaming(streamed)
    torch.testing.assert_close(_run(streamed, inputs), reference, rtol=0, atol=0, equal_nan=True)


def test_resident_blocks_streams_just_enough_or_says_it_cannot():
    sizes = [100] * 4 + [50] * 6  # 4 double-stream blocks, 6 single-stream ones (bytes)
    assert streaming.resident_blocks(sizes, 4, need_bytes=10, free_bytes=20) is None  # fits as it is
    keep = streaming.resident_blocks(sizes, 4, need_bytes=130, free_bytes=20)
    assert keep is not None and 0 < keep < len(sizes)
    assert streaming.most_resident(sizes, 4, sum(sizes) - 110) == keep
    with pytest.raises(streaming.DoesNotFit, match="streaming every block would free"):
        streaming.resident_blocks(sizes, 4, need_bytes=2000, free_bytes=20)


def test_largest_size_resident_is_the_largest_whose_step_fits_next_to_every_block(plain):
    """What notebook 09 suggests on a GPU too small to compile at its size: a size that really fits."""
    from fluxnb import capacity

    free = capacity.step_bytes(320, 320)
    assert streaming.largest_size_resident(plain, 512, 512, free_bytes=free) == (320, 320)
    assert streaming.blocks_to_keep(plain, 320, 320, free_bytes=free) is None
    assert streaming.blocks_to_keep(plain, 336, 336, free_bytes=free) is not None
    h, w = streaming.largest_size_resident(plain, 512, 1024, free_bytes=capacity.step_bytes(320, 640))
    assert (h, w) == (320, 640)  # the aspect ratio is kept
    assert streaming.largest_size_resident(plain, 512, 512, free_bytes=1000) is None  # not even 256x256
