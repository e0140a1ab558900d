"""Train ``charlm``, the zoo's character-level GPT on Tiny Shakespeare, on the CPU, deterministically.

    python scripts/train_charlm.py                       # writes engine/_data/charlm/

A Hugging Face ``GPT2LMHeadModel`` (4 layers, 4 heads, width 128, context 128, 65 characters, untied
``lm_head``, biases, no dropout) trained on the first 90 % of ``<data_dir>/text/tinyshakespeare.txt``
(:mod:`engine.charlm`) with AdamW (β = (0.9, 0.99), weight decay 0.1 on matrices only), a linear warmup then a
cosine decay of the learning rate to a tenth, gradient-norm clipping at 1, on batches of random 128-character
windows (random offsets, nanoGPT's ``get_batch``) drawn by a Generator seeded with ``--seed``; the initial
weights come from ``torch.manual_seed(--seed)``. Same seed, same thread count, same torch → same weights.

One thread by default: on a shared 2-core machine two threads ran 2.5 times more CPU time per step than one
(0.75 s) as soon as other jobs competed for the cores (OpenMP threads waiting for each other), and one thread
also makes the result independent of how many cores the machine has. Idle, two threads are ~1.7x faster:
``--threads 2`` (the weights may then differ in the last bits).

Every ``--eval-interval`` steps it logs the validation loss on ``--eval-windows`` windows
(:func:`engine.charlm.evaluate_charlm`, seed :data:`engine.charlm.EVAL_SEED`); at the end it scores the whole
validation split (every non-overlapping window: the figure reported) and ``--eval-windows`` training windows.

Writes into ``--out`` (replaced as a whole, through a temporary folder beside it): ``config.json`` and
``model.safetensors`` (``save_pretrained``), ``vocab.json`` (the characters in id order) and
``train_record.json`` (command, seed, settings, steps, losses, seconds, versions, evaluation history).
Exit 1 when the final validation loss is above ``--target``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from engine.charlm import BLOCK, CHARLM_DIR, EVAL_SEED, charlm_text, evaluate_charlm, split_text
from engine.hub import CausalLMLogits, char_dataset

log = logging.getLogger("train_charlm")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=CHARLM_DIR, help="output folder (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder holding text/tinyshakespeare.txt "
                   "(default: $CBS_DATA_DIR, else ./../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s; see the module docstring)")
    p.add_argument("--target", type=float, default=1.88, help="the validation loss to reach (nats)")
    return p.parse_args(argv)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model(args: argparse.Namespace, vocab_size: int):
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=BLOCK, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(args.seed)
    return transformers.GPT2LMHeadModel(config)


def write_folder(out: Path, model, chars: list[str], record: dict) -> None:
    """Write the model, vocab and record into a temporary folder beside ``out``, then swap it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "vocab.json").write_text(json.dumps(chars) + "\n", encoding="utf-8")
    (tmp / "train_record.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for file in tmp.iterdir():  # safetensors writes 0600; a packaged file must be readable by every user
        file.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    import transformers

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()

    text = charlm_text(args.data_dir)
    train_text, val_text = split_text(text)
    chars = sorted(set(text))
    vocab = {c: i for i, c in enumerate(chars)}
    train, val = char_dataset(train_text, BLOCK, vocab), char_dataset(val_text, BLOCK, vocab)
    log.info("text: %d characters, %d distinct; train %d, validation %d (%d windows)", len(text), len(chars),
             len(train_text), len(val_text), len(val))

    hf_model = build_model(args, len(chars))
    model = CausalLMLogits(hf_model).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    log.info("model: %d parameters", sum(p.numel() for p in model.parameters()))

    ids = train.ids
    batches = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(BLOCK)
    history = []
    running = None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        starts = torch.randint(0, ids.numel() - BLOCK, (args.batch_size, 1), generator=batches)
        x, y = ids[starts + offsets], ids[starts + 1 + offsets]
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if (step + 1) % args.log_interval == 0:
            elapsed = time.perf_counter() - started
            log.info("step %d/%d  train %.4f  %.2f s/step so far", step + 1, args.steps, running, elapsed / (step + 1))
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            score = evaluate_charlm(model, val, windows=args.eval_windows)
            elapsed = time.perf_counter() - started
            history.append({"step": step + 1, "train_loss_ema": running, "val_loss": score.loss,
                            "seconds": round(elapsed, 1)})
            log.info("step %d/%d  train %.4f  val(%d windows) %.4f  lr %.2e  %.0f s", step + 1, args.steps,
                     running, score.windows, score.loss, learning_rate(step, args), elapsed)

    model.eval()
    final_val = evaluate_charlm(model, val)  # the whole validation split
    final_train = evaluate_charlm(model, train, windows=args.eval_windows)
    seconds = time.perf_counter() - started
    record = {
        "command": shlex.join(["python", "scripts/train_charlm.py", *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "optimizer": "AdamW betas=(0.9, 0.99), weight decay on >= 2-d parameters only",
        "schedule": f"linear warmup {args.warmup} steps, cosine to min_lr at step {args.steps}",
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * BLOCK,
        "data": {"file": "text/tinyshakespeare.txt", "characters": len(text), "vocab_size": len(chars),
                 "train_characters": len(train_text), "val_characters": len(val_text)},
        "evaluation": ("mean next-character cross-entropy (nats) over every position of non-overlapping "
                       f"{BLOCK}-character windows (engine.charlm.evaluate_charlm); val: all {final_val.windows} "
                       f"windows of the validation split; train: {final_train.windows} training windows drawn "
                       f"with seed {EVAL_SEED}"),
        "final_val_loss": final_val.loss,
        "final_val_perplexity": final_val.perplexity,
        "final_val_tokens": final_val.tokens,
        "final_train_loss": final_train.loss,
        "target_val_loss": args.target,
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "history": history,
    }
    write_folder(args.out, hf_model, chars, record)
    print(f"charlm: val loss {final_val.loss:.4f} nats (perplexity {final_val.perplexity:.3f}) on "
          f"{final_val.windows} windows, train loss {final_train.loss:.4f}, {seconds:.0f} s; wrote {args.out}")
    if final_val.loss > args.target:
        log.warning("the validation loss %.4f is above the target %.2f", final_val.loss, args.target)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
