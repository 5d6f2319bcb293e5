"""The masked-LM generator of ``zskd``: built from the teacher, trained as a masked LM on the OOD text.

MATE-KD (the generator zskd follows) uses a *pretrained* masked LM of the teacher's vocabulary. None
ships offline, so :func:`pretrained_generator` makes one: the teacher's embeddings and bottom blocks
under a masked-LM head (decoder tied to the frozen word embeddings, transform starting as the
identity; :func:`fastkd.methods.zskd.build_mlm_generator`), then trained as a masked LM on the
out-of-domain text the run distils on, so that its fills are plausible words in context before the
adversarial training starts. Everything here is ours (reconstruction), not from the papers:

* masking: ``mask_prob`` (default 0.15, BERT's rate) of the real tokens of each row, at least one,
  all replaced by ``[MASK]`` (the generator only ever sees ``[MASK]`` at the positions it fills);
* loss: cross-entropy of the original token at the masked positions, over the *fill vocabulary*:
  special tokens and placeholder tokens (``[unused12]``, ``<extra_id_3>``, ...) are excluded from
  the softmax (their logits are ``-inf``), in training and when filling, so they never appear;
* start: the decoder bias is set to the log unigram frequencies of the training text, so the
  generator starts at the unigram baseline and the training adds the context;
* trained: the blocks, position / segment embeddings, layer norms and the head transform and bias;
  the word embeddings (tied to the decoder) stay the teacher's;
* held-out check: 512 OOD sentences set aside by a seeded permutation; the report gives the top-1
  accuracy of the masked tokens there, and that of the *unigram baseline* (always the most frequent
  training token), which a generator that learnt nothing cannot beat;
* cache: the trained generator is saved under ``<cache>/generators/mlm-<hash>/`` where the hash
  covers the teacher weights it was built from, the OOD text and the settings, so each teacher and
  corpus trains it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HELDOUT = 512
_PLACEHOLDER = re.compile(r"^(\[unused\d+\]|<unused\d+>|<extra_id_\d+>|\[.*\]|<.*>)$")


def fill_ban_mask(tokenizer: Any, vocab_size: int) -> Tensor:
    """``[V]`` bool: True for ids a fill may never be (special tokens and placeholders like ``[unused7]``)."""
    ban = torch.zeros(vocab_size, dtype=torch.bool)
    for i in tokenizer.all_special_ids or []:
        if i is not None and 0 <= int(i) < vocab_size:
            ban[int(i)] = True
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token, i in vocab.items():
        if 0 <= i < vocab_size and _PLACEHOLDER.match(token):
            ban[i] = True
    if len(vocab) < vocab_size:  # rows of the embedding matrix that no token maps to
        known = torch.zeros(vocab_size, dtype=torch.bool)
        known[torch.tensor([i for i in vocab.values() if 0 <= i < vocab_size], dtype=torch.long)] = True
        ban |= ~known
    return ban


def mask_positions(content: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """A ``prob`` fraction of the True positions of ``content`` ``[B, T]``, at least one per non-empty row."""
    u = torch.rand(content.shape, generator=generator).to(content.device)
    pick = content & (u < prob)
    empty = ~pick.any(1) & content.any(1)
    if empty.any():
        # a random real token of each empty row
        score = torch.rand(content.shape, generator=generator).to(content.device).masked_fill(~content, -1.0)
        first = score.argmax(1)
        pick[empty, first[empty]] = True
    return pick


def _head(model: nn.Module) -> nn.Module | None:
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def masked_logits(
    gen: nn.Module, input_ids: Tensor, attention_mask: Tensor, pick: Tensor, mask_id: int, ban: Tensor,
    token_type_ids: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Fill logits ``[N, V]`` (float32) at the ``pick`` positions, with those inputs replaced by ``[MASK]``.

    Banned ids get ``-inf``. The head runs on the picked positions only (the decoder is ``H x V``).
    """
    ids = input_ids.masked_fill(pick, mask_id)
    kw: dict[str, Tensor] = {"input_ids": ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kw["token_type_ids"] = token_type_ids
    head = _head(gen)
    if head is not None:
        hidden = gen.base_model(**kw).last_hidden_state
        logits = head(hidden[pick]).float()
    else:
        logits = gen(**kw).logits[pick].float()
    return logits.masked_fill(ban.to(logits.device), float("-inf"))


def _content(tokenizer: Any, enc: dict[str, Tensor]) -> Tensor:
    special = torch.tensor(sorted({int(i) for i in tokenizer.all_special_ids or [] if i is not None}))
    ids = enc["input_ids"]
    return enc["attention_mask"].bool() & ~torch.isin(ids, special.to(ids.device))


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device) -> dict[str, Tensor]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def split_texts(texts: Sequence[str], seed: int, heldout: int = HELDOUT) -> tuple[list[str], list[str]]:
    """``(train, heldout)``: a seeded permutation; ``heldout`` texts (at most a fifth of them) set aside."""
    n_out = min(heldout, len(texts) // 5)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [texts[i] for i in order[n_out:]], [texts[i] for i in order[:n_out]]


@torch.no_grad()
def evaluate_mlm(
    gen: nn.Module, tokenizer: Any, texts: Sequence[str], ban: Tensor, *, train_texts: Sequence[str] = (),
    mask_prob: float = 0.15, max_length: int = 64, batch_size: int = 64, seed: int = 0,
) -> dict[str, float]:  # fmt: skip
    """Held-out masked-LM top-1 accuracy and loss, and the unigram baseline's accuracy on the same positions.

    The unigram baseline always answers the most frequent allowed token of ``train_texts`` (of
    ``texts`` when none are given).
    """
    was = gen.training
    gen.eval()
    counts = unigram_counts(tokenizer, train_texts or texts, ban.shape[0], max_length)
    counts[ban] = -1
    top = int(counts.argmax())
    g = torch.Generator().manual_seed(seed)
    right = base = n = 0
    loss = 0.0
    # small held-out sets: several masking passes (up to 20, until 1,000 positions) for a stable estimate
    passes = 0
    while passes == 0 or (n < 1000 and passes < 20):
        passes += 1
        right, base, n, loss = _mlm_pass(gen, tokenizer, texts, ban, g, top, mask_prob, max_length, batch_size,
                                         (right, base, n, loss))  # fmt: skip
    gen.train(was)
    n = max(n, 1)
    return {"mlm_accuracy": right / n, "mlm_loss": loss / n, "unigram_accuracy": base / n, "positions": n}


def _mlm_pass(gen, tokenizer, texts, ban, g, top, mask_prob, max_length, batch_size, acc):
    device = next(gen.parameters()).device
    right, base, n, loss = acc
    for i in range(0, len(texts), batch_size):
        enc = _encode(tokenizer, texts[i : i + batch_size], max_length, device)
        pick = mask_positions(_content(tokenizer, enc), mask_prob, g)
        if not pick.any():
            continue
        logits = masked_logits(gen, enc["input_ids"], enc["attention_mask"], pick, tokenizer.mask_token_id, ban,
                               enc.get("token_type_ids"))  # fmt: skip
        gold = enc["input_ids"][pick]
        right += int((logits.argmax(-1) == gold).sum())
        base += int((gold == top).sum())
        loss += float(F.cross_entropy(logits, gold, reduction="sum"))
        n += int(gold.numel())
    return right, base, n, loss


def train_mlm(
    gen: nn.Module, tokenizer: Any, texts: Sequence[str], ban: Tensor, *, steps: int, batch_size: int = 32,
    lr: float = 3e-4, mask_prob: float = 0.15, max_length: int = 64, seed: int = 0, progress: bool = False,
) -> list[dict[str, float]]:  # fmt: skip
    """Train ``gen``'s trainable parameters as a masked LM on ``texts`` (Adam, linear warm-up 10% then decay).

    Returns the loss history (one record every 25 steps).
    """
    device = next(gen.parameters()).device
    params = [p for p in gen.parameters() if p.requires_grad]
    if not params or steps <= 0:
        return []
    opt = torch.optim.Adam(params, lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    g = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="zskd generator: masked-LM training", unit="step", file=sys.stderr, leave=False)
    gen.train()
    history, running = [], 0.0
    for step in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=g).tolist()
        enc = _encode(tokenizer, [texts[i] for i in idx], max_length, device)
        pick = mask_positions(_content(tokenizer, enc), mask_prob, g)
        logits = masked_logits(gen, enc["input_ids"], enc["attention_mask"], pick, tokenizer.mask_token_id, ban,
                               enc.get("token_type_ids"))  # fmt: skip
        loss = F.cross_entropy(logits, enc["input_ids"][pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            k = (step % 25) + 1
            history.append({"step": step + 1, "loss": running / k})
            running = 0.0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    if bar is not None:
        bar.close()
    gen.eval()
    return history


def unigram_counts(tokenizer: Any, texts: Sequence[str], vocab_size: int, max_length: int = 64) -> Tensor:
    """``[V]`` counts of the real (non-special) tokens of ``texts``."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(0, len(texts), 256):
        enc = _encode(tokenizer, texts[i : i + 256], max_length, torch.device("cpu"))
        ids = enc["input_ids"][_content(tokenizer, enc)]
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


@torch.no_grad()
def init_unigram_bias(gen: nn.Module, tokenizer: Any, texts: Sequence[str], ban: Tensor, max_length: int) -> bool:
    """Set the decoder bias to the log unigram frequencies of ``texts`` (add-one smoothed), so the
    generator starts at the unigram baseline and training adds context. False when there is no bias."""
    out = gen.get_output_embeddings()
    bias = getattr(out, "bias", None) if out is not None else None
    if bias is None:
        return False
    counts = unigram_counts(tokenizer, texts, bias.shape[0], max_length).double() + 1.0
    logp = (counts / counts.sum()).log()
    logp[ban[: bias.shape[0]].to(logp.device)] = logp.min()
    bias.copy_((logp - logp.mean()).to(bias.dtype))
    return True


def _fingerprint(gen: nn.Module, texts: Sequence[str], settings: dict[str, Any]) -> str:
    from fastkd.methods.base import hash_weights

    h = hashlib.sha256()
    hash_weights(h, gen)
    for t in texts:
        h.update(t.encode("utf-8", "replace") + b"\n")
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def pretrained_generator(
    build: Any, tokenizer: Any, texts: Sequence[str], *, steps: int, batch_size: int, lr: float, mask_prob: float,
    max_length: int, seed: int, cache: str | os.PathLike | None, progress: bool, device: torch.device,
) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Build the generator (``build()``), train it as a masked LM on ``texts`` (or reuse the cached one).

    Returns ``(generator, info)``: info holds the held-out accuracy, the unigram baseline, the
    training time and whether the cache was used.
    """
    from transformers import AutoModelForMaskedLM

    gen = build()
    gen.get_input_embeddings().weight.requires_grad_(False)
    out_emb = gen.get_output_embeddings()
    if out_emb is not None:
        out_emb.weight.requires_grad_(False)
    ban = fill_ban_mask(tokenizer, gen.get_input_embeddings().weight.shape[0])
    train, heldout = split_texts(texts, seed)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "mask_prob": mask_prob,
                "max_length": max_length, "seed": seed, "version": 2}  # fmt: skip
    folder = None
    if cache is not None:
        folder = Path(cache) / "generators" / f"mlm-{_fingerprint(gen, texts, settings)}"
        info_path = folder / "generator.json"
        if info_path.is_file() and (folder / "config.json").is_file():
            try:
                cached = AutoModelForMaskedLM.from_pretrained(str(folder))
                info = json.loads(info_path.read_text())
                info["cached"] = True
                info["path"] = str(folder)
                gen = cached.to(device)
                gen.get_input_embeddings().weight.requires_grad_(False)
                if gen.get_output_embeddings() is not None:
                    gen.get_output_embeddings().weight.requires_grad_(False)
                gen.eval()
                return gen, info
            except (OSError, ValueError, json.JSONDecodeError):
                pass  # a broken cache entry: train again
    gen.to(device)
    t0 = time.perf_counter()
    init_unigram_bias(gen, tokenizer, train[:20000], ban, max_length)
    before = evaluate_mlm(gen, tokenizer, heldout, ban, train_texts=train[:5000], max_length=max_length, seed=seed)
    history = train_mlm(gen, tokenizer, train, ban, steps=steps, batch_size=batch_size, lr=lr, mask_prob=mask_prob,
                        max_length=max_length, seed=seed, progress=progress)  # fmt: skip
    after = evaluate_mlm(gen, tokenizer, heldout, ban, train_texts=train[:5000], max_length=max_length, seed=seed)
    info = {
        **after, "before_training": before, "train_time_s": round(time.perf_counter() - t0, 1),
        "history": history, "settings": settings, "train_texts": len(train), "heldout_texts": len(heldout),
        "banned_ids": int(ban.sum()), "cached": False,
    }  # fmt: skip
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            gen.save_pretrained(str(folder))
            (folder / "generator.json").write_text(json.dumps(info, indent=1))
            info["path"] = str(folder)
        except OSError:
            pass  # caching is an optimisation
    gen.eval()
    return gen, info
