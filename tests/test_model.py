import pytest
import torch

from segcore.config import ConfigError, ModelConfig
from segcore.model import build_model, check_input_size, count_params, min_paper_side


def test_paper_param_count_matches_reference_study():
    # The study's U-Net (16, 32, 64), 2x2 kernels, 6 classes: 58,006 parameters.
    m = build_model(ModelConfig(arch="paper", widths=(16, 32, 64)), num_classes=6)
    assert count_params(m) == 58006


@pytest.mark.parametrize("arch", ["paper", "modern"])
@pytest.mark.parametrize("widths", [(8, 16), (16, 32, 64), (8, 16, 32, 64)])
def test_output_has_input_size(arch, widths):
    cfg = ModelConfig(arch=arch, widths=widths, channels_last=False,
                      norm="none" if arch == "paper" else "batch")
    m = build_model(cfg, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 5, 64, 64)


def test_binary_head_has_one_channel():
    m = build_model(ModelConfig(widths=(8, 16), channels_last=False), 2, binary=True)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("arch", ["paper", "modern"])
def test_channels_last_end_to_end(arch):
    cfg = ModelConfig(arch=arch, widths=(8, 16, 32), channels_last=True)
    m = build_model(cfg, 6)
    for p in m.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # same numbers as NCHW
    ref = build_model(ModelConfig(arch=arch, widths=(8, 16, 32), channels_last=False), 6)
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(ref(x.contiguous()), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward(dtype):
    m = build_model(ModelConfig(widths=(8, 16, 32)), 6)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=dtype):
        y = m(x)
    assert y.dtype == dtype
    y.float().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_group_norm_option():
    m = build_model(ModelConfig(widths=(8, 16), norm="group", channels_last=False), 3)
    assert any(isinstance(mod, torch.nn.GroupNorm) for mod in m.modules())
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_bad_sizes_say_what_to_do():
    with pytest.raises(ConfigError, match="multiples of 8.*--image-size"):
        check_input_size(ModelConfig(widths=(16, 32, 64, 128)), 100, 128)
    need = min_paper_side(3)
    with pytest.raises(ConfigError, match=f"at least {need} px"):
        check_input_size(ModelConfig(arch="paper", widths=(16, 32, 64)), need - 1, 64)
    check_input_size(ModelConfig(arch="paper", widths=(16, 32, 64)), need, need)
    m = build_model(ModelConfig(arch="paper", widths=(16, 32, 64), channels_last=False), 2)
    assert m(torch.randn(1, 3, need, need)).shape[-1] == need


def test_compile_option_runs():
    pytest.importorskip("torch._dynamo")
    m = build_model(ModelConfig(widths=(8, 16), channels_last=False), 3)
    cm = torch.compile(m, backend="eager")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(cm(x), m(x))
