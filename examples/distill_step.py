"""A small end-to-end use of fastkd's fused loss: distil a random 4-layer BERT classifier into a
2-layer student on random token sequences, with ``fastkd.distill_loss`` on every backend that
runs here, and check each backend's loss against the reference on the same batch.

    python examples/distill_step.py [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

import fastkd
from fastkd.backends import BACKENDS
from fastkd.ops.distill_loss import OP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    ap.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default 2.0)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = dict(vocab_size=1000, hidden_size=64, num_attention_heads=4, intermediate_size=128, num_labels=3)
    teacher = BertForSequenceClassification(BertConfig(num_hidden_layers=4, **cfg)).eval().requires_grad_(False)
    with torch.no_grad():  # a confident random teacher, so there is something to learn
        teacher.classifier.weight.normal_(0.0, 3.0)
    student = BertForSequenceClassification(BertConfig(num_hidden_layers=2, **cfg))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    dev = torch.device("cpu")
    names = [b for b in BACKENDS if OP.usable(b, dev)[0]]
    print(f"fastkd {fastkd.__version__}; backends usable for CPU tensors here: {', '.join(names)}")
    x = torch.randint(0, 1000, (16, 32))
    with torch.no_grad():
        t_logits = teacher(input_ids=x).logits
    s_logits = student(input_ids=x).logits
    ref = fastkd.reference_distill_loss(s_logits.double(), t_logits.double(), temperature=args.temperature)
    for b in names:
        got = fastkd.distill_loss(s_logits, t_logits, temperature=args.temperature, backend=b)
        print(
            f"  backend {b:<6} loss {got.item():.6f}   |error| vs float64 reference {abs(got.item() - ref.item()):.1e}"
        )

    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        x = torch.randint(0, 1000, (32, 32))
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits
        loss = fastkd.distill_loss(student(input_ids=x).logits, t_logits, temperature=args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            agree = (student(input_ids=x).logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item()
            print(
                f"step {step:3d}  KD loss {loss.item():.4f}  agreement with teacher {agree:.0%}  "
                f"({time.perf_counter() - t0:.1f} s)"
            )


if __name__ == "__main__":
    main()
