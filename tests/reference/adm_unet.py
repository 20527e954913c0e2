"""guided-diffusion's ``UNetModel`` (``guided_diffusion/unet.py`` + ``nn.py``), reduced to 2-D and inference.

A compact, faithful re-implementation (same module tree, so the same state-dict keys and shapes) of
openai/guided-diffusion @ 22e0df8183507e13a7813f8d38d51b072ca1e67c (identical in the SAG fork
KU-CVLAB/Self-Attention-Guidance @ b4f16d8e09cf0b93a325b5ad94970d30deef3994 except the attention-map output).
tests/test_adm.py proves the converter against it; tests/test_adm_sampling.py samples with it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from sag.models.adm import adm_flags


# --- reference: guided_diffusion/unet.py + nn.py, reduced to 2-D and inference -----------------------------
# Deviation: GroupNorm keeps the input dtype (ADM's GroupNorm32 computes in float32, for fp16 training), so
# the float64 comparison below is not limited by float32 rounding.
def normalization(c):
    return nn.GroupNorm(32, c)


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, use_scale_shift_norm=False, up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if self.out_channels == channels
                                else nn.Conv2d(channels, self.out_channels, 1))

    def forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", (q * scale).view(bs * self.n_heads, ch, length),
                              (k * scale).view(bs * self.n_heads, ch, length))
        weight = torch.softmax(weight, dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return a.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_new_attention_order=False):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """guided-diffusion ``UNetModel`` built from ``script_util.create_model``-style flags."""

    def __init__(self, flags):
        super().__init__()
        f = adm_flags(None, **flags)
        mc, mults, nrb = f["num_channels"], f["channel_mult"], f["num_res_blocks"]
        attention_resolutions = [f["image_size"] // r for r in f["attention_resolutions"]]
        ss, updown = f["use_scale_shift_norm"], f["resblock_updown"]
        heads_kw = dict(num_head_channels=f["num_head_channels"], use_new_attention_order=f["use_new_attention_order"])
        self.model_channels = mc
        self.num_classes = f["num_classes"] if f["class_cond"] else None
        ted = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, ted)
        ch = input_ch = int(mults[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(mults):
            for _ in range(nrb):
                layers = [ResBlock(ch, ted, int(mult * mc), use_scale_shift_norm=ss)]
                ch = int(mult * mc)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=f["num_heads"], **heads_kw))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(mults) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    ResBlock(ch, ted, ch, use_scale_shift_norm=ss, down=True) if updown else Downsample(ch, True)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, use_scale_shift_norm=ss), AttentionBlock(ch, num_heads=f["num_heads"], **heads_kw),
            ResBlock(ch, ted, use_scale_shift_norm=ss))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(nrb + 1):
                ich = chans.pop()
                layers = [ResBlock(ch + ich, ted, int(mc * mult), use_scale_shift_norm=ss)]
                ch = int(mc * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=f["num_heads_upsample"], **heads_kw))
                if level and i == nrb:
                    layers.append(ResBlock(ch, ted, ch, use_scale_shift_norm=ss, up=True) if updown
                                  else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 nn.Conv2d(input_ch, 6 if f["learn_sigma"] else 3, 3, padding=1))

    def forward(self, x, timesteps, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def randomize(net, seed):
    """Random weights everywhere (ADM zero-inits out_layers.3/proj_out/out.2, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1:
                # 1-D weights are GroupNorm scales (around 1), the rest are biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                fan_in = p[0].numel()
                gain = 3.0 if name.endswith("qkv.weight") else 1.0  # non-flat attention
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(fan_in))
    return net.eval()


# --- the SAG fork's attention-map output (guided_diffusion/unet.py of KU-CVLAB/Self-Attention-Guidance) ----------
def attention_from_qkv(qkv, num_heads):
    """The fork's ``attention_from_qkv``: the legacy [q, k, v]-per-head split with the MODEL-level ``num_heads``
    (whatever the block's own head count or attention order), softmax in float32."""
    bs, width, length = qkv.shape
    assert width % (3 * num_heads) == 0
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # More stable with f16 than dividing afterwards
    return torch.softmax(weight.float(), dim=-1).type(weight.dtype)


class SagUNetModel(nn.Module):
    """The fork's ``UNetModel`` output ``(out, attention)``: ``save_input_hook`` on the selected block's
    ``attention`` module keeps its qkv input; ``forward`` returns ``attention_from_qkv(qkv, self.num_heads)``."""

    def __init__(self, unet, sel_attn_block="output", sel_attn_depth=2, num_heads=4):
        super().__init__()
        self.unet, self.num_heads = unet, num_heads
        if sel_attn_block == "middle":
            self.extract_attention = unet.middle_block[1].attention
        elif sel_attn_block == "output":
            assert 0 <= sel_attn_depth <= 8, "sel_attn_depth must be between 0 and 8"
            self.extract_attention = unet.output_blocks[sel_attn_depth][1].attention
        else:
            raise ValueError("sel_attn_block must be 'middle' or 'output'")
        self.extract_attention.register_forward_hook(self._save_input_hook)

    def _save_input_hook(self, module, inp, out):
        self.qkv = inp[0]
        return out

    def forward(self, x, timesteps, y=None):
        out = self.unet(x, timesteps, y)
        return out, attention_from_qkv(self.qkv, self.num_heads)
