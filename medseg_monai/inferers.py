"""Inferers MONAI lacks: 2.5D inference over a volume (the WMH thesis, sec. 7.4, Fig. 7.4).

MONAI's ``SliceInferer`` feeds a 2D network single slices through sliding windows of depth 1; a
window of depth k would not replicate edge slices nor predict only the centre slice, so
:class:`NeighbourSliceInferer` is its own ``Inferer``, built on the neighbour stacks of
:func:`medseg_monai.transforms.stack_neighbours` that training uses too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from medseg_monai.transforms.slices import neighbour_indices, spatial_axis, stack_neighbours
from medseg_monai.transforms.utils import plain_tensor

__all__ = ["NeighbourSliceInferer"]


def _network_device(network: Callable, default: torch.device) -> torch.device:
    if isinstance(network, torch.nn.Module):
        parameter = next(network.parameters(), None)
        if parameter is not None:
            return parameter.device
    return default


class NeighbourSliceInferer(Inferer):
    """Run a 2.5D network over a volume slice by slice and restack its outputs (sec. 7.4, Fig. 7.4).

    For input (B, C, X, Y, Z) every slice z along ``axis`` becomes the (C * k, A, B) stack of
    :func:`stack_neighbours` (the same channel order and edge repetition as
    :class:`ExtractSlicesd` in training); the network runs on ``sw_batch_size`` consecutive stacks
    at a time, on ``device`` (default: the device of the network's parameters), under whatever
    autocast the caller set, and its (n, O, A, B) outputs are written back at their slices:
    output (B, O, X, Y, Z) on the input's device, a MetaTensor with the input's metadata when the
    input is one. Outputs are what the network returns (logits for the WMH networks).
    """

    def __init__(
        self,
        axis: int = -1,
        neighbours: int = 3,
        sw_batch_size: int = 12,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.axis = spatial_axis(axis)
        neighbour_indices(1, [0], neighbours)  # validates k
        self.neighbours = neighbours
        self.sw_batch_size = int(sw_batch_size)
        self.device = torch.device(device) if device is not None else None

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) volume, got shape {tuple(inputs.shape)}")
        x = plain_tensor(inputs)
        device = self.device or _network_device(network, x.device)
        n_slices = x.shape[2 + self.axis]
        output: torch.Tensor | None = None
        for b in range(x.shape[0]):
            for start in range(0, n_slices, self.sw_batch_size):
                stop = min(start + self.sw_batch_size, n_slices)
                centres = torch.arange(start, stop)
                window = stack_neighbours(x[b], centres, self.axis, self.neighbours).to(device)
                pred = network(window, *args, **kwargs)
                if not isinstance(pred, torch.Tensor) or pred.shape[2:] != window.shape[2:]:
                    raise ValueError(
                        f"the network must return one (n, O, {', '.join(map(str, window.shape[2:]))}) tensor per slice batch, got {getattr(pred, 'shape', type(pred))}"
                    )
                if output is None:
                    output = torch.empty(
                        (x.shape[0], pred.shape[1], *x.shape[2:]), dtype=pred.dtype, device=x.device
                    )
                # output[b] is (O, X, Y, Z); moving the sliced axis first gives (Z, O, X, Y) views
                output[b].movedim(1 + self.axis, 0)[start:stop] = pred.to(output.device, output.dtype)
        assert output is not None
        if isinstance(inputs, MetaTensor):
            return MetaTensor(
                output, meta=dict(inputs.meta), applied_operations=list(inputs.applied_operations)
            )
        return output
