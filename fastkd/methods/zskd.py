"""``zskd`` — Zero-shot Knowledge Distillation for NLP.

Reference: Ahmad Rashid, Vasileios Lioutas, Abbas Ghaddar, Mehdi Rezagholizadeh. "Towards Zero-Shot
Knowledge Distillation for Natural Language Processing." EMNLP 2021 (arXiv:2012.15495). The token
generator follows the same authors' MATE-KD: Rashid, Lioutas, Rezagholizadeh, "MATE-KD: Masked
Adversarial TExt, a Companion to Knowledge Distillation", ACL 2021 (arXiv:2105.05912).

Sources used here: the papers' abstracts and the method summary in fastkd's issue; the full texts were
not at hand while writing this, so the second list records our choices where they are silent.

What follows the papers
    * The student learns from the teacher's soft outputs only, on out-of-domain (OOD) text and on
      adversarial examples derived from it; no task data is read.
    * Adversarial examples maximise the divergence KL(teacher || student) — the same divergence the
      student minimises — so they probe where the student disagrees with the teacher.
    * Token-level generator (``generator=mlm``, MATE-KD): a fraction (default 0.3) of the OOD
      tokens is masked, a masked-LM generator fills the masks, its output goes through a
      straight-through Gumbel-softmax, and teacher and student receive ``relaxed_one_hot @
      word_embeddings`` at the filled positions, each with its own embedding matrix (the tokenizer
      is shared). The generator is trained to maximise the divergence; generator and student steps
      alternate (default: 10 generator steps at the start of every 100 student steps, MATE-KD's
      n_G / n_S). The student minimises KD on the OOD batch plus KD on its adversarial version.
    * For pair tasks the student sees pairs built from OOD sentences.

What is reconstruction (the papers leave it open, or our setting differs)
    * Generator: MATE-KD uses a pretrained masked LM of the teacher's vocabulary. None ships offline,
      so by default the generator is built from the teacher itself (its embeddings and bottom
      ``generator_layers`` blocks under a masked-LM head whose decoder is tied to the frozen word
      embeddings) and then *trained as a masked LM on the OOD text* before any adversarial step
      (:mod:`fastkd.methods.mlm_generator`: ``pretrain_steps`` steps, 15% masking, the decoder
      bias starting at the log unigram frequencies; cached by a hash of the teacher weights, the
      text and the settings). Its held-out MLM accuracy is reported next to the unigram baseline's
      (always the most frequent word), and a generator below ``min_gen_lift`` times that baseline
      is refused (default 0.5: on text without context, such as random words, a trained generator
      only matches the baseline, within noise). Without the training its fills were spread over
      half the vocabulary, the same top-5 at every position, so the "adversarial" view was
      random-token noise. A real masked LM with the teacher's vocabulary can be passed as
      ``generator_path`` (it is checked the same way).
    * Fill vocabulary: special tokens and placeholders (``[unused12]``, ...) get ``-inf`` logits in
      training and when filling, so they never appear in the adversarial text.
    * The generator's adversarial update minimises ``-KL(teacher || student) + gen_mlm_weight *
      MLM loss`` of the original OOD tokens at the masked positions: the second term keeps it a
      language model of the OOD text while it searches for disagreement (MATE-KD has no such term;
      its tiny generator learning rate plays that role, and a from-scratch generator needs more).
    * Schedule: MATE-KD's ratio of ``gen_steps`` generator updates per ``gen_every`` student steps,
      spread evenly (one update every ``gen_every // gen_steps`` steps), so a short run gets its
      share of updates instead of one burst at step 0. ``gen_lr`` (1e-4) is ours: MATE-KD's 5e-7
      is for a pretrained generator over a far longer run.
    * The loop logs, per log window, the KD loss on the clean (``kd_ood``) and on the adversarial
      view (``kd_adversarial``): the adversarial one should be higher, or the generator is not
      finding disagreement; the generator's own ``gen_divergence`` and ``gen_mlm_loss`` are logged
      at its updates.
    * Class balance of the adversarial view (``adv_balance``, off by default; ours, not the papers'):
      refilled text shifts the teacher's labels (on the movie task it calls token noise negative), and
      a student trained on it learns that lean: more of the negative sentences right, fewer of the
      positive ones, which costs on a test set whose classes are not balanced. ``uniform`` or
      ``clean`` reweights the adversarial rows so the teacher's class mass on them is uniform or the
      clean batch's (:func:`balance_weights`); the logged ``kd_adversarial`` stays the plain mean.
      Measured on the movie dev split (5 seeds, ``benchmarks/results/quality/README.md``): ``clean``
      changes neither accuracy nor the per-class split, ``uniform`` deepens the lean; so it is off.
    * Class-balanced clean rows (``balance=N``, off by default; ours): the clean OOD rows drawn as
      ``ood -O balance=N`` draws them (:class:`fastkd.methods.base.BalancedSampler`). On tweet dev
      with N = 32,768, zskd scores 63.8% (seeds 0-1; ``ood`` with the same balance 67.0%) and with
      ``adv_balance=uniform`` 65.8% (seeds 0-2; ``ood`` 67.5%, ahead of it in 1 of 3): the refills do
      not add to what balancing gives (``benchmarks/results/quality/README.md``, session 11).
    * Candidate refills (``adv_candidates`` = K, ours; 1 is the papers' single draw): each clean row
      gets K refills (each with its own masked positions and sample), teacher and student (eval mode)
      score the K x B rows in one no-grad forward pass each, and the row keeps the refill with the
      largest KL(teacher || student) (:meth:`ZeroShotKD.row_divergence`). Why: with one draw from a
      generator that gets a few dozen updates in a CPU budget, the adversarial view was not more
      divergent than the clean one (movie reviews on Austen, seed 0: 0.258 against 0.267 mean per
      log window, higher in 35% of windows); selecting among draws makes the view adversarial by
      construction, at K extra teacher and student forward passes per step. A search, not a trained
      adversary: the generator's own update is unchanged. Measured with K = 4 (dev, seed 0, session 18,
      tag ``s18-zskd-k4``): the adversarial view is twice as divergent as the clean one in all 40 log
      windows (KD 0.51 against 0.26 on movie reviews, 0.18 against 0.08 on tweets; with one draw 0.26
      against 0.27 and 0.11 against 0.09), but the student is not better: dev 72.0% against 73.3% with one draw
      (``ood`` 71.0%) on movie reviews, 67.9% against 68.1% (``ood`` 69.5%) on tweets, at 3x the time.
      So it stays off: disagreement found on refilled Austen text is not disagreement on the task's.
    * The straight-through estimator: the forward pass uses the hard Gumbel sample (a plain
      embedding lookup, cheaper than the dense ``one_hot @ E``); the backward pass routes the
      gradient through the soft sample (``grad @ E^T``), which is what the straight-through
      Gumbel-softmax computes.
    * The student's adversarial batch uses a hard (sampled) fill: its forward pass is the same as the
      straight-through one, and it does not need the generator's gradient. The hard Gumbel sample is
      a draw from ``softmax(logits)`` (the temperature moves no argmax), so those steps draw it by
      inverting the CDF, one uniform number per filled position (:func:`categorical_sample`),
      instead of a Gumbel number per vocabulary entry.
    * Embedding-space generator (``generator=embedding``): the paper's adversarial stage perturbs
      inputs by gradient ascent on the divergence; here each OOD batch gets ``embed_steps`` ascent
      steps on its word embeddings with :func:`fastkd.embedding_ascent_` (per-token L2-normalised
      steps, projected back into an L2 ball of ``embed_radius`` times the mean word-embedding norm
      around the clean embeddings; [CLS]/[SEP]/padding untouched). The gradient is that of
      :func:`fastkd.distill_loss` with respect to the input embeddings, through the teacher's logits
      (and the student's). The student reads teacher-space embeddings through
      :class:`fastkd.student.EmbeddingBridge`; the steps are projected onto the directions that map
      passes to a narrower student.
    * During generator updates and the ascent the student runs in eval mode (no dropout noise in
      the adversary's signal); its weights get no gradient there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import fastkd
from fastkd.methods.base import BalanceOptions, Method, StepInfo, View, _accepts, ood_sampler, opt


class _StraightThroughEmbed(torch.autograd.Function):
    """Forward: ``E[index]`` (the hard one-hot times E). Backward: gradient to the soft sample
    ``y_soft`` as ``grad @ E^T`` — the straight-through Gumbel-softmax estimator without a dense
    ``[N, V] @ [V, H]`` forward product."""

    @staticmethod
    def forward(ctx, y_soft: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype).T, None, None


def _perturbed(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """``(logits + Gumbel noise) / tau``, the noise drawn from ``generator`` (in place after the draw)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32).to(logits.device)
    gumbel = u.clamp_(1e-10, 1.0 - 1e-7).log_().neg_().log_().neg_()  # -log(-log u)
    return gumbel.add_(logits.float()).div_(tau)


