#!/usr/bin/env python3
"""Train the tiny CPU test-bed model: a byte-level BPE tokenizer and a small Llama.

The test bed lets the LongRoPE perplexity claims (searched rescale factors
beat PI, NTK and YaRN) be shown on a 2-core CPU. It trains, seeded and
deterministically:

* a 2,048-entry byte-level BPE tokenizer (digits split one per token, special
  tokens ``<s>``, ``</s>``, ``<pad>``) on the ``train/`` split of the corpus;
* a ``LlamaForCausalLM`` (hidden 256, 4 layers, 4 heads of dim 64, RoPE base
  10000, native window 256 tokens) on random 256-token windows of the five
  training books, every window starting with BOS.

Optional extra sequence types (off by default, see ``--passkey-frac``,
``--repeat-frac``): passkey prompts in the paper's form (random 5-digit key,
depth and length up to 256, with an extra loss on the digits that must be
copied) and repeated random-token segments that reward induction heads. On
2 CPU cores and 1,000 steps they did not teach retrieval and they weakened
the model (see PASSKEY_NOTE and the generated TRAINING.md), so the committed
model is trained on books only.

It then measures plain-RoPE perplexity on held-out windows (``eval/`` split)
at 1x to 16x the native window and passkey accuracy at 256 tokens, and writes
a Hugging Face model directory with a ``TRAINING.md`` report.

Usage::

    OMP_WAIT_POLICY=PASSIVE python scripts/train_testbed.py            # ~11-14 min on 2 cores
    python scripts/train_testbed.py --steps 50 --out /tmp/tb          # smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from longrope_cli.evaluate.passkey import (  # noqa: E402
    build_passkey_example,
    passkey_answer_ids,
    score_passkey,
)

ASSETS = ROOT / "src" / "longrope_cli" / "assets"
CORPUS = ASSETS / "corpus"
SPECIALS = ["<s>", "</s>", "<pad>"]
VOCAB = 2048
CONTEXT = 256
EVAL_LENGTHS = (256, 512, 1024, 2048, 4096)
EVAL_WINDOWS = 8
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

PASSKEY_NOTE = """\
## Why no passkey training (measured during development, 2 shared cores, seed 0, 1,000 steps)

The test bed cannot retrieve a passkey. Mixing passkey prompts into training was tried and did not
teach retrieval within the CPU budget, while it weakened exactly what the test bed is for:

| Training mix (per step of 16 x 256) | ppl 256 | ppl 2,048 | 2,048 / 256 | passkey@256 |
| --- | ---: | ---: | ---: | ---: |
| 16 book windows (committed) | 51.6 | 68.1 | 1.32 | 0 / 40 |
| 12 books + 4 passkey prompts | 54.0 | 59.1 | 1.10 | 0 / 40 |
| 11 books + 3 passkey + 2 repeated segments, copy loss 0.3 | 68.9 | 72.4 | 1.05 | 1 / 40 |

- The passkey-trained models answer the same digits (" 21111") whatever the key. On repeated text
  their loss on the second copy equals the first (3.92 vs 3.95 nats): no induction (copy) head formed,
  and attention stays diffuse.
- Even passkey prompts alone (no books, 16 x 128 tokens, 800 steps) reach only 8-17% exact keys;
  teacher-forced after 400 steps the first digit is right 85% of the time, the middle digits ~30%.
- Repeated random-token segments of varying length (16 x 64 tokens) take over 600 steps to get from
  7.7 to 5.1 nats, with no sharp phase change; fixed-length repeats are learnt in ~100 steps but by a
  positional shortcut that cannot find a key at a varying depth.
- Continuing the committed model instead (no budget left for it, an upper bound): 300 steps of 8 books +
  8 passkey prompts (lr 1e-3, copy loss 0.3) bring the loss on the digits that must be copied from 2.19
  to 0.70 nats, then 400 steps of passkey prompts alone (copy loss 1.0) to 0.45 nats: 0-6% exact keys at
  256 (18 trials every 50 steps). 700 steps are 8 more CPU minutes and still far from the 90% bar.

