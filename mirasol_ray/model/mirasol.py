"""Mirasol3B (Piergiovanni et al. 2023): snippet encoders -> Combiner -> time-aligned model -> text decoder.

A batch is a dict of tensors as in :mod:`mirasol_ray.data.schema`, already on the model's device: B clips, each
with up to K texts (or one text per clip, without the K axis). The audio-video path (snippet encoders, Combiner,
time-aligned model) runs once per clip; the text decoder runs over every text present (:func:`texts_of`), each
cross-attending to its own clip's latents, whose keys/values are computed once per clip (``context_index``).
Tasks: open-ended QA and captioning by :meth:`Mirasol.generate`; multiple choice by :meth:`Mirasol.score_options`;
classification by generating the label text, by scoring every label's text (:meth:`Mirasol.score_candidates`,
``cls_mode: score``) or by :meth:`Mirasol.classify` with ``cls_mode: head``. Each task method runs on every text
of the batch; :meth:`Mirasol.encode` and the ``*_from`` methods let a caller encode the clips once and answer
different texts different ways (evaluation: :func:`mirasol_ray.train.step.predict_batch`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from mirasol_ray.config import ModelConfig
from mirasol_ray.model.av_model import TimeAlignedModel, latent_loss
from mirasol_ray.model.combiner import build_combiner
from mirasol_ray.model.encoders import AudioEncoder, VideoEncoder
from mirasol_ray.model.layers import init_weights
from mirasol_ray.model.text_decoder import TextDecoder

TEXT_KEYS = ("task", "prompt_ids", "prompt_mask", "target_ids", "target_mask", "option_ids", "option_mask",
             "answer_idx", "qtype", "text_index", "text_span")


def texts_of(batch: dict[str, Any]) -> dict[str, Tensor]:
    """The texts present in a batch, flattened: each K-axis column as (n, ...) over the n entries whose
    ``text_mask`` is set (clip by clip, in order), and ``clip`` (n,): the clip (row) each text belongs to. A batch
    without the K axis holds its texts flat, clip by clip, the same number for every clip."""
    if "text_mask" not in batch:  # flat texts, the same number for every clip, clip by clip
        n = batch["prompt_ids"].shape[0]
        clips = batch["video"].shape[0] if "video" in batch else n
        out = {k: batch[k] for k in TEXT_KEYS if k in batch}
        out["clip"] = torch.arange(clips, device=batch["prompt_ids"].device).repeat_interleave(n // clips)
        return out
    clip, slot = batch["text_mask"].nonzero(as_tuple=True)  # (n,), (n,)
    out = {k: batch[k][clip, slot] for k in TEXT_KEYS if k in batch}
    out["clip"] = clip
    return out


class Mirasol(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.video_encoder = VideoEncoder(cfg)
        self.audio_encoder = AudioEncoder(cfg)
        self.combiner = build_combiner(cfg)
        self.av_model = TimeAlignedModel(cfg)
        self.text_decoder = TextDecoder(cfg)
        # the decoder's view of the latents (see _context): snippet deviations normalised, with a time embedding
        self.context_norm = nn.LayerNorm(cfg.dim)
        self.context_time = nn.Embedding(cfg.max_snippets, cfg.dim)
        if cfg.cls_mode == "head":
            self.cls_head = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.num_classes))
        self.apply(init_weights)
        # unit scale, like the normalised deviations it is added to: at 0.02 the decoder cannot tell snippets apart
        nn.init.normal_(self.context_time.weight, std=1.0)

    # ------------------------------------------------------------------------------------------------------------
    # time-aligned path

    def encode_av(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Combiner outputs ``z`` and time-aligned latents ``h``, both (B, S, m, D)."""
        video = self.video_encoder(batch["video"])  # (B, S, Nv, Dv)
        audio = self.audio_encoder(batch["audio"])  # (B, S, Na, Da)
        z = self.combiner(video, audio, batch["audio_present"])
        return {"z": z, "h": self.av_model(z)}

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The audio-video path, once per clip: ``z``, ``h`` (B, S, m, D) and the decoder's ``context``
        (B, (S+1)*m, D) with its ``context_mask``."""
        av = self.encode_av(batch)
        av["context"], av["context_mask"] = self._context(av["h"], batch["snippet_mask"])
        return av

    def _context(self, h: Tensor, snippet_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Latents as the decoder's cross-attention context: (B, (S+1)*m, D) and its mask.

        The clip's m tokens (mean of the valid snippets' latents) come first, then each snippet's deviation from
        them, normalised, plus the snippet's time embedding. The same information as the raw latents, in a better
        basis: in a clip most of a latent's variance is what every snippet shares (scene, background: 93% at
        initialisation on the synthetic data), which buries what changes from snippet to snippet, and a
        question about *when* ("the second shape", "during the high tone") cannot be learnt while the decoder
        sees it through that. Measured: with the raw latents a decoder never learnt to pick a snippet by its
        ordinal in 3,000 steps; with this context it did in 500 (docs/HISTORY.md, "The demo").
        """
        B, S, m, _ = h.shape
        clip = self._clip_tokens(h, snippet_mask)  # (B, 1, m, D)
        snippets = self.context_norm(h - clip) + self.context_time.weight[:S, None]  # (B, S, m, D)
        context = torch.cat([clip[:, 0], rearrange(snippets, "b s m d -> b (s m) d")], dim=1)
        mask = torch.cat([snippet_mask.new_ones(B, m), repeat(snippet_mask, "b s -> b (s m)", m=m)], dim=1)
        return context, mask

    @staticmethod
    def _clip_tokens(h: Tensor, snippet_mask: Tensor) -> Tensor:
        """Mean over the valid snippets, token by token: (B, S, m, D) -> (B, 1, m, D)."""
        w = snippet_mask.to(h.dtype)[:, :, None, None]  # (B, S, 1, 1)
        return (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)

    @staticmethod
    def text_context_mask(enc: dict[str, Tensor], clip: Tensor, span: Tensor | None) -> Tensor | None:
        """Each text's view of its clip's context, (n, (S+1)*m), for texts about some snippets only (``span``
        (n, S), :data:`~mirasol_ray.data.schema` ``text_span``); None when ``span`` is None (every text reads its
        whole clip). A text whose span leaves out a valid snippet reads those snippets' tokens alone: not the clip
        tokens, which average every snippet (so a timestamped caption's loss reaches the snippets it describes)."""
        if span is None:
            return None
        context_mask = enc["context_mask"][clip]  # (n, (S+1)*m)
        span = span.bool()
        n, S = span.shape
        m = context_mask.shape[1] // (S + 1)
        valid = context_mask[:, m:].view(n, S, m)[..., 0]  # (n, S) the clip's valid snippets
        whole = (span | ~valid).all(1, keepdim=True)  # (n, 1)
        keep = torch.cat([whole.expand(n, m), repeat(span, "n s -> n (s m)", m=m)], dim=1)
        return context_mask & keep

    def _pooled(self, h: Tensor, snippet_mask: Tensor) -> Tensor:
        """Mean of the latents of valid snippets: (B, D)."""
        return self._clip_tokens(h, snippet_mask).mean(2)[:, 0]

    # ------------------------------------------------------------------------------------------------------------
    # text path

    def _target_logits(self, context: Tensor, context_mask: Tensor, prompt_ids: Tensor, prompt_mask: Tensor,
                       target_ids: Tensor, target_mask: Tensor, clip: Tensor | None = None,
                       text_mask: Tensor | None = None) -> Tensor:
        """Logits (n, Lt-1, V) predicting target[1:] from the prompt and target[:i+1], for n texts whose clips
        are ``clip`` (n,) rows of ``context`` (None: row i is text i's); ``text_mask`` (n, N): each text's own
        view of its context (:meth:`text_context_mask`)."""
        seq = torch.cat([prompt_ids, target_ids], dim=1).long()
        valid = torch.cat([prompt_mask, target_mask], dim=1)
        h = self.text_decoder(seq, valid, context, context_mask, context_index=clip,
                              text_context_mask=text_mask)  # (n, Lp + Lt, Dt)
        return self.text_decoder.logits(h[:, prompt_ids.shape[1]:-1]).float()

    def text_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits (n, Lt-1, V) of target[1:] of every text present, given its clip, its prompt and its prefix."""
        enc, t = self.encode(batch), texts_of(batch)
        return self._target_logits(enc["context"], enc["context_mask"], t["prompt_ids"], t["prompt_mask"],
                                   t["target_ids"], t["target_mask"], t["clip"],
                                   self.text_context_mask(enc, t["clip"], t.get("text_span")))

    # ------------------------------------------------------------------------------------------------------------
    # training

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """{"loss": weighted sum, "losses": {"text", "latent"[, "cls"]}}.

        The clips are encoded once; the text loss is the cross-entropy of every target token of every text
        present, summed and divided by their count (the same weighting as when each text was a row of its own:
        each target token weighs the same, so a clip weighs by its texts' tokens). The latent and head losses are
        per clip."""
        cfg = self.config
        enc = self.encode(batch)
        snippet_mask = batch["snippet_mask"]
        t = texts_of(batch)
        logits = self._target_logits(enc["context"], enc["context_mask"], t["prompt_ids"], t["prompt_mask"],
                                     t["target_ids"], t["target_mask"], t["clip"],
                                     self.text_context_mask(enc, t["clip"], t.get("text_span")))
        labels = t["target_ids"][:, 1:].long().masked_fill(~t["target_mask"][:, 1:], -100)
        losses = {
            # sum / count rather than mean: a batch with no target tokens gives 0, not NaN
            "text": F.cross_entropy(rearrange(logits, "n l v -> (n l) v"), labels.flatten(), ignore_index=-100,
                                    reduction="sum") / (labels >= 0).sum().clamp(min=1),
            "latent": latent_loss(self.av_model.predict_next(enc["h"]), enc["z"], snippet_mask, cfg.latent_loss),
        }
        loss = losses["text"] + cfg.latent_loss_weight * losses["latent"]
        if cfg.cls_mode == "head":
            cls_logits = self.cls_head(self._pooled(enc["h"], snippet_mask)).float()
            has_label = batch["label"] >= 0
            if bool(has_label.any()):
                losses["cls"] = F.cross_entropy(cls_logits[has_label], batch["label"][has_label])
                loss = loss + cfg.cls_loss_weight * losses["cls"]
            else:  # the head stays in the graph: data-parallel ranks must all reduce the same gradients
                loss = loss + 0.0 * cls_logits.sum()
        return {"loss": loss, "losses": losses}

    # ------------------------------------------------------------------------------------------------------------
    # tasks: on every text of a batch, or (the *_from methods) on given texts of clips encoded once

    @torch.no_grad()
    def classify(self, batch: dict[str, Tensor]) -> Tensor:
        """Class logits (B, num_classes), one row per clip, from the linear head on pooled latents
        (``cls_mode: head``)."""
        return self.classify_from(self.encode(batch), batch["snippet_mask"])

    @torch.no_grad()
    def classify_from(self, enc: dict[str, Tensor], snippet_mask: Tensor) -> Tensor:
        if self.config.cls_mode != "head":
            raise ValueError("classify() needs model.cls_mode 'head'; with 'generate', generate the label text")
        return self.cls_head(self._pooled(enc["h"], snippet_mask)).float()

    @torch.no_grad()
    def score_options(self, batch: dict[str, Tensor]) -> Tensor:
        """Summed log-likelihood (n, O) of each option (formatted like a target) of every text present; -inf for
        absent options. With ``score_length_norm`` the sum is divided by the option's token count (EOS
        included)."""
        enc, t = self.encode(batch), texts_of(batch)
        return self.score_options_from(enc, t["prompt_ids"], t["prompt_mask"], t["option_ids"], t["option_mask"],
                                       t["clip"], t.get("text_span"))

    @torch.no_grad()
    def score_options_from(self, enc: dict[str, Tensor], prompt_ids: Tensor, prompt_mask: Tensor,
                           option_ids: Tensor, option_mask: Tensor, clip: Tensor, span: Tensor | None = None
                           ) -> Tensor:
        score = self._score_targets(enc["context"], enc["context_mask"], prompt_ids, prompt_mask, option_ids,
                                    option_mask, clip, self.text_context_mask(enc, clip, span))
        return score.masked_fill(~option_mask[..., 0], float("-inf"))

    @torch.no_grad()
    def score_candidates(self, batch: dict[str, Tensor], cand_ids: Tensor, cand_mask: Tensor, chunk: int = 64
                         ) -> Tensor:
        """Log-likelihood (n, N) of every candidate text (N, Lt) for every text present (its prompt, its clip):
        classification by scoring the whole label set (``cls_mode: score``)."""
        enc, t = self.encode(batch), texts_of(batch)
        return self.score_candidates_from(enc, t["prompt_ids"], t["prompt_mask"], t["clip"], cand_ids, cand_mask,
                                          chunk, t.get("text_span"))

    @torch.no_grad()
    def score_candidates_from(self, enc: dict[str, Tensor], prompt_ids: Tensor, prompt_mask: Tensor, clip: Tensor,
                              cand_ids: Tensor, cand_mask: Tensor, chunk: int = 64, span: Tensor | None = None
                              ) -> Tensor:
        """The same N candidates for each of n texts; they go through the decoder ``chunk`` at a time (memory
        grows with n x chunk)."""
        n = prompt_ids.shape[0]
        text_mask = self.text_context_mask(enc, clip, span)
        scores = []
        for i in range(0, cand_ids.shape[0], chunk):
            ids, mask = cand_ids[i:i + chunk], cand_mask[i:i + chunk]
            scores.append(self._score_targets(enc["context"], enc["context_mask"], prompt_ids, prompt_mask,
                                              repeat(ids, "c l -> n c l", n=n), repeat(mask, "c l -> n c l", n=n),
                                              clip, text_mask))
        return torch.cat(scores, dim=1) if scores else enc["context"].new_zeros(n, 0)

    def _score_targets(self, context: Tensor, context_mask: Tensor, prompt_ids: Tensor, prompt_mask: Tensor,
                       target_ids: Tensor, target_mask: Tensor, clip: Tensor, text_mask: Tensor | None = None
                       ) -> Tensor:
        """Summed (or length-normalised) log-likelihood (n, K) of K targets (n, K, Lt) per text."""
        K = target_ids.shape[1]
        k_times = "n ... -> (n k) ..."
        flat_ids = rearrange(target_ids, "n k l -> (n k) l")
        logits = self._target_logits(
            context, context_mask, repeat(prompt_ids, k_times, k=K), repeat(prompt_mask, k_times, k=K),
            flat_ids, rearrange(target_mask, "n k l -> (n k) l"), clip.repeat_interleave(K),
            None if text_mask is None else text_mask.repeat_interleave(K, dim=0))
        logp = logits.log_softmax(-1).gather(-1, flat_ids[:, 1:, None].long())
        mask = rearrange(target_mask[..., 1:], "n k l -> (n k) l")
        score = (logp[..., 0] * mask).sum(1)
        if self.config.score_length_norm:
            score = score / mask.sum(1).clamp(min=1)
        return rearrange(score, "(n k) -> n k", k=K)

    @torch.no_grad()
    def generate(self, batch: dict[str, Tensor], max_new_tokens: int = 32, beam_size: int = 1,
                 use_cache: bool = True) -> Tensor:
        """Token ids (n, L) generated after BOS for every text present, from its clip and its prompt: EOS
        included, PAD after it.

        Greedy for ``beam_size == 1``, else beam search ranked by summed log-probability (no length penalty). At
        most ``max_new_tokens``, and never past ``max_text_len`` positions.
        """
        enc, t = self.encode(batch), texts_of(batch)
        return self.generate_from(enc, t["prompt_ids"], t["prompt_mask"], t["clip"], max_new_tokens, beam_size,
                                  use_cache, t.get("text_span"))

    @torch.no_grad()
    def generate_from(self, enc: dict[str, Tensor], prompt_ids: Tensor, prompt_mask: Tensor, clip: Tensor,
                      max_new_tokens: int = 32, beam_size: int = 1, use_cache: bool = True,
                      span: Tensor | None = None) -> Tensor:
        state, steps = self.start_decoding(enc, prompt_ids, prompt_mask, clip, max_new_tokens, beam_size, use_cache,
                                           span)
        cfg = self.config
        if beam_size == 1:
            return greedy_search(state, steps, cfg.pad_id, cfg.eos_id)
        return beam_search(state, steps, beam_size, cfg.pad_id, cfg.eos_id)

    def start_decoding(self, enc: dict[str, Tensor], prompt_ids: Tensor, prompt_mask: Tensor, clip: Tensor,
                       max_new_tokens: int, beam_size: int = 1, use_cache: bool = True,
                       span: Tensor | None = None) -> tuple[Decoding, int]:
        """The prompt + BOS of each text (each repeated ``beam_size`` times) over its encoded clip (the snippets
        of ``span`` alone, :meth:`text_context_mask`), and the steps left."""
        cfg = self.config
        n = prompt_mask.shape[0]
        bos = torch.full((n, 1), cfg.bos_id, dtype=torch.long, device=prompt_mask.device)
        seq = torch.cat([prompt_ids.long(), bos], dim=1)
        valid = torch.cat([prompt_mask, prompt_mask.new_ones(n, 1)], dim=1)
        steps = min(max_new_tokens, cfg.max_text_len - int(valid.sum(1).max())) if n else 0
        k_times = "n ... -> (n k) ..."
        text_mask = self.text_context_mask(enc, clip, span)
        return Decoding(self.text_decoder, enc["context"], enc["context_mask"],
                        repeat(seq, k_times, k=beam_size), repeat(valid, k_times, k=beam_size), use_cache,
                        clip.repeat_interleave(beam_size),
                        None if text_mask is None else text_mask.repeat_interleave(beam_size, dim=0)), steps


def greedy_search(state: Decoding, steps: int, pad_id: int, eos_id: int) -> Tensor:
    """(B, L <= steps): the most likely token at each step; a row is PAD after its EOS; stops when all ended."""
    B = state.seq.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=state.seq.device)
    out = []
    for _ in range(steps):
        tok = state.next_logprobs().argmax(-1).masked_fill(done, pad_id)  # (B,)
        out.append(tok)
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
        state.append(tok)
    return torch.stack(out, 1) if out else state.seq.new_zeros(B, 0)


def beam_search(state: Decoding, steps: int, beam_size: int, pad_id: int, eos_id: int) -> Tensor:
    """(B, L <= steps): the beam with the highest summed log-probability. ``state`` holds B * beam_size rows."""
    K = beam_size
    B = state.seq.shape[0] // K
    device = state.seq.device
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: keep one until the first expansion
    done = torch.zeros(B, K, dtype=torch.bool, device=device)
    tokens = torch.zeros(B, K, 0, dtype=torch.long, device=device)
    for _ in range(steps):
        logp = rearrange(state.next_logprobs(), "(b k) v -> b k v", k=K)
        V = logp.shape[-1]
        # a finished beam continues with PAD only, at no cost, so it stays one candidate
        pad_only = torch.full((V,), float("-inf"), device=device)
        pad_only[pad_id] = 0.0
        logp = torch.where(done[..., None], pad_only, logp)
        scores, flat = (scores[..., None] + logp).view(B, K * V).topk(K, dim=-1)  # (B, K)
        parent, tok = flat // V, flat % V
        tokens = torch.cat([tokens.gather(1, repeat(parent, "b k -> b k l", l=tokens.shape[2])), tok[..., None]], 2)
        done = done.gather(1, parent) | (tok == eos_id)
        if bool(done.all()):
            break
        state.reorder((parent + torch.arange(B, device=device)[:, None] * K).flatten())
        state.append(tok.flatten())
    return tokens[torch.arange(B, device=device), scores.argmax(-1)]


class Decoding:
    """Sequences being decoded, with the decoder's key/value cache or by recomputing the whole prefix. Sequence i
    reads context row ``clip[i]``."""

    def __init__(self, decoder: TextDecoder, context: Tensor, context_mask: Tensor, seq: Tensor, valid: Tensor,
                 use_cache: bool, clip: Tensor | None = None, text_mask: Tensor | None = None):
        self.decoder, self.context, self.context_mask, self.clip = decoder, context, context_mask, clip
        self.text_mask = text_mask  # (N, context length): each sequence's own view of its context, or None
        self.seq, self.valid = seq, valid  # (N, L)
        self.cache = decoder.new_cache() if use_cache else None
        self.unseen = seq  # tokens the cache has not processed yet

    def next_logprobs(self) -> Tensor:
        """(N, V) log-probabilities of the next token."""
        ids = self.seq if self.cache is None else self.unseen
        h = self.decoder(ids, self.valid, self.context, self.context_mask, self.cache, context_index=self.clip,
                         text_context_mask=self.text_mask)
        return self.decoder.logits(h[:, -1]).float().log_softmax(-1)

    def append(self, tok: Tensor) -> None:
        self.seq = torch.cat([self.seq, tok[:, None]], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(tok.shape[0], 1)], dim=1)
        self.unseen = tok[:, None]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search); the cache's self-attention keys/values follow."""
        self.seq, self.valid = self.seq[index], self.valid[index]
        if self.text_mask is not None:
            self.text_mask = self.text_mask[index]
        if self.cache is not None:
            for layer in self.cache:
                layer["self"] = {name: t[index] for name, t in layer["self"].items()}


# ----------------------------------------------------------------------------------------------------------------
# building, sizes


def build_model(cfg: ModelConfig | dict[str, Any]) -> Mirasol:
    """A model from a :class:`ModelConfig` or its dict form (as stored in a checkpoint)."""
    return Mirasol(cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg))


def param_breakdown(cfg: ModelConfig | dict[str, Any]) -> dict[str, int]:
    """Parameters per component and "total", counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(cfg)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
