"""bitsandbytes on the CPU: diffusers refuses it until fluxnb opens its two checks."""

import bitsandbytes as bnb
import pytest
import torch

import fluxnb
from fluxnb.cpu_bitsandbytes import allow_bitsandbytes_on_cpu, restore_bitsandbytes_gpu_checks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


@pytest.fixture
def tiny():
    return str(fluxnb.build_tiny("dev"))


@pytest.fixture
def unpatched():
    restore_bitsandbytes_gpu_checks()
    yield
    restore_bitsandbytes_gpu_checks()


def _tiny_forward(transformer):
    torch.manual_seed(0)
    cfg = transformer.config
    tokens, text = 16, 8
    return transformer(
        hidden_states=torch.randn(1, tokens, cfg.in_channels), encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5]),
    ).sample


def test_diffusers_refuses_without_the_patch(tiny, unpatched):
    with pytest.raises(RuntimeError, match="No GPU found"):
        fluxnb.load_transformer_4bit(tiny, torch.float32)


def test_nf4_on_cpu_gives_linear4bit_and_finite_output(tiny, unpatched):
    assert allow_bitsandbytes_on_cpu() is True
    transformer = fluxnb.load_transformer_4bit(tiny, torch.float32)
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules())
    assert n_4bit == sum(isinstance(m, torch.nn.Linear) for m in transformer.modules()) > 0
    assert transformer.transformer_blocks[0].ff.net[2].weight.quant_state.quant_type == "nf4"
    out = _tiny_forward(transformer)
    assert out.shape == (1, 16, transformer.config.in_channels) and torch.isfinite(out).all()


def test_nf4_t5_on_cpu(tiny, unpatched):
    allow_bitsandbytes_on_cpu()
    pipe = fluxnb.load_text_encoders_4bit(tiny, torch.float32)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in pipe.text_encoder_2.modules()) > 0
    embeds = fluxnb.encode_prompt(pipe, "a cat", max_sequence_length=64)
    assert embeds["prompt_embeds"].shape == (1, 64, 64) and torch.isfinite(embeds["prompt_embeds"]).all()


def test_int8_on_cpu(tiny, unpatched):
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    allow_bitsandbytes_on_cpu()
    transformer = FluxTransformer2DModel.from_pretrained(
        tiny, subfolder="transformer", quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in transformer.modules())
    assert torch.isfinite(_tiny_forward(transformer)).all()


def test_prequantized_nf4_reloads_on_cpu(tiny, unpatched, tmp_path):
    allow_bitsandbytes_on_cpu()
    first = fluxnb.load_transformer_4bit(tiny, torch.float32)
    first.save_pretrained(tmp_path / "nf4" / "transformer")  # the layout of a pre-quantized repository
    again = fluxnb.load_transformer_4bit(tiny, torch.float32, prequantized=str(tmp_path / "nf4"))
    assert isinstance(again.transformer_blocks[0].ff.net[2], bnb.nn.Linear4bit)
    assert torch.equal(_tiny_forward(first), _tiny_forward(again))


def test_patch_is_undone_and_skipped_on_a_gpu(unpatched, monkeypatch):
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    original = BnB4BitDiffusersQuantizer.validate_environment
    allow_bitsandbytes_on_cpu()
    assert BnB4BitDiffusersQuantizer.validate_environment is not original
    restore_bitsandbytes_gpu_checks()
    assert BnB4BitDiffusersQuantizer.validate_environment is original
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert allow_bitsandbytes_on_cpu() is False
    assert BnB4BitDiffusersQuantizer.validate_environment is original
