"""A tiny stand-in for briaai/RMBG-1.4's `briarmbg.py`, written for imagen's tests and demos.

It keeps what imagen's loader and the remove-background operation rely on in the real file:
the module and class names, the relative import of `RMBGConfig`, a `PreTrainedModel`
subclass that does not call `post_init()`, a default config built at import time, BatchNorm
buffers in the state dict, and IS-Net's output contract: `model(x)[0][0]` is a
`[N, out_ch, H, W]` mask in 0..1 for a normalised `[N, in_ch, H, W]` input. The network
itself is a small U-Net of our own, a few thousand parameters instead of 44 M.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel

from .MyConfig import RMBGConfig


class ConvBnRelu(nn.Module):
    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _upsample_like(x, target):
    return F.interpolate(x, size=target.shape[2:], mode="bilinear", align_corners=False)


class BriaRMBG(PreTrainedModel):
    config_class = RMBGConfig

    # The real file also builds its default config when the module is imported.
    def __init__(self, config: RMBGConfig = RMBGConfig()):
        super().__init__(config)
        width = 8
        self.conv_in = nn.Conv2d(config.in_ch, width, 3, stride=2, padding=1)
        self.enc1 = ConvBnRelu(width, width)
        self.enc2 = ConvBnRelu(width, 2 * width, stride=2)
        self.enc3 = ConvBnRelu(2 * width, 2 * width, stride=2)
        self.dec2 = ConvBnRelu(4 * width, width)
        self.dec1 = ConvBnRelu(2 * width, width)
        self.side1 = nn.Conv2d(width, config.out_ch, 3, padding=1)
        self.side2 = nn.Conv2d(width, config.out_ch, 3, padding=1)

    def forward(self, x):
        hx1 = self.enc1(self.conv_in(x))
        hx2 = self.enc2(hx1)
        hx3 = self.enc3(hx2)
        hx2d = self.dec2(torch.cat((_upsample_like(hx3, hx2), hx2), 1))
        hx1d = self.dec1(torch.cat((_upsample_like(hx2d, hx1), hx1), 1))
        d1 = _upsample_like(self.side1(hx1d), x)
        d2 = _upsample_like(self.side2(hx2d), x)
        return [torch.sigmoid(d1), torch.sigmoid(d2)], [hx1d, hx2d]
