"""Dice-family losses that MONAI lacks: the X-ray study's DL2 (foreground + background-complement
Dice) and weighted sum of losses (e.g. DL2 + cross-entropy), and the knee study's negative soft Dice."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["ForegroundBackgroundDiceLoss", "NegativeSoftDiceLoss", "SumOfLosses"]


def _probabilities_and_onehot(
    input: torch.Tensor, target: torch.Tensor, softmax: bool, to_onehot_y: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.softmax(input, dim=1) if softmax else input
    if to_onehot_y:
        if target.shape[1] != 1:
            raise ValueError(f"to_onehot_y needs a (B, 1, ...) class-index target, got {tuple(target.shape)}")
        r = F.one_hot(target[:, 0].long(), num_classes=p.shape[1]).movedim(-1, 1).to(p.dtype)
    else:
        r = target.to(p.dtype)
    if r.shape != p.shape:
        raise ValueError(f"target {tuple(r.shape)} does not match prediction {tuple(p.shape)}")
    return p, r


class ForegroundBackgroundDiceLoss(_Loss):
    """The X-ray poster's DL2: soft Dice of each class plus soft Dice of its complement.

    For class probabilities p and one-hot reference r over N pixels (Olander et al., DTU poster P28,
    after Sudre et al., DLMIA 2017):

        DL2 = 1 - (sum p r + eps) / (sum p + r + eps) - (sum (1-p)(1-r) + eps) / (sum 2 - p - r + eps)

    Each ratio is at most 1/2, so DL2 is 0 for a perfect prediction. Multi-class input is treated
    one-vs-rest and DL2 averaged over classes. ``batch=True`` sums over the whole mini-batch.

    Args:
        input: (B, C, *spatial) logits (``softmax=True``) or probabilities.
        target: (B, 1, *spatial) class indices (``to_onehot_y=True``) or (B, C, *spatial) one-hot.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = True,
        softmax: bool = True,
        smooth: float = 1e-6,
        batch: bool = True,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.softmax = softmax
        self.smooth = smooth
        self.batch = batch

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, r = _probabilities_and_onehot(input, target, self.softmax, self.to_onehot_y)
        if not self.include_background:
            p, r = p[:, 1:], r[:, 1:]
        dims = [0, *range(2, p.ndim)] if self.batch else list(range(2, p.ndim))
        eps = self.smooth
        foreground = ((p * r).sum(dims) + eps) / ((p + r).sum(dims) + eps)
        background = (((1 - p) * (1 - r)).sum(dims) + eps) / ((2 - p - r).sum(dims) + eps)
        return (1 - foreground - background).mean()


class SumOfLosses(_Loss):
    """Weighted sum of losses called on the same (input, target), e.g. cross-entropy + DL2."""

    def __init__(
        self, losses: Sequence[Callable[..., torch.Tensor]], weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.losses = list(losses)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.losses)
        if len(self.weights) != len(self.losses):
            raise ValueError(f"{len(self.losses)} losses but {len(self.weights)} weights")
        self._modules_list = torch.nn.ModuleList([m for m in self.losses if isinstance(m, torch.nn.Module)])

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(input, target) for w, loss in zip(self.weights, self.losses, strict=True))


class NegativeSoftDiceLoss(_Loss):
    """The knee thesis's loss (sec. 4.5.2: "the negative DICE coefficient was used"), read as the
    Keras ``dice_coef`` that U-Nets of its time minimised (e.g. github.com/jocicmarko/
    ultrasound-nerve-segmentation): the sigmoid maps and binary references are flattened over
    batch, channels and voxels together and

        loss = -(2 sum p t + smooth) / (sum p + sum t + smooth),   smooth = 1,

    so it runs from -1 (perfect) towards 0, and a bone's weight is its voxel count (pooled, not a
    mean over bones). Its gradient is that of MONAI's ``DiceLoss`` only with one channel.

    Args:
        input: (B, C, *spatial) logits (``sigmoid=True``) or probabilities, one map per structure.
        target: (B, C, *spatial) binary maps.
    """

    def __init__(self, sigmoid: bool = True, smooth: float = 1.0) -> None:
        super().__init__()
        self.sigmoid = sigmoid
        self.smooth = float(smooth)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"target {tuple(target.shape)} does not match prediction {tuple(input.shape)}")
        p = torch.sigmoid(input) if self.sigmoid else input
        t = target.to(p.dtype)
        return -(2 * (p * t).sum() + self.smooth) / (p.sum() + t.sum() + self.smooth)
