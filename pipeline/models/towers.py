"""Builds the image and text towers as an open_clip model, so that checkpoints stay loadable by open_clip."""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.packing import Packing


def build_clip(model_cfg: dict) -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP for HF text towers) returning feature dicts; random weights."""
    model_cfg = dict(model_cfg)
    model_cfg.pop("custom_text", None)
    model_cfg.pop("multimodal_cfg", None)  # objective.caption's decoder: a head, built by the unit
    text_cfg = model_cfg.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if "hf_model_name" in text_cfg else open_clip.CLIP
    return cls(**model_cfg, output_dict=True)


def tokenizer_for(model_cfg: dict) -> open_clip.SimpleTokenizer | open_clip.tokenizer.HFTokenizer:
    """open_clip's BPE tokenizer (vocabulary bundled in the wheel: no network) at the model's context length;
    for an HF text tower, its own tokenizer read from the local directory the config names."""
    text = model_cfg["text_cfg"]
    if text.get("hf_tokenizer_name"):
        try:
            return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], context_length=text["context_length"])
        except (OSError, ValueError) as e:
            raise ValueError(f"HF tokenizer {text['hf_tokenizer_name']}: cannot load it offline "
                             f"({str(e).splitlines()[0]})") from None
    return open_clip.SimpleTokenizer(context_length=text.get("context_length", 77))


def image_mean_std(model_cfg: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    vision = model_cfg["vision_cfg"]
    return (tuple(vision.get("image_mean", open_clip.OPENAI_DATASET_MEAN)),
            tuple(vision.get("image_std", open_clip.OPENAI_DATASET_STD)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def encode(clip: nn.Module, images: torch.Tensor | None = None, texts: torch.Tensor | None = None):
    """Normalised embeddings: images [N, 3, H, W] -> [N, D]; texts [N, L] -> [N, D]."""
    out = []
    if images is not None:
        out.append(clip.encode_image(images, normalize=True))
    if texts is not None:
        out.append(clip.encode_text(texts, normalize=True))
    return out[0] if len(out) == 1 else tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Token-level forwards. open_clip's towers return only pooled features and have no "encode these patches"
# entry point, so these functions replay their submodules step by step; with nothing masked they equal
# clip.encode_image / clip.encode_text exactly (tests/test_models.py checks that).
# ---------------------------------------------------------------------------------------------------------------


def check_vit(clip: nn.Module, why: str) -> None:
    """FLIP/MAE/attention fusion need open_clip's own ViT image tower (not timm, not ModifiedResNet)."""
    if not isinstance(getattr(clip, "visual", None), open_clip.transformer.VisionTransformer):
        raise ValueError(f"{why} needs an open_clip ViT image tower; this model has {type(clip.visual).__name__}")


def check_text_transformer(clip: nn.Module, why: str) -> None:
    """MLM/attention fusion read the text tower's tokens: only open_clip's built-in text transformer has them here."""
    if not isinstance(clip, open_clip.CLIP):
        raise ValueError(f"{why} needs open_clip's built-in text tower; this model has an HF text tower")


