"""Distil a small language model from a bigger one with kdkernels, on a synthetic task.

The data is a random "additive trigram" language: the next token's logits are A[x(t-1)] +
B[x(t-2)] for two fixed random tables, so a model needs both previous tokens and the right
answer is a distribution, not one token (which is what makes soft targets worth having).
The teacher, a Bengio-style MLP language model, first learns the language from hard labels;
then a student with 2.5x fewer parameters (and a narrower embedding) learns from the
teacher's softened distribution plus a little of the hard labels. No downloads; about 10 s
on a laptop CPU.

    python examples/distill.py [--steps 300] [--device cpu|cuda] [--impl auto|torch|triton|ext]

The one line that changes in a distillation loop is the loss: where the script would have
written F.kl_div on temperature-softened log-probabilities (see `train_student`), it calls
kd.KDLoss, which computes the same number without building the probability tensors.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels as kd


class TrigramLanguage:
    """Sequences where P(x_t | x_{t-1}, x_{t-2}) = softmax(A[x_{t-1}] + B[x_{t-2}])."""

    def __init__(self, vocab: int, sharpness: float, generator: torch.Generator):
        self.vocab = vocab
        self.a = torch.randn(vocab, vocab, generator=generator) * sharpness
        self.b = torch.randn(vocab, vocab, generator=generator) * sharpness
        self.g = generator

    def sample(self, batch: int, length: int) -> torch.Tensor:
        x = torch.randint(self.vocab, (batch, 2), generator=self.g)
        cols = [x[:, 0], x[:, 1]]
        for _ in range(length - 2):
            probs = torch.softmax(self.a[cols[-1]] + self.b[cols[-2]], -1)
            cols.append(torch.multinomial(probs, 1, generator=self.g)[:, 0])
        return torch.stack(cols, 1)  # (batch, length)

    def entropy(self, tokens: torch.Tensor) -> float:
        """Mean entropy (nats) of the true next-token distribution: the best achievable CE."""
        logits = self.a[tokens[:, 1:-1]] + self.b[tokens[:, :-2]]
        logp = torch.log_softmax(logits, -1)
        return float(-(logp.exp() * logp).sum(-1).mean())


class MLPLanguageModel(nn.Module):
    """Embeds the previous `context` tokens, concatenates, MLP -> next-token logits."""

    def __init__(self, vocab: int, context: int, dim: int, hidden: int):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(
            nn.Linear(context * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, vocab),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L - context, V) predicting tokens[:, context:]."""
        e = self.embed(tokens)  # (B, L, dim)
        windows = [e[:, i:e.shape[1] - self.context + i] for i in range(self.context)]
        return self.mlp(torch.cat(windows, -1))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batches(corpus: torch.Tensor, batch: int, generator: torch.Generator):
    """Endless random batches of sequences from a pre-sampled corpus (sampling is sequential
    over positions, so it is done once, not per step)."""
    while True:
        yield corpus[torch.randint(corpus.shape[0], (batch,), generator=generator)]


def train_teacher(teacher, data, steps):
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    loss = torch.zeros(())
    for _ in range(steps):
        tokens = next(data)
        logits = teacher(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 2:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def train_student(student, teacher, data, held_out, args, log=print):
    """Distillation loop; returns the held-out (loss, divergence) before and after."""
    temperature = 2.0
    # Before (the usual hand-written distillation loss, logits flattened to (tokens, V)):
    #   loss = (1 - alpha) * F.kl_div(F.log_softmax(s / temperature, -1),
    #                                 F.softmax(t / temperature, -1),
    #                                 reduction="batchmean") * temperature**2 \
    #          + alpha * F.cross_entropy(s, labels)
    # After: one fused loss; same value, no (tokens x V) probability tensors.
    criterion = kd.KDLoss(temperature=temperature, kd_weight=1.0 - args.alpha,
                          ce_weight=args.alpha, divergence=args.divergence, impl=args.impl)
    # The soft part alone (T^2 * divergence), to show how close the student gets to the teacher.
    divergence = kd.KDLoss(temperature=temperature, divergence=args.divergence, impl=args.impl)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)

    def evaluate():
        with torch.no_grad():
            s = student(held_out).flatten(0, 1)
            t = teacher(held_out).flatten(0, 1)
            return float(criterion(s, t, held_out[:, 2:].flatten())), float(divergence(s, t))

    first = evaluate()
    log(f"distilling: step {0:4d}  held-out loss {first[0]:.4f}  divergence {first[1]:.4f}")
    for step in range(1, args.steps + 1):
        tokens = next(data)
        with torch.no_grad():
            teacher_logits = teacher(tokens).flatten(0, 1)  # (tokens, V)
        student_logits = student(tokens).flatten(0, 1)
        labels = tokens[:, 2:].flatten()
        loss = criterion(student_logits, teacher_logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            held = evaluate()
            log(f"distilling: step {step:4d}  train loss {float(loss.detach()):.4f}  "
                f"held-out loss {held[0]:.4f}  divergence {held[1]:.4f}")
    return first, evaluate()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="student distillation steps")
    p.add_argument("--teacher-steps", type=int, default=300, help="teacher training steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", default="auto", choices=("auto", "torch", "triton", "ext"))
    p.add_argument("--divergence", default="forward_kl",
                   choices=("forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                            "skew_reverse_kl"))
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label CE")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--length", type=int, default=34, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-2, help="student learning rate")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: these matmuls are too small to split, and on a "
                        "busy machine idle OpenMP threads spinning at barriers cost 10-100x)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.teacher_steps < 0:
        p.error("--steps must be >= 1 and --teacher-steps >= 0")
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.vocab < 2 or args.batch < 1 or args.length < 3:
        p.error("need --vocab >= 2, --batch >= 1 and --length >= 3")
    device = torch.device(args.device)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    lang = TrigramLanguage(args.vocab, sharpness=2.0, generator=g)
    corpus = lang.sample(1024, args.length).to(device)
    held_out = lang.sample(64, args.length).to(device)
    data = batches(corpus, args.batch, g)
    teacher = MLPLanguageModel(args.vocab, context=2, dim=64, hidden=128).to(device)
    student = MLPLanguageModel(args.vocab, context=2, dim=32, hidden=64).to(device)
    print(f"language: vocab {args.vocab}, best possible CE {lang.entropy(held_out.cpu()):.3f} "
          f"nats (uniform {math.log(args.vocab):.3f})")
    print(f"teacher: {n_params(teacher):,} parameters; student: {n_params(student):,}; "
          f"loss impl={args.impl}, divergence={args.divergence}, device={device}")

    t0 = time.perf_counter()
    ce = train_teacher(teacher, data, args.teacher_steps)
    teacher.eval().requires_grad_(False)
    print(f"teacher trained for {args.teacher_steps} steps: CE {ce:.3f} "
          f"({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    first, last = train_student(student, teacher, data, held_out, args)
    print(f"held-out distillation loss fell from {first[0]:.4f} to {last[0]:.4f} in "
          f"{args.steps} steps ({time.perf_counter() - t0:.1f} s); the divergence to the "
          f"teacher (x T^2) from {first[1]:.4f} to {last[1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
