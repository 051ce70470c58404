"""3D convolutions on the CPU through oneDNN in channels-last layout: PyTorch's own choice sends the
small ones (narrow or deep layers of a batch-1 step, the quick profiles' volumes) to a path several
times slower, and oneDNN is faster again on channels-last (N, D, H, W, C) activations. On one
thread, a knee quick step (1 x 1 x 64 x 64 x 16) took 0.24 s instead of 0.35 s with oneDNN alone; a
1 x 1 x 128 x 128 x 32 step at widths 16-256 2.9 s instead of 3.1 s, its forward pass without
gradients 0.9 s instead of 1.2 s. Channels-last then took the quick training steps, one thread,
from 0.41 to 0.32 s (BraTS, 2 x 4 x 40 x 48 x 32), 0.29 to 0.24 s (knee) and 0.20 to 0.19 s (LV,
2 x 1 x 64 x 64 x 8), and left the 128 x 128 x 32 step as it was (7.8-9.0 s either way)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BatchOneConv3d", "fast_cpu_conv3d"]

# PyTorch (aten/src/ATen/native/Convolution.cpp, ConvParams::use_mkldnn) gives a float32 CPU
# convolution with a small kernel to oneDNN only if the batch has more than one sample or
# N * C * D * H exceeds this; otherwise to slow_conv3d (im2col), whose backward on a
# (1, 16, 32, 32, 8) input takes 45 ms against 7 ms for oneDNN on two samples (one thread).
ONEDNN_MIN_NCDH = 20480


class BatchOneConv3d(nn.Conv3d):
    """``nn.Conv3d`` that computes a float32 CPU input (N, C, D, H, W) in channels-last memory
    layout (the output too, so the next convolution finds it there: same shape and values, only the
    strides differ) and a one-sample input as a batch of two (the sample and zeros), which PyTorch
    sends to oneDNN, returning the sample's output: the same parameters, state dict and result (to
    float rounding) as ``nn.Conv3d``, in a fraction of the time where PyTorch would take
    slow_conv3d. Inputs on other devices or of other types pass through unchanged."""

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if not (input.device.type == "cpu" and input.dtype == torch.float32 and input.dim() == 5):
            return super()._conv_forward(input, weight, bias)
        input = input.contiguous(memory_format=torch.channels_last_3d)
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
        if _takes_slow_conv3d(input, weight, self.groups):
            pair = torch.cat([input, torch.zeros_like(input)])
            return super()._conv_forward(pair, weight, bias)[:1]
        return super()._conv_forward(input, weight, bias)


def _takes_slow_conv3d(input: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether PyTorch's heuristic (``ConvParams::use_mkldnn``) leaves this convolution of a float32
    CPU input (N, C, D, H, W) to slow_conv3d."""
    n, c, d, h = input.shape[:4]
    return (
        n == 1
        and groups == 1
        and not (weight.shape[-1] > 3 and weight.shape[-2] > 3)
        and n * c * d * h <= ONEDNN_MIN_NCDH
    )


def fast_cpu_conv3d(network: nn.Module) -> nn.Module:
    """``network`` with each ``nn.Conv3d`` made a :class:`BatchOneConv3d` in place (parameters and
    state dict keys unchanged, so checkpoints load either way); a no-op on networks without 3D
    convolutions and on GPU inputs."""
    for module in network.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = BatchOneConv3d
    return network
