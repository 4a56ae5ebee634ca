"""Distil from a sparse teacher: store the teacher's top-k log-probabilities once, train later.

Distillation datasets for large vocabularies keep only the teacher's top-k token ids and
log-probabilities per position (k = 16..128 instead of V = 128k floats). This script does
the two steps on a synthetic language, with numpy files as the storage:

  1. The teacher (a fixed bigram model: next-token logits A[previous token]) reads a corpus;
     kd.topk_logprobs turns its logits into (ids, logprobs) of the top k, saved with np.save.
  2. A small student (embedding -> linear, a low-rank bigram model) is trained from those
     files alone with kd.sparse_kd_loss, mixing in a little cross-entropy on the corpus.

It reports the held-out sparse loss and the dense KL(teacher || student) over the whole
vocabulary, which the student never saw directly: both fall. A few seconds on a CPU.

    python examples/sparse_distill.py [--steps 100] [--k 16] [--tail bucket]
                                      [--device cpu|cuda] [--impl auto|torch|triton|ext]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kdkernels as kd


def make_corpus(table: torch.Tensor, n_seq: int, length: int, g: torch.Generator):
    """Token sequences sampled from the bigram teacher (n_seq, length)."""
    x = [torch.randint(table.shape[0], (n_seq,), generator=g)]
    for _ in range(length - 1):
        probs = torch.softmax(table[x[-1]], -1)
        x.append(torch.multinomial(probs, 1, generator=g)[:, 0])
    return torch.stack(x, 1)


def store_teacher(table, corpus, k: int, out: Path) -> dict:
    """Step 1: the teacher's top-k (ids, log-probabilities) of every position, saved as
    numpy files next to the inputs and targets. Returns the file paths."""
    inputs, targets = corpus[:, :-1], corpus[:, 1:]
    logits = table[inputs]  # (n_seq, length - 1, V): the teacher's forward pass
    ids, logprobs = kd.topk_logprobs(logits, k)
    files = {name: out / f"{name}.npy" for name in ("inputs", "targets", "ids", "logprobs")}
    np.save(files["inputs"], inputs.numpy().astype(np.int32))
    np.save(files["targets"], targets.numpy().astype(np.int32))
    np.save(files["ids"], ids.numpy().astype(np.int32))
    np.save(files["logprobs"], logprobs.numpy().astype(np.float16))  # 2 bytes per slot
    return files


class Student(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.embed(x))


def dense_kl(table, student, inputs) -> float:
    """KL(teacher || student) over the whole vocabulary, mean per position (held out)."""
    with torch.no_grad():
        lp = torch.log_softmax(table[inputs], -1)
        lq = torch.log_softmax(student(inputs).float(), -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--k", type=int, default=16, help="teacher ids stored per position")
    p.add_argument("--tail", default="bucket", choices=kd.sparse.TAILS)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dim", type=int, default=32, help="the student's embedding width")
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--length", type=int, default=33)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", default="auto", choices=("auto", "torch", "triton", "ext"))
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the numpy files (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.k <= args.vocab:
        p.error(f"--k must be in [1, --vocab={args.vocab}], got {args.k}")
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    table = torch.randn(args.vocab, args.vocab, generator=g) * 2.5
    corpus = make_corpus(table, args.sequences, args.length, g)
    held_out = make_corpus(table, 32, args.length, g)[:, :-1]

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = store_teacher(table, corpus, args.k, out)
        stored = sum(f.stat().st_size for f in files.values())
        dense = corpus[:, 1:].numel() * args.vocab * 2
        print(f"teacher: top-{args.k} of V={args.vocab} for {corpus[:, 1:].numel()} positions "
              f"stored in {stored / 1024:.0f} KiB (dense float16 logits: {dense / 1024:.0f} "
              f"KiB) under {out}")

        # step 2: training reads only the files
        data = {name: torch.from_numpy(np.load(f)) for name, f in files.items()}
        dev = torch.device(args.device)
        inputs = data["inputs"].long().to(dev)
        targets = data["targets"].long().to(dev)
        ids = data["ids"].long().to(dev)
        logprobs = data["logprobs"].float().to(dev)

    student = Student(args.vocab, args.dim).to(dev)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    loss_fn = kd.SparseKDLoss(tail=args.tail, temperature=args.temperature,
                              ce_weight=args.ce_weight, impl=args.impl)
    h_ids, h_lp = kd.topk_logprobs(table[held_out], args.k)
    held_out, h_ids, h_lp = held_out.to(dev), h_ids.to(dev), h_lp.to(dev)
    held_fn = kd.SparseKDLoss(tail=args.tail, temperature=args.temperature, impl=args.impl)

    def evaluate():
        with torch.no_grad():
            sparse = float(held_fn(student(held_out), h_ids, h_lp))
        return sparse, dense_kl(table.to(dev), student, held_out)

    first = evaluate()
    print(f"step 0: held-out sparse loss {first[0]:.4f}, dense KL {first[1]:.4f}")
    for step in range(1, args.steps + 1):
        rows = torch.randint(inputs.shape[0], (args.batch,), generator=g).to(dev)
        loss = loss_fn(student(inputs[rows]), ids[rows], logprobs[rows], targets[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            sparse, kl = evaluate()
            print(f"step {step}: training loss {loss.item():.4f}, held-out sparse loss "
                  f"{sparse:.4f}, dense KL {kl:.4f}")
    last = evaluate()
    print(f"held-out sparse loss fell from {first[0]:.4f} to {last[0]:.4f}; dense "
          f"KL(teacher || student) from {first[1]:.4f} to {last[1]:.4f} in {args.steps} steps "
          f"({time.perf_counter() - t0:.1f} s, tail={args.tail}, k={args.k})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