def gumbel_softmax_st(logits: Tensor, tau: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(y_soft, index)``: the relaxed sample and its argmax, with Gumbel noise from ``generator``."""
    y = _perturbed(logits, tau, generator)
    return torch.softmax(y, dim=-1), y.argmax(-1)


def inverse_cdf_sample(probs: Tensor, u: Tensor, block: int = 256) -> Tensor:
    """Row ``i``'s category whose CDF interval of ``probs[i]`` (``[N, V]``, rows summing to about 1,
    entries >= 0) holds ``u[i] * total_i`` (``u`` in [0, 1)): an exact categorical draw.

    Two levels, so no float32 running sum over the whole vocabulary: block masses (float32 sums of
    ``block`` entries) and their float64 running sum pick the block, a float64 running sum inside it
    picks the entry. A zero-probability entry is never returned (the first entry whose running sum
    exceeds the target has mass); where rounding puts the target at the total, the last entry with
    mass is returned.
    """
    N, V = probs.shape
    nb = V // block
    K = nb * block
    mass = probs[:, :K].unflatten(-1, (nb, block)).sum(-1).double()
    if K < V:
        mass = torch.cat([mass, probs[:, K:].sum(-1, keepdim=True).double()], dim=1)
    cm = mass.cumsum(-1)
    target = u.to(device=probs.device, dtype=torch.float64).reshape(N, 1) * cm[:, -1:]
    b = torch.searchsorted(cm, target, right=True)
    b = torch.minimum(b, torch.searchsorted(cm, cm[:, -1:].contiguous(), right=False))
    before = torch.where(b > 0, cm.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(target))
    cols = b * block + torch.arange(block, device=probs.device)
    vals = probs.gather(1, cols.clamp_max(V - 1)).double().masked_fill_(cols >= V, 0.0)
    cv = vals.cumsum(-1)
    j = torch.searchsorted(cv, target - before, right=True)
    j = torch.minimum(j, torch.searchsorted(cv, cv[:, -1:].contiguous(), right=False))
    return (b * block + j).squeeze(1)


def categorical_sample(logits: Tensor, generator: torch.Generator) -> Tensor:
    """The hard sample of :func:`gumbel_softmax_st` without its noise: ``argmax(logits + G)`` is a
    draw from ``softmax(logits)`` whatever the temperature (dividing by tau moves no argmax), so a
    step that does not train the generator draws it by inverting the CDF, one uniform per row from
    ``generator``, instead of ``[N, V]`` Gumbel numbers (4x less time at 400 x 30,522 on CPU). The
    same distribution; not the same draws as the noise would give."""
    probs = torch.softmax(logits.float(), dim=-1)
    u = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64)
    return inverse_cdf_sample(probs, u)


def _mlm_head(model: nn.Module) -> nn.Module | None:
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def build_mlm_generator(teacher: nn.Module, layers: int) -> nn.Module:
    """A masked LM made of the teacher's embeddings and bottom ``layers`` blocks (see module doc)."""
    from transformers import AutoModelForMaskedLM

    from fastkd.student import _remap_layer_key

    cfg = copy.deepcopy(teacher.config)
    n_t = int(cfg.num_hidden_layers)
    layers = max(1, min(layers, n_t))
    cfg.num_hidden_layers = layers
    cfg.tie_word_embeddings = True
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = False
    try:
        gen = AutoModelForMaskedLM.from_config(cfg)
    except ValueError as e:
        raise ValueError(
            f"cannot build a masked-LM generator for a {type(teacher).__name__} teacher ({e}); pass one with "
            "-O generator_path=... or use -O generator=embedding"
        ) from None
    mapping = list(range(layers))
    t_state = teacher.base_model.state_dict()
    with torch.no_grad():
        for key, value in gen.base_model.state_dict().items():
            tkey = _remap_layer_key(key, mapping)
            if tkey is not None and tkey in t_state and t_state[tkey].shape == value.shape:
                value.copy_(t_state[tkey])
        head = _mlm_head(gen)
        if head is not None:
            for mod in head.modules():
                if isinstance(mod, nn.Linear) and mod.weight.shape[0] == mod.weight.shape[1]:
                    mod.weight.copy_(torch.eye(mod.weight.shape[0]))
                    if mod.bias is not None:
                        mod.bias.zero_()
                    break
    gen.tie_weights()
    return gen


