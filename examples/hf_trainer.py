"""Distil a tiny causal language model into a smaller one with Hugging Face `Trainer`.

Both models are Llama architectures built from configs (random weights, nothing is
downloaded). The teacher has a padded vocabulary, as real checkpoints often do (e.g. 152064
embedding rows for 151936 tokens): its extra rows are never a real token, and kdkernels'
`vocab_size=` compares the first `--vocab` columns of both models. The data is a random
"bigram language" (each token's successor drawn from a fixed random table), each sequence a
masked prompt followed by a completion; the teacher first learns the language from hard
labels (a plain PyTorch loop), then `DistillationTrainer`, a `transformers.Trainer` whose
`compute_loss` calls kdkernels, trains the student on the teacher's softened distribution
plus a little of the hard labels. Trainer shows its progress bar; about half a minute on a
laptop CPU.

    pip install 'kdkernels[transformers]'
    python examples/hf_trainer.py [--steps 200] [--loss kdkernels|linear|kl_div] [--impl auto]

`--loss kl_div` trains with the same loss written with torch.nn.functional (the version
kdkernels replaces); `--loss linear` computes it from the models' last hidden states and
lm_head weights with kd.linear_kd_loss, so not even the logits are built. With the same seed
all three give the same loss trajectory (what tests/test_examples.py checks), and kdkernels
never builds the (tokens x V) probabilities.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import kdkernels as kd


class BigramLanguage(Dataset):
    """Fixed-length sequences where P(x_t | x_{t-1}) = softmax(A[x_{t-1}]); the first
    `prompt` tokens of each sequence are context only (labels -100, as a chat collator makes
    them)."""

    def __init__(self, vocab: int, n: int, length: int, prompt: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(vocab, vocab, generator=g) * 3.0
        x = [torch.randint(vocab, (n,), generator=g)]
        for _ in range(length - 1):
            x.append(torch.multinomial(torch.softmax(table[x[-1]], -1), 1, generator=g)[:, 0])
        self.ids = torch.stack(x, 1)
        self.prompt = prompt

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i):
        ids = self.ids[i]
        labels = ids.clone()
        labels[: self.prompt] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def build_models(vocab: int, padded_vocab: int, seed: int):
    """A 2-layer teacher (vocabulary padded to `padded_vocab`) and a 1-layer student."""
    torch.manual_seed(seed)
    common = dict(max_position_embeddings=128, tie_word_embeddings=False,
                  attention_dropout=0.0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=padded_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, **common))
    student = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, **common))
    return teacher, student


def train_teacher(teacher, data: BigramLanguage, steps: int, batch: int, seed: int) -> float:
    """Hard-label training in a plain loop (the padded rows get no target: they learn to
    stay improbable)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    loss = torch.zeros(())
    for _ in range(steps):
        ids = data.ids[torch.randint(len(data), (batch,), generator=g)]
        logits = teacher(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def kl_div_loss(s, t, labels, temperature, kd_weight, ce_weight):
    """The same loss with torch.nn.functional, summed over the unmasked tokens:
    kd_weight * T**2 * KL(softmax(t / T) || softmax(s / T)) + ce_weight * CE(s, labels)."""
    keep = labels != -100
    s, t, labels = s[keep], t[keep], labels[keep]  # (tokens, V): the tensors kdkernels avoids
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="sum")
    ce = F.cross_entropy(s, labels, reduction="sum")
    return kd_weight * temperature**2 * kl + ce_weight * ce


