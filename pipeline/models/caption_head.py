"""The captioning head (CoCa): open_clip's `MultimodalTransformer`, a causal text decoder over the text tower's
tokens that cross-attends to the image tower's tokens, and caption generation (greedy and beam search).

The head is open_clip's own module with CoCa's arguments, so its state dict is CoCa's `text_decoder.*` as is and
an export loads as `open_clip.CoCa` (pipeline/artifacts/export.py). The decoder's width is the text tower's; the
image tokens it attends to are the ViT's patch tokens after ln_post (class token left out), which is what CoCa's
image tower hands its decoder when it has no attentional pooler.

Generation runs on any `Captioner`: plait's training model (`PlaitCaptioner`) or an exported CoCa
(`CocaCaptioner`), so `plait caption` and the export's check decode with the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
from open_clip.transformer import MultimodalTransformer, QuickGELU
from torch import nn

from pipeline.models.towers import encode_image_tokens, encode_text_tokens

SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0   # open_clip's SimpleTokenizer: start, end of text, padding


def multimodal_cfg(model_cfg: dict, layers: int, heads: int) -> dict:
    """open_clip's CoCa `multimodal_cfg` for a decoder over this model's text tower."""
    text = model_cfg["text_cfg"]
    return {"context_length": text.get("context_length", 77), "vocab_size": text.get("vocab_size", 49408),
            "width": text.get("width", 512), "heads": heads, "layers": layers}


def build_decoder(model_cfg: dict, mm_cfg: dict) -> MultimodalTransformer:
    """The decoder exactly as open_clip's CoCa builds it (`_build_text_decoder_tower`), projection initialised."""
    decoder = MultimodalTransformer(context_length=mm_cfg["context_length"], width=mm_cfg["width"],
                                    heads=mm_cfg["heads"], layers=mm_cfg["layers"], output_dim=mm_cfg["vocab_size"],
                                    act_layer=QuickGELU if model_cfg.get("quick_gelu") else nn.GELU)
    nn.init.normal_(decoder.text_projection, std=mm_cfg["width"] ** -0.5)  # open_clip leaves it torch.empty
    return decoder