Retrieval needs a content-based copy circuit spanning two layers; in these runs it does not form in
the 4M training tokens that 15 CPU minutes allow. A run of ~10-20k steps (GPU) with the
`--passkey-frac`, `--repeat-frac` and `--copy-weight` options is the next thing to try.
"""

DEV_NOTE = """\
## Notes (measured on this model during development)

- Reproducible: three runs of the command above gave bit-identical `model.safetensors`: 839 s and
  1,326 s of training on the shared 2-core machine under a load of 2-6 from other work, and 669 s on
  the idle machine from a fresh clone (11 min 22 s for the whole script, measurements included).
- Extension hurts plain RoPE, and the classic fixes help (same 8 windows, 2,048 tokens, transformers'
  built-in rope types): none 68.1, linear/PI x8 101.3, dynamic NTK x8 48.3, YaRN x8 47.1
  (native 256: 51.6).
- The 2,048/256 ratio for plain RoPE depends on which windows are scored: 1.32 with 8 evenly spaced
  windows (above), 1.26 with 4 evenly spaced, 1.23 with 4 consecutive from the start of the book,
  1.07 with 8 consecutive from token 10,000. Compare methods on the same windows, at 4x and 8x.
"""


def read_split(split: str) -> dict[str, str]:
    """Book slug -> text for one corpus split."""
    files = sorted((CORPUS / split).glob("*.txt.gz"))
    if not files:
        raise SystemExit(f"train_testbed: error: no corpus in {CORPUS / split}; run scripts/build_corpus.py")
    return {p.name.removesuffix(".txt.gz"): gzip.decompress(p.read_bytes()).decode("utf-8") for p in files}


def train_tokenizer(texts: list[str]):
    """Byte-level BPE with single-digit tokens, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, seed: int):
    """The test-bed LlamaForCausalLM, fp32, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=672,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=CONTEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


class Batches:
    """Seeded training batches: book windows plus passkey prompts, all BOS-first."""

    def __init__(
        self,
        tokenizer,
        books: list[np.ndarray],
        batch: int,
        passkey_frac: float,
        repeat_frac: float,
        warm_repeat_frac: float,
        warm_steps: int,
        seed: int,
    ):
        self.tok = tokenizer
        self.books = books
        sizes = np.array([len(b) for b in books], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self.batch = batch
        self.n_passkey = round(batch * passkey_frac)
        self.n_repeat = round(batch * repeat_frac)
        self.n_warm_repeat = round(batch * warm_repeat_frac)
        self.warm_steps = warm_steps
        self.rng = np.random.default_rng(seed)
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        # Shortest prompt length, plus a little room for filler.
        probe = 16
        while True:
            try:
                build_passkey_example(tokenizer, probe, 0.5, 10_000)
                break
            except ValueError:
                probe += 1
        self.min_passkey = probe + 16
        self.digits = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}

    def book_window(self) -> tuple[list[int], list[int], list[float]]:
        book = self.books[self.rng.choice(len(self.books), p=self.weights)]
        start = int(self.rng.integers(0, len(book) - CONTEXT))
        ids = [self.bos, *book[start : start + CONTEXT - 1].tolist()]
        return ids, ids, [0.0] * CONTEXT

    def repeated_window(self) -> tuple[list[int], list[int], list[float]]:
        """BOS, then a segment of 8-100 random tokens repeated to fill the window.

        Only the repeats are trained (the first copy is masked): predicting
        them needs content-based look-back at a varying distance, the
        "induction" skill that passkey retrieval rests on. Without these
        sequences a model this small and this briefly trained never forms
        it (its attention stays diffuse and it cannot retrieve a key).
        """
        size = int(self.rng.integers(8, 101))
        segment = self.rng.integers(3, VOCAB, size=size).tolist()
        ids = [self.bos, *(segment * (CONTEXT // size + 1))[: CONTEXT - 1]]
        labels = [-100] * (1 + size) + ids[1 + size :]
        return ids, labels, [0.0] * CONTEXT

    def passkey(self) -> tuple[list[int], list[int], list[float]]:
        """A passkey prompt plus its answer, EOS and masked padding.

        The copy mask marks the digits that can only be predicted by copying
        the key: the second mention inside the key sentence (a short-range
        copy) and the answer (the long-range retrieval).
        """
        length = int(self.rng.integers(self.min_passkey, CONTEXT + 1))
        depth = float(self.rng.random())
        key = int(self.rng.integers(10_000, 100_000))
        ex = build_passkey_example(self.tok, length, depth, key)
        answer = passkey_answer_ids(self.tok, key)
        ids = ex.ids + answer
        copy = [0.0] * len(ids)
        needle_digits = [i for i in range(ex.key_start, ex.key_end) if ids[i] in self.digits]
        for i in needle_digits[len(needle_digits) // 2 :] + list(range(len(ex.ids), len(ids))):
            if ids[i] in self.digits:
                copy[i] = 1.0
        if len(ids) < CONTEXT:
            ids.append(self.eos)
            copy.append(0.0)
        pad = CONTEXT - len(ids)
        return ids + [self.pad] * pad, ids + [-100] * pad, copy + [0.0] * pad

    def mix(self, step: int) -> tuple[int, int]:
        """(passkey, repeat) sequences per batch at ``step``; books fill the rest."""
        if step < self.warm_steps:
            return self.n_passkey, self.n_warm_repeat
        return self.n_passkey, self.n_repeat

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        n_passkey, n_repeat = self.mix(step)
        rows = [self.passkey() for _ in range(n_passkey)]
        rows += [self.repeated_window() for _ in range(n_repeat)]
        rows += [self.book_window() for _ in range(self.batch - n_passkey - n_repeat)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
        copy = torch.tensor([r[2] for r in rows], dtype=torch.float32)
        return ids, labels, copy, n_passkey + n_repeat


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.inference_mode()
def perplexity(model, ids: np.ndarray, length: int, windows: int, bos: int) -> float:
    """exp(mean NLL) over ``windows`` non-overlapping BOS-first windows of ``length`` tokens."""
    stride = len(ids) // windows
    if stride < length - 1:
        raise ValueError(f"eval text too short for {windows} windows of {length}")
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * stride : w * stride + length - 1].tolist()
        x = torch.tensor([[bos, *chunk]], dtype=torch.long)
        logits = model(input_ids=x).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += length - 1
    return math.exp(nll / count)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS / "testbed", help="output model directory")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init and training (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--batch", type=int, default=16, help="sequences of 256 tokens per step (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    parser.add_argument(
        "--passkey-frac", type=float, default=0.0, help="share of passkey sequences (default 0)"
    )
    parser.add_argument(
        "--repeat-frac",
        type=float,
        default=0.0,
        help="share of repeated random-token sequences (default 0)",
    )
    parser.add_argument(
        "--warm-repeat-frac",
        type=float,
        default=0.0,
        help="share of repeated random-token sequences during the first --warm-steps (default 0)",
    )
    parser.add_argument(
        "--warm-steps", type=int, default=0, help="steps of the repeat-heavy warm phase (default 0)"
    )
    parser.add_argument(
        "--copy-weight",
        type=float,
        default=0.3,
        help="weight of the extra loss on key digits that must be copied (default 0.3)",
    )
    parser.add_argument(
        "--probe-every", type=int, default=0, help="print passkey accuracy every N steps (default 0: never)"
    )
    parser.add_argument("--passkey-trials", type=int, default=8, help="passkey trials per depth (default 8)")
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity/passkey measurements")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    train = read_split("train")
    evaluation = read_split("eval")
    tokenizer = train_tokenizer(list(train.values()))
    t_tok = time.perf_counter() - t0
    books = {
        slug: np.array(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
        for slug, text in train.items()
    }
    eval_ids = {
        slug: np.array(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
        for slug, text in evaluation.items()
    }
    for slug, ids in {**books, **eval_ids}.items():
        print(f"{slug:22s} {len(ids):>8,} tokens")

    model = build_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    data = Batches(
        tokenizer,
        list(books.values()),
        args.batch,
        args.passkey_frac,
        args.repeat_frac,
        args.warm_repeat_frac,
        args.warm_steps,
        args.seed,
    )

    model.train()
    t_train0 = time.perf_counter()
    losses: list[float] = []
    book_losses: list[float] = []
    copy_losses: list[float] = []
    repeat_losses: list[float] = []
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels, copy, n_other = data.next(step)
        logits = model(input_ids=ids).logits
        target = labels[:, 1:]
        token_loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100, reduction="none"
        ).view_as(target)
        valid = target != -100
        lm_loss = token_loss.sum() / valid.sum()
        copy = copy[:, 1:]
        copy_loss = (token_loss * copy).sum() / copy.sum().clamp(min=1.0)
        loss = lm_loss + args.copy_weight * copy_loss
        losses.append(lm_loss.item())
        book_losses.append(token_loss[n_other:].mean().item())
        if data.mix(step)[1]:
            rows = slice(data.mix(step)[0], n_other)
            repeat_losses.append((token_loss[rows].sum() / valid[rows].sum()).item())
        copy_losses.append(copy_loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.probe_every and (step + 1) % args.probe_every == 0:
            probe = score_passkey(model, tokenizer, [CONTEXT], [0.1, 0.5, 0.9], 4, seed=1)
            model.train()
            acc = sum(r.correct for r in probe) / sum(r.trials for r in probe)
            tqdm.write(
                f"step {step + 1}: loss {np.mean(losses[-20:]):.3f} book {np.mean(book_losses[-20:]):.3f}"
                f" copy {np.mean(copy_losses[-20:]):.3f} repeat {np.mean(repeat_losses[-20:]):.3f}"
                f" passkey@256 {acc:.2f}"
            )
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(
                loss=f"{np.mean(losses[-20:]):.3f}",
                book=f"{np.mean(book_losses[-20:]):.3f}",
                copy=f"{np.mean(copy_losses[-20:]):.3f}",
                repeat=f"{np.mean(repeat_losses[-20:]):.3f}",
                lr=f"{lr:.1e}",
            )
    bar.close()
    t_train = time.perf_counter() - t_train0
    final_loss = float(np.mean(losses[-20:]))
    book_loss = float(np.mean(book_losses[-20:]))
    print(
        f"trained {args.steps} steps in {t_train:.0f} s, final loss (mean of last 20) {final_loss:.3f},"
        f" book windows only {book_loss:.3f}"
    )

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # Name the generic fast-tokenizer class so that transformers 4.x loads it as well as 5.x.
    tok_cfg_path = args.out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")

    ppl: dict[int, float] = {}
    passkey = []
    t_eval = 0.0
    if not args.no_eval:
        t_eval0 = time.perf_counter()
        persuasion = next(iter(eval_ids.values()))
        for length in tqdm(EVAL_LENGTHS, desc="perplexity", unit="len"):
            ppl[length] = perplexity(model, persuasion, length, EVAL_WINDOWS, tokenizer.bos_token_id)
        print("plain-RoPE perplexity on eval windows: " + ", ".join(f"{k}: {v:.2f}" for k, v in ppl.items()))
        passkey = score_passkey(
            model, tokenizer, [CONTEXT], list(PASSKEY_DEPTHS), args.passkey_trials, seed=0, progress=True
        )
        for r in passkey:
            print(f"passkey length {r.length} depth {r.depth:.2f}: {r.correct}/{r.trials}")
        t_eval = time.perf_counter() - t_eval0

    command = "OMP_WAIT_POLICY=PASSIVE python scripts/train_testbed.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("/")
    )
    write_report(
        args,
        command.strip(),
        n_params,
        t_tok,
        t_train,
        t_eval,
        final_loss,
        book_loss,
        losses,
        {**books, **eval_ids},
        ppl,
        passkey,
    )
    print(f"wrote {args.out} ({dir_size(args.out) / 1e6:.1f} MB)")
    return 0


def write_report(
    args, command, n_params, t_tok, t_train, t_eval, final_loss, book_loss, losses, tokens, ppl, passkey
):
    """Write TRAINING.md and training_log.json next to the model."""
    import transformers

    n_passkey = round(args.batch * args.passkey_frac)
    n_repeat = round(args.batch * args.repeat_frac)
    n_warm = round(args.batch * args.warm_repeat_frac)

    curve = {
        str(s): round(float(np.mean(losses[max(0, s - 19) : s + 1])), 4)
        for s in range(0, len(losses), max(1, len(losses) // 20))
    }
    curve[str(len(losses) - 1)] = round(final_loss, 4)
    lines = [
        "# Test-bed model: how it was trained",
        "",
        "A tiny `LlamaForCausalLM` for showing LongRoPE on a CPU. Rebuild with:",
        "",
        "```",
        command,
        "```",
        "",
        "## Settings",
        "",
        f"- Seed {args.seed}, {args.threads} CPU threads, fp32, SDPA attention.",
        "- Tokenizer: byte-level BPE, 2,048 entries (specials `<s>` BOS, `</s>` EOS, `<pad>`),"
        " digits split one per token, trained on the `train/` corpus split only"
        f" ({t_tok:.1f} s including reading the corpus).",
        f"- Model: hidden 256, 4 layers, 4 heads x head_dim 64 (32 RoPE frequency pairs), MLP 672,"
        f" tied embeddings, RoPE base 10000, native window 256; {n_params:,} parameters.",
        f"- Data: {args.steps} steps x {args.batch} sequences x 256 tokens; every sequence starts with BOS."
        f" Per step: {n_passkey} passkey prompts, {n_repeat} repeated random-token sequences"
        f" ({n_warm} during the first {args.warm_steps} steps), the rest random windows of the five"
        " training books.",
        f"- Optimizer: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr {args.lr:g},"
        f" {args.warmup} warm-up steps then cosine to 10%, gradient clipping 1.0.",
        "",
        "## Result",
        "",
        f"- Training wall time: {t_train:.0f} s ({t_train / max(1, args.steps):.3f} s/step),"
        f" final loss {final_loss:.3f} over all trained tokens, {book_loss:.3f} on the book windows alone"
        " (means of the last 20 steps).",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__},"
        f" transformers {transformers.__version__}.",
        "",
        "Tokens per book:",
        "",
        "| Book | Tokens |",
        "| --- | ---: |",
        *[f"| {slug} | {len(ids):,} |" for slug, ids in tokens.items()],
        "",
    ]
    if ppl:
        lines += [
            f"Perplexity with plain RoPE (no scaling) on held-out `eval/` text (persuasion),"
            f" {EVAL_WINDOWS} non-overlapping BOS-first windows per length, evenly spaced through the book"
            f" ({t_eval:.0f} s for all measurements):",
            "",
            "| Tokens | " + " | ".join(f"{k:,}" for k in ppl) + " |",
            "| --- | " + " | ".join("---:" for _ in ppl) + " |",
            "| Perplexity | " + " | ".join(f"{v:.2f}" for v in ppl.values()) + " |",
            "",
            "Passkey accuracy at the native 256 tokens (greedy, seed 0):",
            "",
            "| Depth | Correct | Accuracy |",
            "| ---: | ---: | ---: |",
            *[f"| {r.depth:.2f} | {r.correct}/{r.trials} | {r.accuracy:.0%} |" for r in passkey],
            "",
        ]
    lines += [DEV_NOTE]
    if n_passkey == 0:
        lines += [PASSKEY_NOTE]
    (args.out / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")
    log = {
        "seed": args.seed,
        "steps": args.steps,
        "threads": args.threads,
        "train_seconds": round(t_train, 1),
        "final_loss": round(final_loss, 4),
        "final_book_loss": round(book_loss, 4),
        "loss_curve": curve,
        "perplexity_plain_rope": {str(k): round(v, 3) for k, v in ppl.items()},
        "passkey_256": [
            {"depth": r.depth, "trials": r.trials, "correct": r.correct, "accuracy": r.accuracy}
            for r in passkey
        ],
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
