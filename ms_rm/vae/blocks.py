"""The blocks of the SD3 / SD3.5 VAE that its encoder and decoder are built of.

diffusers 0.36: models/resnet.py `ResnetBlock2D`, models/downsampling.py `Downsample2D`,
models/upsampling.py `Upsample2D`, models/unets/unet_2d_blocks.py `DownEncoderBlock2D`,
`UpDecoderBlock2D` and `UNetMidBlock2D`, the mid-block `Attention` with `AttnProcessor2_0`.
Attribute names follow diffusers, so parameter names are the diffusers state-dict names.
Shapes: B batch, C channels, H x W the current resolution, L = H * W positions.
"""

from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn
from mindspore.common.initializer import initializer

from ..core import ops
from ..core.layers import Linear

NORM_EPS = 1e-6                      # every GroupNorm of diffusers' VAE


class Conv2d(nn.Cell):
    """torch.nn.Conv2d with a bias and square kernel: weight (out, in, k, k), bias (out,); spelt
    for the device it is built on (ops.use_cpu_spellings). pre_norm and residual: see ops.conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.as_gemm = ops.use_cpu_spellings()
        self.weight = Parameter(initializer("zeros", (out_channels, in_channels, kernel_size, kernel_size),
                                            ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_channels,), ms.float32), name="bias")

    def construct(self, x: Tensor, pre_norm=None, residual: Optional[Tensor] = None) -> Tensor:
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.as_gemm, pre_norm, residual)


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm(groups, channels, eps=1e-6, affine=True), computed in float32."""

    def __init__(self, groups: int, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = Parameter(initializer("ones", (channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (channels,), ms.float32), name="bias")

    def construct(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.groups, self.weight, self.bias, self.eps)

    def prepare(self, x: Tensor):
        """x's statistics and this norm's affine: a following Conv2d's `pre_norm`, which then
        convolves silu(self(x)) (on the CPU without ever holding it whole)."""
        return ops.group_statistics(x, self.groups, self.eps), self.weight, self.bias


class ResnetBlock2D(nn.Cell):
    """diffusers ResnetBlock2D without a time embedding (temb_channels=None, output_scale_factor 1):
    x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the skip through a 1x1 conv when C changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv1(x, pre_norm=self.norm1.prepare(x))                    # (B, C_out, H, W)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return self.conv2(h, pre_norm=self.norm2.prepare(h), residual=skip)  # dropout: identity in eval


class Downsample2D(nn.Cell):
    """diffusers Downsample2D(use_conv=True, padding=0): zero-pad right and bottom by one, then a
    3x3 stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(ops.pad(x, (0, 1, 0, 1)))                           # (B, C, H+1, W+1) -> (B, C, H/2, W/2)


class SpatialSelfAttention(nn.Cell):
    """The mid block's diffusers Attention: GroupNorm, then single-head self-attention over the
    H*W positions with head dim C (attention_head_dim = channels), output projection, residual
    (residual_connection=True, rescale_output_factor 1).

    The scores (B, 1, L, L) float32 take 1 GiB per image at 1024 x 1024 pixels (L = 128 * 128),
    where torch's fused kernel streams them: with the CPU spellings they are made a chunk of
    queries at a time (ops.attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        # Index 1 is diffusers' dropout, kept so that the projection is named to_out.0.
        self.to_out = nn.CellList([Linear(channels, channels), nn.Identity()])
        self.chunked = ops.use_cpu_spellings()

    def construct(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = mint.swapaxes(self.group_norm(x).reshape(b, c, h * w), 1, 2)   # (B, L, C)
        one_head = (b, 1, h * w, c)
        q = self.to_q(tokens).reshape(one_head)                                  # (B, 1, L, C): one head
        k = self.to_k(tokens).reshape(one_head)
        v = self.to_v(tokens).reshape(one_head)
        out = self.to_out[0](ops.attention(q, k, v, chunked=self.chunked).reshape(b, h * w, c))   # (B, L, C)
        return mint.swapaxes(out, 1, 2).reshape(b, c, h, w) + x                  # (B, C, H, W)


class UNetMidBlock2D(nn.Cell):
    """resnet -> [attention] -> resnet at the lowest resolution (diffusers' num_layers=1)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.CellList([SpatialSelfAttention(channels, groups)] if add_attention else [])
        self.add_attention = add_attention

    def construct(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def upsample_nearest(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W), each value repeated 2 x 2 (F.interpolate(scale_factor=2, "nearest"))."""
    b, c, h, w = x.shape
    x = mint.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2))
    return x.reshape(b, c, 2 * h, 2 * w)


class Upsample2D(nn.Cell):
    """diffusers Upsample2D(use_conv=True): nearest 2x upsampling, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest(x))


class ResnetStack(nn.Cell):
    """`layers` resnets, then the block's resampler (`resample`): what diffusers' DownEncoderBlock2D
    and UpDecoderBlock2D share."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                                    for i in range(layers)])

    def construct(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)                                                    # (B, C_out, H, W)
        return self.resample(x)


class DownEncoderBlock2D(ResnetStack):
    """`layers` resnets, then (all blocks but the last) a Downsample2D: -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if downsample else None

    def resample(self, x: Tensor) -> Tensor:
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(ResnetStack):
    """`layers` resnets, then (all blocks but the last) an Upsample2D: -> (B, C_out, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__(in_channels, out_channels, layers, groups)
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if upsample else None

    def resample(self, x: Tensor) -> Tensor:
        return x if self.upsamplers is None else self.upsamplers[0](x)