class DistillationTrainer(Trainer):
    """A Trainer whose loss is the distillation loss against a frozen teacher.

    loss = kd_weight * T**2 * KL(teacher || student at temperature T) + ce_weight * CE,
    averaged over the predicted (unmasked) tokens: by Trainer's `num_items_in_batch` when it
    passes one (which makes gradient accumulation exact), else over this batch's tokens.
    """

    def __init__(self, *args, teacher, vocab_size: int, temperature: float = 2.0,
                 kd_weight: float = 0.9, ce_weight: float = 0.1, loss: str = "kdkernels",
                 impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.loss_kind, self.impl = loss, impl
        self.loss_history: list[float] = []  # every training step's loss (tests read it)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if self.loss_kind == "linear":
            return self._linear_loss(model, inputs, labels, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        # causal shift: the logits at position i predict token i + 1
        s, t, labels = outputs.logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
        if self.loss_kind == "kdkernels":
            total = kd.kd_loss(s, t, labels, temperature=self.temperature,
                               kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                               vocab_size=self.vocab_size, reduction="sum", impl=self.impl)
        else:
            total = kl_div_loss(s, t[..., : self.vocab_size], labels, self.temperature,
                                self.kd_weight, self.ce_weight)
        return self._average(model, total, labels, outputs, return_outputs, num_items_in_batch)

    def _linear_loss(self, model, inputs, labels, return_outputs, num_items_in_batch):
        """The same loss from the last hidden states and the lm_head weights
        (kd.linear_kd_loss): neither model's (tokens x V) logits are ever built. vocab_size
        leaves the teacher's padded lm_head rows out (a view, no copy)."""
        outputs = model.model(**inputs)  # the decoder without its lm_head
        with torch.no_grad():
            teacher_hidden = self.teacher.model(**inputs).last_hidden_state
        total = kd.linear_kd_loss(
            outputs.last_hidden_state[:, :-1], model.lm_head.weight,
            teacher_hidden[:, :-1], self.teacher.lm_head.weight, labels[:, 1:],
            vocab_size=self.vocab_size, temperature=self.temperature, kd_weight=self.kd_weight,
            ce_weight=self.ce_weight, reduction="sum", impl=self.impl)
        return self._average(model, total, labels[:, 1:], outputs, return_outputs,
                             num_items_in_batch)

    def _average(self, model, total, labels, outputs, return_outputs, num_items_in_batch):
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            # Trainer then leaves the loss as it is over accumulated micro-batches
            loss = total / num_items_in_batch
        else:
            loss = total / (labels != -100).sum().clamp(min=1)
        if model.training:
            self.loss_history.append(float(loss.detach()))
        return (loss, outputs) if return_outputs else loss


def train(steps: int = 200, loss: str = "kdkernels", impl: str = "auto", vocab: int = 256,
          padded_vocab: int = 264, teacher_steps: int = 150, batch: int = 16,
          length: int = 32, seed: int = 0, device: str = "cpu", progress: bool = True,
          output_dir: str | None = None) -> tuple[DistillationTrainer, float]:
    """Train teacher then student; returns the trainer (loss_history) and the teacher's CE."""
    data = BigramLanguage(vocab, n=512, length=length, prompt=8, seed=seed)
    teacher, student = build_models(vocab, padded_vocab, seed)
    teacher_ce = train_teacher(teacher, data, teacher_steps, batch, seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=max(1, steps // 10),
            save_strategy="no", report_to="none", seed=seed, use_cpu=device == "cpu",
            disable_tqdm=not progress, dataloader_num_workers=0,
        )
        trainer = DistillationTrainer(model=student, args=args, train_dataset=data,
                                      teacher=teacher, vocab_size=vocab, loss=loss, impl=impl)
        trainer.train()
    return trainer, teacher_ce


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="student distillation steps")
    p.add_argument("--teacher-steps", type=int, default=150, help="teacher training steps")
    p.add_argument("--loss", default="kdkernels", choices=("kdkernels", "linear", "kl_div"),
                   help="kdkernels' fused loss on the logits, kdkernels' fused linear loss on "
                        "the hidden states and lm_head weights (no logits), or the same loss "
                        "with torch.nn.functional")
    p.add_argument("--impl", default="auto", choices=("auto", "torch", "triton", "ext"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--length", type=int, default=32, help="tokens per sequence (8 of prompt)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: these matrices are too small to split)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.teacher_steps < 0 or args.batch < 1 or args.length < 10:
        p.error("need --steps >= 1, --teacher-steps >= 0, --batch >= 1 and --length >= 10")
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    trainer, teacher_ce = train(steps=args.steps, loss=args.loss, impl=args.impl,
                                teacher_steps=args.teacher_steps, batch=args.batch,
                                length=args.length, seed=args.seed, device=args.device)
    h = trainer.loss_history
    print(f"teacher CE after {args.teacher_steps} steps: {teacher_ce:.4f}")
    print(f"student distillation loss ({args.loss}) fell from {h[0]:.4f} to {h[-1]:.4f} in "
          f"{len(h)} steps ({time.perf_counter() - t0:.1f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
