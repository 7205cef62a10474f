"""Synchformer (Iashin et al. 2024): the audio-visual offset classifier behind av-benchmark's DeSync.

Written here with the module names and shapes of the release ``synchformer_state_dict.pth``
(MMAudio v0.1, the AudioSet-trained ``24-01-04T16-39-21`` model's ``state_dict``), so it loads
with ``strict=True``; the key list, derived from av-benchmark's own module tree, is checked in as
``tests/data/synchformer_keys.json``. The parts:

- ``vfeat_extractor``: MotionFormer (divided space-time attention ViT-B/16, 3-D patches of
  2 x 16 x 16 px, separate spatial and temporal position embeddings). A segment of 16 frames of
  224 px gives 8 x 14 x 14 tokens; each frame's 196 tokens are pooled by a transformer layer's
  CLS token (``spatial_attn_agg``): [8, 768] per segment.
- ``afeat_extractor``: AST (ViT-B/16 on a 128-bin x 66-frame log-mel, patch stride 10: 12 x 6
  patches, CLS + distillation tokens); each time column's 12 frequency tokens are pooled by
  ``freq_attn_agg``: [6, 768] per segment.
- ``vproj``/``aproj`` and ``transformer``: 14 segments of both streams, ``[OFF] v.. [MOD] a..``
  with a learnt position embedding (198 tokens), 3 minGPT blocks, ``off_head``: 21 logits for
  the offsets -2.0, -1.8, ..., +2.0 s.

Dropout is omitted (evaluation only). ``SynchformerSize`` shrinks every width and depth for tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics.passt import VitMlp

PATCH = 16
FRAMES_PER_SEGMENT, TEMPORAL_PATCH = 16, 2
MEL_BINS, MEL_FRAMES, AUDIO_STRIDE = 128, 66, 10
SEGMENTS = 14
OFFSETS = 21


@dataclass(frozen=True)
class SynchformerSize:
    """Widths and depths; the defaults are the release's."""

    dim: int = 768
    video_depth: int = 12
    video_heads: int = 12
    audio_depth: int = 12
    audio_heads: int = 12
    sync_depth: int = 3
    sync_heads: int = 8
    image_size: int = 224

    @property
    def spatial_patches(self) -> int:
        return (self.image_size // PATCH) ** 2


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


class _DividedAttention(nn.Module):
    """MotionFormer's divided attention: the CLS token attends to every token; each patch token to
    the CLS token and the tokens of its own frame (space) or its own position (time)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, per_frame: int, over_time: bool) -> torch.Tensor:
        b, n, d = x.shape
        h, hd = self.heads, d // self.heads
        q, k, v = (y.reshape(b, n, h, hd).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
        q = q * hd ** -0.5
        cls_out = _attend(q[:, :, :1], k, v)
        frames = (n - 1) // per_frame

        def grouped(y: torch.Tensor) -> torch.Tensor:  # [b, h, groups, members, hd]
            y = y[:, :, 1:].reshape(b, h, frames, per_frame, hd)
            return y.transpose(2, 3) if over_time else y

        qg, kg, vg = grouped(q), grouped(k), grouped(v)
        groups = qg.shape[2]
        kg = torch.cat([k[:, :, :1, None].expand(b, h, groups, 1, hd), kg], dim=3)
        vg = torch.cat([v[:, :, :1, None].expand(b, h, groups, 1, hd), vg], dim=3)
        out = _attend(qg, kg, vg)
        out = (out.transpose(2, 3) if over_time else out).reshape(b, h, n - 1, hd)
        return self.proj(torch.cat([cls_out, out], dim=2).transpose(1, 2).reshape(b, n, d))


class _DividedBlock(nn.Module):
    """Time attention (``norm3``/``timeattn``), then space attention (``norm1``/``attn``), then the MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn, self.timeattn = _DividedAttention(dim, heads), _DividedAttention(dim, heads)
        self.mlp = VitMlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, per_frame: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), per_frame, over_time=True)
        x = x + self.attn(self.norm1(x), per_frame, over_time=False)
        return x + self.mlp(self.norm2(x))