def balance_weights(probs: Tensor, target: Tensor, cap: float) -> Tensor:
    """Row weights ``[N]`` (mean 1) that move the class mass ``mean_i p_i`` of ``probs`` ``[N, C]``
    towards ``target`` ``[C]``: ``w_i = sum_c p_i(c) r(c)``, ``r = target / mean_i p_i`` clipped to
    ``[1 / cap, cap]``. With one-hot rows and no clipping the weighted class mass is exactly
    ``target``."""
    mass = probs.mean(0)
    r = (target / mass.clamp_min(1e-12)).clamp(1.0 / cap, cap)
    w = probs @ r
    return w / w.mean().clamp_min(1e-12)


class ZeroShotKD(Method):
    name = "zskd"
    summary = "Zero-shot KD (Rashid et al. 2021): OOD text + adversarial examples maximising KL(teacher||student)"
    needs_ood = True

    @dataclass
    class Options(BalanceOptions):
        generator: str = opt("mlm", "adversarial generator: 'mlm' (token level, MATE-KD) or 'embedding' (ascent)")
        mask_prob: float = opt(0.3, "fraction of OOD tokens the masked-LM generator refills")
        gen_steps: int = opt(10, "generator updates per cycle of gen_every student steps (mlm), spread evenly")
        gen_every: int = opt(100, "student steps per cycle (mlm); 0 never updates the generator")
        gen_lr: float = opt(1e-4, "generator learning rate (Adam)")
        gen_batch: int = opt(0, "rows per generator update; 0 = the student's micro-batch")
        gen_mlm_weight: float = opt(
            1.0, "weight of the masked-LM loss on the OOD tokens in the generator's adversarial update (keeps it an LM)"
        )
        gumbel_tau: float = opt(1.0, "Gumbel-softmax temperature")
        generator_layers: int = opt(2, "teacher blocks the default masked-LM generator is built from")
        generator_path: str | None = opt(None, "a masked LM with the teacher's vocabulary (path or hub id)")
        pretrain_steps: int = opt(300, "masked-LM training steps of the default generator on the OOD text (cached)")
        pretrain_batch: int = opt(32, "rows per masked-LM training step")
        pretrain_lr: float = opt(3e-4, "masked-LM training learning rate (Adam)")
        pretrain_seed: int = opt(
            0, "seed of the masked-LM training and its held-out split (not the run's: one per corpus)"
        )
        min_gen_lift: float = opt(
            0.5, "refuse adversarial training unless held-out MLM accuracy >= this x the unigram baseline's"
        )
        generator_cache: str | None = opt(
            "auto", "folder for trained generators: auto ($FASTKD_CACHE or ~/.cache/fastkd), a path, or none"
        )
        embed_steps: int = opt(1, "gradient-ascent steps per batch (embedding)")
        embed_radius: float = opt(0.15, "L2 ball radius around the clean embeddings, x mean word-embedding norm")
        embed_step_size: float = opt(0.0, "ascent step, x mean word-embedding norm; 0 = 1.25 * radius / steps")
        embed_norm: str = opt("l2", "step normalisation of embedding_ascent_: l2, linf, sign, none")
        ood_weight: float = opt(1.0, "weight of the KD loss on the clean OOD batch")
        adv_weight: float = opt(1.0, "weight of the KD loss on the adversarial batch")
        adv_candidates: int = opt(
            1, "mlm: refills drawn per row; the student trains on the one the teacher and student disagree on most"
        )
        adv_balance: str = opt(
            "none",
            "reweight adversarial rows so the teacher's class mass on them matches: none, uniform, or clean "
            "(the clean OOD batch's)",
        )
        adv_balance_cap: float = opt(5.0, "largest per-class weight adv_balance may give")

        def check(self) -> None:
            self.check_balance("zskd")
            if self.generator not in ("mlm", "embedding"):
                raise ValueError(f"zskd generator must be 'mlm' or 'embedding', got {self.generator!r}")
            if not 0.0 < self.mask_prob <= 1.0:
                raise ValueError(f"mask_prob must be in (0, 1], got {self.mask_prob}")
            if self.gumbel_tau <= 0 or self.gen_lr <= 0 or self.embed_radius <= 0:
                raise ValueError("gumbel_tau, gen_lr and embed_radius must be positive")
            if min(self.gen_steps, self.gen_every, self.gen_batch, self.embed_steps, self.pretrain_steps) < 0:
                raise ValueError("gen_steps, gen_every, gen_batch, embed_steps and pretrain_steps must be >= 0")
            if self.adv_candidates < 1:
                raise ValueError(f"zskd adv_candidates must be >= 1, got {self.adv_candidates}")
            if self.adv_balance not in ("none", "uniform", "clean"):
                raise ValueError(f"zskd adv_balance must be 'none', 'uniform' or 'clean', got {self.adv_balance!r}")
            if not self.adv_balance_cap >= 1.0:
                raise ValueError(f"zskd adv_balance_cap must be >= 1, got {self.adv_balance_cap}")
            if self.pretrain_batch < 1 or self.pretrain_lr <= 0 or self.gen_mlm_weight < 0 or self.min_gen_lift < 0:
                raise ValueError("pretrain_batch >= 1, pretrain_lr > 0, gen_mlm_weight >= 0 and min_gen_lift >= 0")

    def setup(self) -> None:
        ctx = self.ctx
        assert ctx.ood_texts is not None
        self.sampler = ood_sampler(ctx, self.opt.balance, self.opt.balance_cache)
        self.uses_embeddings = self.opt.generator == "embedding"
        self.mask_id = ctx.tokenizer.mask_token_id
        self.generator: nn.Module | None = None
        self.generator_info: dict[str, Any] = {}
        self.gen_interval = 0
        self._clean_prior: Tensor | None = None  # adv_balance=clean: the teacher's class mass on the clean batch
        if self.opt.generator == "mlm":
            if self.mask_id is None:
                raise ValueError("zskd generator=mlm needs a tokenizer with a mask token; use -O generator=embedding")
            from fastkd.methods import mlm_generator as M

            gen_texts = list(ctx.ood_texts)  # single sentences (pair rows are built from these)
            length = min(ctx.max_length, 64)
            if self.opt.generator_path:
                from transformers import AutoModelForMaskedLM

                gen = AutoModelForMaskedLM.from_pretrained(self.opt.generator_path)
                if gen.get_input_embeddings().weight.shape[0] != ctx.teacher.get_input_embeddings().weight.shape[0]:
                    raise ValueError("generator_path: the masked LM's vocabulary differs from the teacher's tokenizer")
                gen.to(ctx.device)
                ban = M.fill_ban_mask(ctx.tokenizer, gen.get_input_embeddings().weight.shape[0])
                train, heldout = M.split_texts(gen_texts, self.opt.pretrain_seed)
                info = M.evaluate_mlm(gen, ctx.tokenizer, heldout, ban, train_texts=train[:5000], max_length=length)
                info["cached"] = False
            else:
                cache = self.opt.generator_cache
                if cache == "auto":
                    from fastkd.assets import cache_dir

                    cache = str(cache_dir())
                elif cache is not None and cache.lower() == "none":
                    cache = None
                gen, info = M.pretrained_generator(
                    lambda: build_mlm_generator(ctx.teacher, self.opt.generator_layers), ctx.tokenizer, gen_texts,
                    steps=self.opt.pretrain_steps, batch_size=self.opt.pretrain_batch, lr=self.opt.pretrain_lr,
                    mask_prob=0.15, max_length=length, seed=self.opt.pretrain_seed, cache=cache, progress=ctx.progress,
                    device=ctx.device,
                )  # fmt: skip
            self.generator_info = info
            need = self.opt.min_gen_lift * info["unigram_accuracy"]
            if info["mlm_accuracy"] < need:
                raise ValueError(
                    f"zskd: the masked-LM generator fills {100 * info['mlm_accuracy']:.1f}% of held-out OOD tokens "
                    f"right, below {self.opt.min_gen_lift} x the unigram baseline's {100 * info['unigram_accuracy']:.1f}%:"
                    " it is not a language model, so its fills would be noise, not adversarial text. Train it longer "
                    "(-O pretrain_steps=N) or give one with -O generator_path=..."
                )
            if ctx.progress:
                import sys

                print(
                    f"[zskd] generator: held-out MLM accuracy {100 * info['mlm_accuracy']:.1f}% (unigram baseline "
                    f"{100 * info['unigram_accuracy']:.1f}%){' (cached)' if info.get('cached') else ''}",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
            self.ban = M.fill_ban_mask(ctx.tokenizer, gen.get_input_embeddings().weight.shape[0]).to(ctx.device)
            gen.get_input_embeddings().weight.requires_grad_(False)
            out_emb = gen.get_output_embeddings()
            if out_emb is not None:
                out_emb.weight.requires_grad_(False)
            gen.to(ctx.device).eval()  # no dropout: the generator's randomness is its sampling
            self.generator = gen
            self.gen_params = [p for p in gen.parameters() if p.requires_grad]
            self.gen_opt = torch.optim.Adam(self.gen_params, lr=self.opt.gen_lr)
            # spread the gen_steps updates of each gen_every-step cycle evenly: one every `interval` steps
            self.gen_interval = max(1, self.opt.gen_every // max(1, self.opt.gen_steps)) if self.opt.gen_steps else 0
        mean_norm = ctx.teacher.get_input_embeddings().weight.detach().float().norm(dim=-1).mean().item()
        self.radius = self.opt.embed_radius * mean_norm
        step = self.opt.embed_step_size * mean_norm
        self.step_size = step if step > 0 else 1.25 * self.radius / max(1, self.opt.embed_steps)

    # ---- token-level (MATE-KD) generator ------------------------------------------------------
    def _mask(self, view: View, generator: torch.Generator) -> Tensor:
        """Positions to refill: a ``mask_prob`` fraction of the real tokens (at least one per row)."""
        content = self.ctx.content_mask(view.input_ids, view.attention_mask)
        u = torch.rand(content.shape, generator=generator).to(content.device)
        pick = content & (u < self.opt.mask_prob)
        # rows where nothing was picked: take their first real token
        empty = ~pick.any(1) & content.any(1)
        if empty.any():
            first = content.float().argmax(1)
            pick[empty, first[empty]] = True
        return pick

    def _fill_logits(self, view: View, pick: Tensor) -> Tensor:
        """Generator logits ``[N, V]`` at the picked positions (inputs there replaced by [MASK])."""
        assert self.generator is not None
        ids = view.input_ids.masked_fill(pick, self.mask_id)
        kw: dict[str, Tensor] = {"input_ids": ids, "attention_mask": view.attention_mask}
        if view.token_type_ids is not None and _accepts(self.generator, "token_type_ids"):
            kw["token_type_ids"] = view.token_type_ids
        head = _mlm_head(self.generator)
        with self.ctx.autocast():
            if head is not None:
                hidden = self.generator.base_model(**kw).last_hidden_state
                logits = head(hidden[pick]).float()
            else:
                logits = self.generator(**kw).logits[pick].float()
        return logits.masked_fill(self.ban, float("-inf"))  # special / placeholder tokens never fill

    def _embeds(self, model: nn.Module, view: View, pick: Tensor, y_soft: Tensor, index: Tensor) -> Tensor:
        weight = model.get_input_embeddings().weight
        base = weight.index_select(0, view.input_ids.reshape(-1)).reshape(*view.input_ids.shape, -1)
        filled = _StraightThroughEmbed.apply(y_soft, index, weight)
        out = base.clone()
        out[pick] = filled.to(out.dtype)
        return out

    def _forward_embeds(self, model: nn.Module, view: View, embeds: Tensor):
        kw: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": view.attention_mask}
        if view.token_type_ids is not None and _accepts(model, "token_type_ids"):
            kw["token_type_ids"] = view.token_type_ids
        with self.ctx.autocast():
            return model(**kw).logits

    def _generator_update(self, generator: torch.Generator, rows: int) -> float:
        ctx = self.ctx
        texts, pairs = self.sampler.random_rows(rows, generator)
        view = ctx.encode_texts(texts, pairs)
        pick = self._mask(view, generator)
        logits = self._fill_logits(view, pick)
        y_soft, index = gumbel_softmax_st(logits, self.opt.gumbel_tau, generator)
        t_logits = self._forward_embeds(ctx.teacher, view, self._embeds(ctx.teacher, view, pick, y_soft, index))
        s_logits = self._forward_embeds(ctx.student, view, self._embeds(ctx.student, view, pick, y_soft, index))
        divergence = ctx.kd(s_logits, t_logits)
        # stay a language model of the OOD text: the masked-LM loss of the original tokens
        mlm = torch.nn.functional.cross_entropy(logits, view.input_ids[pick])
        objective = -divergence + self.opt.gen_mlm_weight * mlm
        grads = torch.autograd.grad(objective, self.gen_params, allow_unused=True)
        for p, g in zip(self.gen_params, grads):
            p.grad = g
        ctx.reduce_grads(self.gen_params)
        self.gen_opt.step()
        self.gen_opt.zero_grad(set_to_none=True)
        return float(divergence.detach()), float(mlm.detach())

    def before_step(self, step: int, generator: torch.Generator) -> dict[str, float]:
        if self.generator is None or self.opt.gen_every == 0 or not self.gen_interval:
            return {}
        if step % self.gen_interval != 0:
            return {}
        rows = self.opt.gen_batch or self.ctx.micro_batch_size
        with self.ctx.student_eval():
            div, mlm = self._generator_update(generator, rows)
        return {"gen_divergence": div, "gen_mlm_loss": mlm}

    @torch.no_grad()
    def _refill(self, view: View, generator: torch.Generator) -> Tensor:
        """``input_ids`` with a fresh ``mask_prob`` share of the real tokens refilled by a generator sample."""
        pick = self._mask(view, generator)
        index = categorical_sample(self._fill_logits(view, pick), generator)
        ids = view.input_ids.clone()
        ids[pick] = index.to(ids.dtype)
        return ids

    @torch.no_grad()
    def row_divergence(self, view: View, candidates: list[Tensor]) -> Tensor:
        """``[K, B]``: the run's divergence KL(teacher || student) per row of each candidate ``input_ids``
        (teacher and student in eval mode, one forward pass each over the ``K * B`` rows)."""
        ctx = self.ctx
        k = len(candidates)
        stacked = View(
            attention_mask=view.attention_mask.repeat(k, 1), input_ids=torch.cat(candidates),
            token_type_ids=None if view.token_type_ids is None else view.token_type_ids.repeat(k, 1),
        )  # fmt: skip
        with ctx.student_eval():
            t = ctx.forward(ctx.teacher, stacked, "teacher").logits
            s = ctx.forward(ctx.student, stacked, "student").logits
        return ctx.kd(s, t, reduction="none").reshape(k, -1)

    @torch.no_grad()
    def _token_adversary(self, view: View, generator: torch.Generator) -> View:
        candidates = [self._refill(view, generator) for _ in range(self.opt.adv_candidates)]
        if len(candidates) == 1:
            ids = candidates[0]
        else:  # keep, per row, the refill the student disagrees with the teacher on most
            best = self.row_divergence(view, candidates).argmax(0)
            ids = torch.stack(candidates)[best, torch.arange(best.numel(), device=best.device)]
        return View(
            attention_mask=view.attention_mask, input_ids=ids, token_type_ids=view.token_type_ids,
            weight=self.opt.adv_weight, name="adversarial",
        )  # fmt: skip

    # ---- embedding-space generator ---------------------------------------------------------------
    def _embedding_adversary(self, view: View) -> View:
        ctx = self.ctx
        ascent = fastkd.embedding_ascent_
        weight = ctx.teacher.get_input_embeddings().weight.detach()
        origin = weight.index_select(0, view.input_ids.reshape(-1)).reshape(*view.input_ids.shape, -1)
        x = origin.clone()
        content = ctx.content_mask(view.input_ids, view.attention_mask)
        adv = View(
            attention_mask=view.attention_mask, input_ids=view.input_ids, teacher_embeds=x, embeds_mask=content,
            token_type_ids=view.token_type_ids, weight=self.opt.adv_weight, name="adversarial",
        )  # fmt: skip
        student = ctx.student
        with ctx.student_eval():
            for _ in range(self.opt.embed_steps):
                x.requires_grad_(True)
                t_logits = ctx.forward(ctx.teacher, adv, "teacher").logits
                s_logits = ctx.forward(student, adv, "student").logits
                (grad,) = torch.autograd.grad(ctx.kd(s_logits, t_logits), x)
                grad = ctx.bridge.visible(grad)  # perturb only what a narrower student receives
                x = x.detach()
                ascent(
                    x, grad, step_size=self.step_size, norm=self.opt.embed_norm, radius=self.radius, origin=origin,
                    mask=content, maximize=True,
                )  # fmt: skip
                adv.teacher_embeds = x
        adv.teacher_embeds = x.detach()
        return adv

    # ---- the student's batch ----------------------------------------------------------------------
    def batch(self, info: StepInfo) -> list[View]:
        texts, pairs = self.sampler.rows(info.offset, info.batch_size)
        clean = self.ctx.encode_texts(texts, pairs)
        clean.name, clean.weight = "ood", self.opt.ood_weight
        if self.opt.generator == "mlm":
            adv = self._token_adversary(clean, info.generator)
        else:
            adv = self._embedding_adversary(clean)
        return [clean, adv]

    def row_weights(self, view: View, teacher_logits: Tensor) -> Tensor | None:
        """``adv_balance``: :func:`balance_weights` of the teacher's softmax on the adversarial rows,
        towards a uniform class mass or the clean batch's (recorded when the loop passes the clean
        view, which :meth:`batch` puts first in the same micro-step)."""
        mode = self.opt.adv_balance
        if mode == "none":
            return None
        probs = torch.softmax(teacher_logits.detach().float(), dim=-1)
        if view.name != "adversarial":
            if view.name == "ood":
                self._clean_prior = probs.mean(0)
            return None
        if mode == "clean":
            target = self._clean_prior
            if target is None:  # not seen a clean batch this micro-step (cannot happen in batch()'s order)
                return None
        else:
            target = torch.full_like(probs[0], 1.0 / probs.shape[-1])
        return balance_weights(probs, target, self.opt.adv_balance_cap)

    def state_dict(self) -> dict[str, Any]:
        if self.generator is None:
            return {}
        names = {id(p): n for n, p in self.generator.named_parameters()}
        return {
            "generator": {names[id(p)]: p.detach() for p in self.gen_params},
            "generator_optimizer": self.gen_opt.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is None or not state:
            return
        params = dict(self.generator.named_parameters())
        with torch.no_grad():
            for name, value in state["generator"].items():
                params[name].copy_(value)
        self.gen_opt.load_state_dict(state["generator_optimizer"])
