"""A PIIP branch: an off-the-shelf timm Vision Transformer that runs its blocks in groups.

The branch owns timm's own submodules (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``,
``norm``, ``head``) under timm's names, so timm checkpoints load into it with their own keys. What
PIIP adds around them:

* the absolute position embedding stays at its pretraining grid and is resized bicubically
  (``align_corners=False``, float32, no antialias) to the actual token grid at every forward, as
  the authors' detection code does;
* per-block attention choice: global (PyTorch SDPA through timm's ``Attention``) or windowed, with
  a window size per block (``BranchConfig.window_sizes``). A windowed block zero-pads the
  *normalised tokens* at the bottom/right to a multiple of its window, *before* the qkv
  projection, so padded keys/values equal the qkv bias; windows are anchored
  top-left, nothing is masked and the padding is cropped afterwards. This is what the released
  checkpoints were trained with (the authors' flash-attention path); ``window_padding="after_qkv"``
  pads the qkv output instead (padded keys/values 0), as their non-flash ``vit_models`` does;
* blocks run in groups (``interaction_indexes``) so interactions can happen in between;
* constant or linear drop-path schedules, and activation checkpointing.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, RmsNormFp32
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.model import BranchConfig

__all__ = ["ViTBranch", "BranchBlock", "FullWidthQKNormAttention", "window_attention", "window_attention_after_qkv"]


class FullWidthQKNormAttention(Attention):
    """InternViT-style attention: q and k are normalised over the full width, before the head split.

    timm's ``qk_norm`` normalises per head (weights of size ``head_dim``); InternViT-6B's weights
    (``attn.q_norm.weight`` of size ``dim``) need the full-width form.
    """

    def __init__(self, dim: int, num_heads: int = 8, qk_norm: bool = True, norm_layer=None, **kwargs):
        super().__init__(dim, num_heads=num_heads, qk_norm=False, norm_layer=norm_layer, **kwargs)
        self.q_norm = norm_layer(dim)
        self.k_norm = norm_layer(dim)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, C)).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def _for_any_size(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or while exporting a contiguous copy.

    An exported graph must serve every input size, but ``torch.export`` records the shapes of one
    example and simplifies their formulas under what held for it. Reshaping a transposed tensor is
    a view or a copy depending on the sizes (a view where a window axis has size 1), and that
    decision is recorded as an equality (one window) which then rewrites the window count as 1 in
    the graph. A contiguous copy first makes the reshape a view at every size: no such equality.
    """
    return x.clone(memory_format=torch.contiguous_format) if torch.compiler.is_exporting() else x


def window_attention(attn: nn.Module, x: torch.Tensor, hw: tuple[int, int], window: int) -> torch.Tensor:
    """Run ``attn`` inside non-overlapping ``window x window`` windows of the ``hw`` token grid.

    Tokens are zero-padded before ``attn`` (so before its qkv projection): padded keys and values
    equal the qkv bias and are not masked, exactly as the original flash-attention path.
    """
    B, _, C = x.shape
    H, W = hw
    pad_h, pad_w = (-H) % window, (-W) % window
    x = x.view(B, H, W, C)
    # exported, always pad (by 0 where nothing is missing): the example's sizes must not decide it
    if pad_h or pad_w or torch.compiler.is_exporting():
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    rows, cols = Hp // window, Wp // window
    x = _for_any_size(x.view(B, rows, window, cols, window, C).transpose(2, 3))
    x = attn(x.reshape(B * rows * cols, window * window, C))
    x = _for_any_size(x.view(B, rows, cols, window, window, C).transpose(2, 3))
    x = _for_any_size(x.reshape(B, Hp, Wp, C)[:, :H, :W])
    return x.reshape(B, H * W, C)