def encode_image_tokens(visual: nn.Module, images: torch.Tensor, keep: torch.Tensor | None = None):
    """A ViT forward over the visible patches only (FLIP): the cost scales with the number kept.

    images [B, 3, H, W]; keep [B, K] long indices into the N = (H/p)(W/p) patches, or None for all.
    Returns pooled [B, E] (projected, not normalised) and tokens [B, 1 + K, W] (after ln_post, class token first).
    """
    conv = visual.conv1
    ph, pw = conv.kernel_size
    if (keep is not None and conv.bias is None and conv.stride == conv.kernel_size and conv.padding == (0, 0)
            and images.shape[-2] % ph == 0 and images.shape[-1] % pw == 0):
        # The patch embedding of the kept patches only: open_clip's conv1 is one matmul per patch, and on the K kept
        # patches instead of all N it costs 2.8 ms against 5.0 (forward + backward, 32 of 64 patches, batch 64).
        B, C, H, W = images.shape
        patches = images.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(
            B, (H // ph) * (W // pw), C * ph * pw)              # [B, N, C * ph * pw] in the conv weight's order
        patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # [B, K, C ph pw]
        x = patches @ conv.weight.flatten(1).t()                # [B, K, W]
    else:
        x = conv(images)                                        # [B, W, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, N, W]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, W]
    pos = visual.positional_embedding.to(x.dtype)               # [1 + N, W]
    x = x + (pos[1:] if keep is None else F.embedding(1 + keep, pos))  # [B, N or K, W]
    cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)  # [B, 1, W]
    x = torch.cat([cls, x], dim=1)                              # [B, 1 + K, W]
    x = visual.ln_pre(x)
    x = visual.transformer(x)                                   # [B, 1 + K, W]
    if visual.attn_pool is None and not visual.final_ln_after_pool:
        # open_clip normalises every token before pooling: keep those tokens for the decoders.
        x = visual.ln_post(x)
        pooled, _ = visual._global_pool(x)                       # [B, W]
    else:
        pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj                           # [B, E]
    return pooled, x


def padding_is_inert(clip: nn.Module) -> bool:
    """Whether padding never touches a caption's features: a causal text tower that pools at the end-of-text token
    (open_clip's CLIP text tower), where no caption token attends to the padding after it. Trimming the padding
    (trimmed_text_length) and packing captions (encode_text_packed) are exact only then."""
    return (isinstance(clip, open_clip.CLIP) and getattr(clip, "text_pool_type", None) in ("argmax", "eos")
            and getattr(clip, "attn_mask", None) is not None)


def text_padding_mask(text: torch.Tensor) -> torch.Tensor:
    """True at positions after the end-of-text token (the highest id in each row, open_clip's convention)."""
    positions = torch.arange(text.shape[1], device=text.device)  # [L]
    return positions[None, :] > text.argmax(dim=-1, keepdim=True)  # [B, L]


def trimmed_text_length(clip: nn.Module, text: torch.Tensor) -> int:
    """The batch's text length without its all-padding tail columns: up to the last end-of-text token, where
    padding_is_inert (the features are unchanged by the cut); else the full length."""
    if not padding_is_inert(clip):
        return text.shape[1]
    return int(text.argmax(dim=-1).max()) + 1  # one host sync per step


def text_attention_mask(clip: nn.Module, text: torch.Tensor, bidirectional: bool | torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor | None:
    """The additive attention mask of a text pass: open_clip's causal mask [L, L] for causal rows; for bidirectional
    rows (the MLM pass) no causal mask but the padding keys masked. `bidirectional` is one flag for the whole batch
    or one per row [B], which gives a [B * heads, L, L] mask mixing the two kinds."""
    length = text.shape[1]
    causal = None if clip.attn_mask is None else clip.attn_mask[:length, :length].to(dtype)  # [L, L]
    if isinstance(bidirectional, bool) and not bidirectional:
        return causal
    pad = torch.zeros(text.shape, dtype=dtype, device=text.device).masked_fill(text_padding_mask(text), float("-inf"))
    mask = pad[:, None, :].expand(-1, length, -1)                # [B, L, L] padding keys masked
    if not isinstance(bidirectional, bool):  # the other rows keep the tower's own mask (none if not causal)
        plain = causal if causal is not None else torch.zeros((), dtype=dtype, device=text.device)
        mask = torch.where(bidirectional[:, None, None], mask, plain)  # [B, L, L]
    heads = clip.transformer.resblocks[0].attn.num_heads
    return mask[:, None].expand(-1, heads, -1, -1).reshape(-1, length, length)  # [B * heads, L, L]


def project_text(clip: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The text tower's pooled [B, W] -> [B, E] through its projection (a Linear or a matrix), if any."""
    if clip.text_projection is None:
        return pooled
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(pooled)
    return pooled @ clip.text_projection


def encode_text_tokens(clip: nn.Module, text: torch.Tensor, embeddings: torch.Tensor | None = None,
                       bidirectional: bool | torch.Tensor = False):
    """The text tower's forward returning pooled [B, E] and tokens [B, L, W] (after ln_final).

    `embeddings` [B, L, W] replaces the token embedding lookup (MLM swaps in its mask embedding there);
    `bidirectional` (for the batch, or per row [B] bool) drops the causal mask and masks padding keys instead (the
    MLM pass). L may be shorter than the context length (trimmed_text_length).
    """
    cast_dtype = clip.transformer.get_cast_dtype()
    length = text.shape[1]
    x = clip.token_embedding(text).to(cast_dtype) if embeddings is None else embeddings.to(cast_dtype)  # [B, L, W]
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=text_attention_mask(clip, text, bidirectional, x.dtype))
    x = clip.ln_final(x)                                        # [B, L, W]
    pooled = open_clip.transformer.text_global_pool(x, text, clip.text_pool_type,
                                                    eos_token_id=getattr(clip, "text_eos_id", None))
    return project_text(clip, pooled), x


# Packed rows' minimum width: at 16 slots two 8-token captions barely share a row; at 32, four do. Fashion-MNIST's
# MLM step (a 2 x 96 tower over 2 x 64 captions): the text pass's forward + backward 0.87x the padded one at 16 slots
# wide, 0.77x at 32, 0.79x at 64 (paired timing). The attention's cost per token grows with the width.
PACKED_ROW_WIDTH = 32


def encode_text_packed(clip: nn.Module, text: torch.Tensor, embeddings: torch.Tensor | None = None,
                       bidirectional: bool | torch.Tensor = False, row_width: int = PACKED_ROW_WIDTH):
    """encode_text_tokens with the captions packed into shared rows (pipeline.models.packing): the same pooled
    [B, E] and tokens [B, L, W] (zeros past each end-of-text), for the tower compute of the caption tokens alone.

    Only for towers where padding_is_inert holds. Rows are max(L, row_width) slots wide."""
    B, L = text.shape
    lengths = text.argmax(dim=-1) + 1                            # [B]: up to the end-of-text token
    S = max(L, row_width)
    packing = Packing.of(lengths, L, S)
    cast_dtype = clip.transformer.get_cast_dtype()
    if embeddings is None:
        x = clip.token_embedding(packing.pack(text)).to(cast_dtype)  # [R, S, W]
    else:
        x = packing.pack(embeddings.to(cast_dtype))             # [R, S, W]
    x = x + F.embedding(packing.position, clip.positional_embedding.to(cast_dtype)).view(x.shape)
    flags = torch.full((B,), bidirectional, device=text.device) if isinstance(bidirectional, bool) else bidirectional
    allowed = packing.allowed(flags)                            # [R, S, S]
    mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
    heads = clip.transformer.resblocks[0].attn.num_heads
    mask = mask[:, None].expand(-1, heads, -1, -1).reshape(-1, S, S)  # [R * heads, S, S]
    x = clip.ln_final(clip.transformer(x, attn_mask=mask))      # [R, S, W]
    x = packing.unpack(x, (B, L))                               # [B, L, W]
    pooled = x[torch.arange(B, device=x.device), lengths - 1]   # [B, W]: the end-of-text tokens
    return project_text(clip, pooled), x