class _ClsPool(nn.TransformerEncoderLayer):
    """A pre-norm transformer encoder layer over ``[CLS] + tokens``; returns the CLS output."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                         layer_norm_eps=1e-6, norm_first=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return super().forward(x)[:, 0]


class _Conv(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv


class MotionFormer(nn.Module):
    """Segments [N, 3, 16, H, W] (normalised to [-1, 1]) -> per-frame features [N, 8, dim]."""

    def __init__(self, size: SynchformerSize):
        super().__init__()
        dim, frames = size.dim, FRAMES_PER_SEGMENT // TEMPORAL_PATCH
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, size.spatial_patches + 1, dim))
        self.temp_embed = nn.Parameter(torch.zeros(1, frames, dim))
        # the 2-D patch embedding is in the release but unused (the 3-D one tokenises)
        self.patch_embed = _Conv(nn.Conv2d(3, dim, PATCH, stride=PATCH))
        self.patch_embed_3d = _Conv(nn.Conv3d(3, dim, (TEMPORAL_PATCH, PATCH, PATCH),
                                              stride=(TEMPORAL_PATCH, PATCH, PATCH)))
        self.blocks = nn.ModuleList(_DividedBlock(dim, size.video_heads) for _ in range(size.video_depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.spatial_attn_agg = _ClsPool(dim, size.video_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed_3d.proj(x)  # [N, D, t, h, w]
        n, d, t, h, w = x.shape
        x = torch.cat([self.cls_token.expand(n, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        pos = self.pos_embed[:, 1:].repeat(1, t, 1) + self.temp_embed.repeat_interleave(h * w, dim=1)
        x = x + torch.cat([self.pos_embed[:, :1], pos], dim=1)
        for block in self.blocks:
            x = block(x, per_frame=h * w)
        x = self.norm(x[:, 1:]).reshape(n * t, h * w, d)  # tokens are frame-major: one row per frame
        return self.spatial_attn_agg(x).reshape(n, t, d)


class _Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _AstSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        return _attend(q / math.sqrt(d // self.heads), k, v).transpose(1, 2).reshape(b, n, d)


class _AstAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = _AstSelfAttention(dim, heads)
        self.output = _Linear(dim, dim)


class _AstLayer(nn.Module):
    """Hugging Face's ``ASTLayer`` (pre-norm ViT block, LayerNorm eps 1e-12)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = _AstAttention(dim, heads)
        self.intermediate = _Linear(dim, 4 * dim)
        self.output = _Linear(4 * dim, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.output.dense(self.attention.attention(self.layernorm_before(x)))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class _AstEmbeddings(nn.Module):
    def __init__(self, dim: int, patches: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, patches + 2, dim))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(1, dim, PATCH, stride=AUDIO_STRIDE)


class _AstEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int):
        super().__init__()
        self.layer = nn.ModuleList(_AstLayer(dim, heads) for _ in range(depth))


def audio_grid() -> tuple[int, int]:
    """AST patches (frequency, time) of a 128 x 66 log-mel: 12 x 6."""
    return (MEL_BINS - PATCH) // AUDIO_STRIDE + 1, (MEL_FRAMES - PATCH) // AUDIO_STRIDE + 1