def window_attention_after_qkv(attn: Attention, x: torch.Tensor, hw: tuple[int, int], window: int) -> torch.Tensor:
    """Window attention that zero-pads the *qkv output* instead of the tokens.

    Padded keys and values are 0 (not the qkv bias), still unmasked: the authors' non-flash
    ``vit_models`` path (``use_flash_attn=False``). Needs a timm :class:`Attention` without qk-norm.
    """
    B, _, C = x.shape
    H, W = hw
    pad_h, pad_w = (-H) % window, (-W) % window
    qkv = attn.qkv(x).view(B, H, W, -1)
    if pad_h or pad_w or torch.compiler.is_exporting():  # see window_attention
        qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    qkv = _for_any_size(qkv.view(B, Hp // window, window, Wp // window, window, -1).transpose(2, 3))
    qkv = qkv.reshape(-1, window * window, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    y = _for_any_size(y.transpose(1, 2)).reshape(B, Hp // window, Wp // window, window, window, -1)
    y = _for_any_size(_for_any_size(y.transpose(2, 3)).reshape(B, Hp, Wp, -1)[:, :H, :W]).reshape(B, H * W, -1)
    return attn.proj_drop(attn.proj(attn.norm(y)))


_NORMS = {
    "layernorm": partial(nn.LayerNorm, eps=1e-6),
    "rmsnorm": partial(RmsNormFp32, eps=1e-6),
}


class BranchBlock(Block):
    """timm's ViT block (same submodules and names) run on a token grid: ``forward(x, hw)`` with
    global attention, or windowed attention when ``window`` is set (``window_attention``: the
    branch's padding rule). A block is one module call, so per-block wrappers see it:
    activation checkpointing recomputes it, FSDP gathers and frees its parameters around it."""

    window: int | None = None
    window_attention = staticmethod(window_attention)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attn(y) if self.window is None else self.window_attention(self.attn, y, hw, self.window)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


_ACTS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh")}


class ViTBranch(nn.Module):
    """One branch of the pyramid.

    Args:
        config: the branch's architecture and layout.
        num_classes: width of the branch's classification head; ``0`` builds no final norm and
            no head (dense tasks, or a merged classification head).
        pool: how the head reads the tokens (see :meth:`forward_head`). ``"avg"`` follows timm's
            average-pooling ViTs: mean of the patch tokens, then the final norm (``fc_norm``);
            the token pools normalise every token (``norm``) and read one.
    """

    def __init__(self, config: BranchConfig, num_classes: int = 0, pool: str = "class_token"):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.window_sizes = config.window_sizes
        self.grad_checkpointing = False
        norm_layer = _NORMS[config.norm_layer]
        vit = VisionTransformer(
            img_size=config.pretrain_img_size,
            patch_size=config.patch_size,
            num_classes=num_classes,
            global_pool="avg" if pool == "avg" else "token" if config.class_token else "",
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=config.qkv_bias,
            qk_norm=config.qk_norm,
            attn_drop_rate=config.attn_drop_rate,
            init_values=config.init_values,
            class_token=config.class_token,
            no_embed_class=True,
            dynamic_img_size=True,
            norm_layer=norm_layer,
            act_layer=_ACTS[config.act_layer],
            attn_layer=FullWidthQKNormAttention if config.qk_norm else Attention,
            final_norm=num_classes > 0,
            fc_norm=pool == "avg",
            block_fn=BranchBlock,
        )
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.num_prefix_tokens = 1 if config.class_token else 0
        # Stored at the pretraining grid; an InternViT-style leading class row is kept (unused by
        # patch tokens) so such checkpoints load without surgery.
        self.pos_embed_prefix = 1 if config.pos_embed_class_row else 0
        grid = config.pos_embed_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_embed_prefix + grid * grid, config.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = vit.blocks
        attend = window_attention_after_qkv if config.window_padding == "after_qkv" else window_attention
        for block, rate, window in zip(self.blocks, config.drop_path_rates(), self.window_sizes):
            block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
            block.window, block.window_attention = window, attend
        if num_classes > 0:
            self.pool = pool
            self.norm = vit.norm
            self.fc_norm = vit.fc_norm
            self.head = vit.head
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    # -- embedding -----------------------------------------------------------------------------
    def resized_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        """Patch position embedding resized to ``hw``: ``(1, H*W, D)`` in float32."""
        grid = self.config.pos_embed_grid
        pos = self.pos_embed[:, self.pos_embed_prefix:]
        exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
        # Exported, resized at every size (to the same size, bicubic is exactly the identity): a
        # graph traced at the stored grid would otherwise add it unresized at every size.
        if not exporting and tuple(hw) == (grid, grid):
            return pos.float()
        # Cached only when no gradient can flow into it; the key tracks in-place updates. Never while
        # exporting or tracing: the traced tensors have no data pointer (torch.export), and a cached
        # tensor would enter the graph as a constant of the example input's grid (the graph must
        # resize the parameter itself, for other input sizes and for the parameter's own name).
        # Nor under torch.compile: the data pointer and the dict would break the graph into pieces
        # (recompiled per branch until dynamo gives up); in the graph the resize is one small kernel.
        cacheable = not (torch.is_grad_enabled() and self.pos_embed.requires_grad or exporting
                         or torch.compiler.is_compiling())
        if not cacheable:
            return self._resize_pos(pos, hw)
        key = (tuple(hw), self.pos_embed._version, self.pos_embed.device, self.pos_embed.data_ptr())
        if key not in self._pos_cache:
            self._pos_cache.clear()
            self._pos_cache[key] = self._resize_pos(pos, hw)
        return self._pos_cache[key]

    def _resize_pos(self, pos: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        grid = self.config.pos_embed_grid
        pos = pos.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=tuple(hw), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify ``image``; returns tokens ``(B, prefix + H*W, D)`` and the token grid ``(H, W)``.

        Image sizes that are not multiples of the patch size are floored, as the original's
        strided patch convolution does: the bottom/right remainder is ignored.
        """
        p = self.patch_size
        H, W = image.shape[-2] // p, image.shape[-1] // p
        x = self.patch_embed(image[..., : H * p, : W * p])  # (B, H, W, D)
        x = x.flatten(1, 2)
        x = (x + self.resized_pos_embed((H, W))).to(x.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x, (H, W)

    # -- blocks --------------------------------------------------------------------------------
    def forward_blocks(self, x: torch.Tensor, hw: tuple[int, int], start: int, end: int) -> torch.Tensor:
        """Run blocks ``start..end`` (inclusive) on the full token sequence."""
        for index in range(start, end + 1):
            block = self.blocks[index]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, hw, use_reentrant=False)
            else:
                x = block(x, hw)
        return x

    # -- head ----------------------------------------------------------------------------------
    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the full token sequence with the branch's final norm and head.

        The constructor's ``pool``: ``"class_token"``, ``"first_patch"`` (the authors'
        classification checkpoints read the first *patch* token) or ``"avg"`` (mean of the patch
        tokens, then ``fc_norm``).
        """
        if self.pool == "avg":
            return self.head(self.fc_norm(x[:, self.num_prefix_tokens:].mean(dim=1)))
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "class_token" else x[:, self.num_prefix_tokens])

    def extra_repr(self) -> str:
        c = self.config
        if not c.window_block_indexes:
            windows = "global attention"
        elif isinstance(c.window_size, int):
            windows = f"window {c.window_size} on {len(c.window_block_indexes)}/{c.depth} blocks"
        else:
            windows = "windows " + ",".join("-" if w is None else str(w) for w in c.window_sizes)
        return f"dim={c.embed_dim}, depth={c.depth}, heads={c.num_heads}, res={c.resolution}, {windows}"