def caption_logits(decoder: nn.Module, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: image tokens [B, T, W] (class token excluded), the text tower's tokens [B, L, W] ->
    next-token logits [B, L - 1, V] for the labels ids[:, 1:]."""
    return decoder(image_tokens, text_tokens[:, :-1])                     # [B, L - 1, V]


def last_logits(decoder: MultimodalTransformer, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
    """`decoder(image_tokens, text_tokens)[:, -1]` -> [B, V], with the vocabulary projection applied to the last
    position only: decoding needs no other, and projecting every position of the prefix onto the 49,408 words made
    that projection most of each decoding step (open_clip's `MultimodalTransformer.forward`, its last line cut)."""
    seq_len = text_tokens.shape[1]
    x, context = text_tokens, image_tokens
    if not decoder.batch_first:
        x, context = x.permute(1, 0, 2), context.permute(1, 0, 2)          # NLD -> LND
    for block, cross in zip(decoder.resblocks, decoder.cross_attn):
        x = block(x, attn_mask=decoder.attn_mask[:seq_len, :seq_len])
        x = cross(x, k_x=context, v_x=context)
    last = x[:, -1] if decoder.batch_first else x[-1]                      # [B, W]
    return decoder.ln_final(last) @ decoder.text_projection                # [B, V]


# ---- generation ------------------------------------------------------------------------------------------------
class Captioner:
    """What decoding needs from a model: the image tokens once, then next-token logits for a prefix."""

    def image_context(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def next_logits(self, context: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """context [B, T, W], ids [B, l] (start token first, no padding) -> logits [B, V] of token l + 1."""
        raise NotImplementedError


@dataclass
class PlaitCaptioner(Captioner):
    clip: nn.Module        # plait's open_clip CLIP towers
    decoder: nn.Module     # model.heads["caption"]

    def image_context(self, images):
        return encode_image_tokens(self.clip.visual, images)[1][:, 1:]   # [B, N, W] patch tokens

    def next_logits(self, context, ids):
        tokens = encode_text_tokens(self.clip, ids)[1]                  # [B, l, W]
        return last_logits(self.decoder, context, tokens)               # [B, V]


@dataclass
class CocaCaptioner(Captioner):
    coca: nn.Module        # an open_clip CoCa (an export loaded with open_clip)

    def image_context(self, images):
        return self.coca._encode_image(images)[1]                      # [B, T, W]

    def next_logits(self, context, ids):
        text = self.coca.text
        if text.cls_emb is not None:                                     # CoCa's own text tower slices its mask
            tokens = text(ids)[1]
        else:
            # open_clip 3.3's TextTransformer hands its whole [ctx, ctx] causal mask to a shorter prefix (and fails)
            # unless it has a CLS embedding: the same forward with the mask cut to the prefix
            length = ids.shape[1]
            x = text.token_embedding(ids) + text.positional_embedding[:length]  # [B, l, W]
            x = text.ln_final(text.transformer(x, attn_mask=text.attn_mask[:length, :length]))
            tokens = x                                                  # [B, l, W]
        return last_logits(self.coca.text_decoder, context, tokens)     # [B, V]


def captioner_for(model: nn.Module) -> Captioner:
    """A Captioner over an open_clip CoCa or a PlaitModel trained with objective.caption."""
    if isinstance(model, open_clip.CoCa):
        return CocaCaptioner(model)
    heads = getattr(model, "heads", {})
    if "caption" in heads:
        return PlaitCaptioner(model.clip, heads["caption"])
    raise ValueError(f"a {type(model).__name__} has no text decoder: captions need a model trained with "
                     "objective.caption (exported as open_clip CoCa)")


@torch.no_grad()
def greedy(captioner: Captioner, images: torch.Tensor, max_length: int = 30, min_length: int = 5) -> torch.Tensor:
    """Greedy decoding -> ids [B, l <= max_length] (start first; end of text, then padding 0, once done).

    The same steps as open_clip's `CoCa.generate(generation_type="top_k", top_k=1, seq_len=max_length,
    min_seq_len=min_length)`: no end of text before `min_length` tokens, a forced one at `max_length`."""
    context = captioner.image_context(images)                           # [B, T, W]
    out = torch.full((images.shape[0], 1), SOT_ID, dtype=torch.long, device=images.device)  # [B, 1]
    while True:
        done = (out[:, -1] == EOT_ID) | (out[:, -1] == PAD_ID)          # [B]
        if done.all():
            break
        nxt = torch.full((out.shape[0],), PAD_ID, dtype=torch.long, device=out.device)  # [B]
        logits = captioner.next_logits(context[~done], out[~done])      # [b, V]
        if out.shape[1] < min_length:
            logits[:, EOT_ID] = float("-inf")
        nxt[~done] = EOT_ID if out.shape[1] + 1 == max_length else logits.argmax(dim=-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if out.shape[1] >= max_length:
            break
    return out


@torch.no_grad()
def beam_search(captioner: Captioner, images: torch.Tensor, num_beams: int = 3, max_length: int = 30,
                min_length: int = 5, length_penalty: float = 1.0) -> torch.Tensor:
    """Beam search -> ids [B, l <= max_length]: per image the finished caption with the best
    sum(log p) / length ** length_penalty (length counts the start token, as Hugging Face's scorer does)."""
    B, K = images.shape[0], num_beams
    context = captioner.image_context(images)                           # [B, T, W]
    context = context.repeat_interleave(K, dim=0)                       # [B K, T, W]
    seqs = torch.full((B * K, 1), SOT_ID, dtype=torch.long, device=images.device)  # [B K, 1]
    scores = torch.full((B, K), float("-inf"), device=images.device)
    scores[:, 0] = 0.0                                                  # one live beam to start from
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    for length in range(1, max_length):
        logp = torch.log_softmax(captioner.next_logits(context, seqs).float(), dim=-1)  # [B K, V]
        if length < min_length:
            logp[:, EOT_ID] = float("-inf")
        V = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(B, K * V)              # [B, K V]
        top, index = total.topk(2 * K, dim=1)                           # [B, 2K]
        beam, token = index // V, index % V
        new_seqs, new_scores = [], torch.full((B, K), float("-inf"), device=images.device)
        for b in range(B):
            kept = 0
            for j in range(2 * K):
                prefix = seqs[b * K + beam[b, j]]
                if token[b, j] == EOT_ID or length + 1 == max_length:
                    ended = torch.cat([prefix, torch.tensor([EOT_ID], device=prefix.device)])
                    finished[b].append((float(top[b, j]) / (length + 1) ** length_penalty, ended))
                    continue
                new_seqs.append(torch.cat([prefix, token[b, j:j + 1]]))
                new_scores[b, kept] = top[b, j]
                kept += 1
                if kept == K:
                    break
            while kept < K:                                             # too few live beams: pad with dead ones
                new_seqs.append(torch.cat([seqs[b * K], token.new_zeros(1)]))
                kept += 1
        seqs, scores = torch.stack(new_seqs), new_scores
        if all(len(f) >= K for f in finished):
            best_live = scores.max(dim=1).values / (length + 1) ** length_penalty  # [B]
            if all(max(s for s, _ in f) >= float(best_live[b]) for b, f in enumerate(finished)):
                break
    best = [max(f, key=lambda item: item[0])[1] for f in finished]
    out = torch.full((B, max(len(s) for s in best)), PAD_ID, dtype=torch.long, device=images.device)
    for b, s in enumerate(best):
        out[b, :len(s)] = s
    return out


def decode(ids: torch.Tensor) -> list[str]:
    """Generated ids [B, l] -> caption strings (open_clip's decode, start/end tokens stripped)."""
    tokenizer = open_clip.SimpleTokenizer()
    texts = []
    for row in ids.tolist():
        row = [t for t in row[1:] if t not in (PAD_ID, SOT_ID)]
        row = row[:row.index(EOT_ID)] if EOT_ID in row else row
        texts.append(tokenizer.decode(row).strip())
    return texts
