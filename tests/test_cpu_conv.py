"""One-sample 3D convolutions on the CPU through oneDNN (``medseg_monai.networks.cpu``): the
same results as ``nn.Conv3d``, without PyTorch's slow_conv3d, in every 3D bundle's network."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import profile

from bundle_utils import parse_study
from medseg_monai.networks import BatchOneConv3d, fast_cpu_conv3d


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 3, (3, 3, 1), padding=(1, 1, 0))
    )


def _ops(net: nn.Module, x: torch.Tensor) -> set[str]:
    with profile() as prof:
        net(x).sum().backward()
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("batch", [1, 2])
def test_same_outputs_gradients_and_state_dict_as_conv3d(batch: int) -> None:
    plain, fast = _net(), fast_cpu_conv3d(_net())
    assert all(type(m) is BatchOneConv3d for m in fast if isinstance(m, nn.Conv3d))
    assert plain.state_dict().keys() == fast.state_dict().keys()
    x = torch.randn(batch, 2, 16, 16, 8)
    y_plain, y_fast = plain(x), fast(x)
    assert y_fast.shape == (batch, 3, 16, 16, 8)
    # computed channels-last (oneDNN's faster layout), the plain network's in its input's layout
    assert y_fast.is_contiguous(memory_format=torch.channels_last_3d) and y_plain.is_contiguous()
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-4, atol=1e-5)
    y_plain.square().sum().backward()
    y_fast.square().sum().backward()
    for a, b in zip(plain.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)
    # a checkpoint of either loads into the other
    plain.load_state_dict(fast.state_dict())


def test_one_sample_takes_onednn_not_slow_conv3d() -> None:
    x = torch.randn(1, 2, 16, 16, 8)
    # PyTorch's own choice for this input (N * C * D * H = 512 <= 20480): the path we avoid
    assert "aten::slow_conv3d_forward" in _ops(_net(), x)
    ops = _ops(fast_cpu_conv3d(_net()), x)
    assert "aten::slow_conv3d_forward" not in ops and "aten::mkldnn_convolution" in ops


@pytest.mark.parametrize("shape", [(2, 2, 16, 16, 8), (1, 2, 16, 16, 8)])
def test_batches_pass_through_and_keep_their_size(shape: tuple[int, ...]) -> None:
    net = fast_cpu_conv3d(_net())
    with torch.no_grad():
        assert net(torch.randn(*shape)).shape == (shape[0], 3, *shape[2:])


@pytest.mark.parametrize(
    ("study", "converted"), [("knee", True), ("lv", True), ("brats", True), ("wmh", False)]
)
def test_bundle_networks_are_converted(study: str, converted: bool) -> None:
    net = parse_study(study, profile="quick").get_parsed_content("network")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert bool(convs) == converted and all(type(m) is BatchOneConv3d for m in convs)