class _Ast(nn.Module):
    def __init__(self, size: SynchformerSize):
        super().__init__()
        f, t = audio_grid()
        self.embeddings = _AstEmbeddings(size.dim, f * t)
        self.encoder = _AstEncoder(size.dim, size.audio_heads, size.audio_depth)
        self.layernorm = nn.LayerNorm(size.dim, eps=1e-12)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[N, 128, 66] -> patch tokens [N, D, f, t] (CLS and distillation outputs dropped)."""
        e = self.embeddings
        x = e.patch_embeddings.projection(mel[:, None])  # [N, D, f, t]
        n, d, f, t = x.shape
        tokens = [e.cls_token.expand(n, -1, -1), e.distillation_token.expand(n, -1, -1), x.flatten(2).transpose(1, 2)]
        x = torch.cat(tokens, dim=1) + e.position_embeddings
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)[:, 2:].transpose(1, 2).reshape(n, d, f, t)


class AudioFeatures(nn.Module):
    """Log-mel segments [N, 128, 66] -> per-time-patch features [N, 6, dim]."""

    def __init__(self, size: SynchformerSize):
        super().__init__()
        self.ast = _Ast(size)
        self.freq_attn_agg = _ClsPool(size.dim, size.audio_heads)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.ast(mel)
        n, d, f, t = x.shape
        x = x.permute(0, 3, 2, 1).reshape(n * t, f, d)  # one row per time column
        return self.freq_attn_agg(x).reshape(n, t, d)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.key, self.query, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        return self.proj(_attend(q / math.sqrt(d // self.heads), k, v).transpose(1, 2).reshape(b, n, d))


class _GptBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _PosEmb(nn.Module):
    def __init__(self, length: int, dim: int):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, length, dim))


class SyncTransformer(nn.Module):
    """``[OFF] v_1..v_112 [MOD] a_1..a_84`` -> 21 offset logits (SparseSync's global transformer)."""

    def __init__(self, size: SynchformerSize):
        super().__init__()
        dim = size.dim
        _, audio_t = audio_grid()
        length = 2 + SEGMENTS * (FRAMES_PER_SEGMENT // TEMPORAL_PATCH + audio_t)
        self.vis_in_lnorm, self.aud_in_lnorm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.OFF_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.MOD_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb_cfg = _PosEmb(length, dim)
        self.blocks = nn.Sequential(*(_GptBlock(dim, size.sync_heads) for _ in range(size.sync_depth)))
        self.ln_f = nn.LayerNorm(dim)
        self.off_head = nn.Linear(dim, OFFSETS)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        b = v.shape[0]
        x = torch.cat([self.OFF_tok.expand(b, -1, -1), self.vis_in_lnorm(v),
                       self.MOD_tok.expand(b, -1, -1), self.aud_in_lnorm(a)], dim=1)
        x = self.ln_f(self.blocks(x + self.pos_emb_cfg.pos_emb))
        return self.off_head(x[:, 0])


class Synchformer(nn.Module):
    """The release's module tree; see the module docstring."""

    def __init__(self, size: SynchformerSize = SynchformerSize()):
        super().__init__()
        self.size = size
        self.vfeat_extractor = MotionFormer(size)
        self.afeat_extractor = AudioFeatures(size)
        self.vproj = nn.Linear(size.dim, size.dim)
        self.aproj = nn.Linear(size.dim, size.dim)
        self.transformer = SyncTransformer(size)

    def video_features(self, segments: torch.Tensor) -> torch.Tensor:
        """[N, 16, 3, H, W] -> [N, 8, dim] (av-benchmark's ``extract_vfeats``)."""
        return self.vfeat_extractor(segments.permute(0, 2, 1, 3, 4))

    def audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        """[N, 128, 66] -> [N, 6, dim] (av-benchmark's ``extract_afeats``)."""
        return self.afeat_extractor(mel)

    def offset_logits(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """14 segments of each, [B, 14, 8, dim] and [B, 14, 6, dim] -> [B, 21] (``compare_v_a``)."""
        v, a = self.vproj(video), self.aproj(audio)
        return self.transformer(v.flatten(1, 2), a.flatten(1, 2))


def size_of(state: dict[str, torch.Tensor]) -> SynchformerSize:
    """The size a state dict was made for; heads are the release's at width 768, else width / 16."""
    dim = int(state["vproj.weight"].shape[0])

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})

    heads = (12, 12, 8) if dim == 768 else (max(1, dim // 16),) * 3
    image = int(round(math.sqrt(state["vfeat_extractor.pos_embed"].shape[1] - 1))) * PATCH
    return SynchformerSize(dim=dim, video_depth=count("vfeat_extractor.blocks."), video_heads=heads[0],
                           audio_depth=count("afeat_extractor.ast.encoder.layer."), audio_heads=heads[1],
                           sync_depth=count("transformer.blocks."), sync_heads=heads[2], image_size=image)
