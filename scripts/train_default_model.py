"""Train kestrel's bundled default model: a byte-level BPE tokenizer and a small Llama, both
trained on the Python standard library's own source files (PSF licence).

Owns: corpus collection and the fixed train / held-out split, tokenizer training, the training
loop, and writing a plain Hugging Face folder (weights, tokenizer, chat template, generation
config, held-out slice, eval.json, loss log, model card).
Must not: download anything, or import kestrel's engine (the folder must stay plain HF; the
held-out loss comes from kestrel/eval.py, loaded by path so the engine package is never imported).

    python scripts/train_default_model.py --out-dir kestrel/assets/default_model \
        --time-budget 420 --steps 3500 --weight-decay 0.3     # about 2 minutes on one H100
    python scripts/train_default_model.py --smoke --out-dir /tmp/smoke   # a few CPU steps
    python scripts/train_default_model.py --card-only --out-dir kestrel/assets/default_model
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
EOT, PAD = "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, *ROLE_TOKENS, END_OF_TURN]  # ids 0..5, in this order
HELDOUT_PERCENT = 2
# Role-tagged turns: <|user|>\n{content}<|end|>\n ... then <|assistant|>\n to prompt a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range("]


def is_heldout(rel_path: str) -> bool:
    """The split rule: held out iff sha256 of the relative posix path, as an integer, is below
    HELDOUT_PERCENT modulo 100. Independent of the machine and of Python's hash seed."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def collect_corpus(
    root: Path, max_bytes: int | None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return (train, heldout) lists of (relative path, text), sorted by path."""
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel or not path.is_file():
            continue
        if path.name.startswith("_sysconfigdata"):
            continue  # build-machine paths, not library source
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
        if not text.strip() or EOT in text:
            continue
        (heldout if is_heldout(rel) else train).append((rel, text))
    if max_bytes is not None:  # smoke runs: a small deterministic prefix of each split
        train = _cap(train, max_bytes)
        heldout = _cap(heldout, max(max_bytes // 10, 4096))
    return train, heldout


def _cap(docs: list[tuple[str, str]], max_bytes: int) -> list[tuple[str, str]]:
    out, total = [], 0
    for rel, text in docs:
        out.append((rel, text[: max_bytes - total]))
        total += len(out[-1][1])
        if total >= max_bytes:
            break
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Every encoded text starts with <|endoftext|>, as every training document does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, 0)]
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, name
    return tok


def encode_docs(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream: <|endoftext|> doc <|endoftext|> doc ... (the post-processor adds each EOT)."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int64)


def build_model(args: argparse.Namespace, vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warmup to args.lr, then cosine down to args.lr * args.min_lr_ratio at `total`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def sample_batch(
    tokens: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # [batch, seq_len + 1]
    window = tokens[idx.to(tokens.device, non_blocking=True)]
    # contiguous: the compiled graph is specialised on strides
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


@torch.no_grad()
def heldout_eval(model, windows: torch.Tensor, device: torch.device, batch: int) -> float:
    """Mean next-token loss over fixed held-out windows [n, seq_len + 1]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch].to(device)
        with _autocast(device):
            logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train(args, model, train_ids, heldout_windows, device) -> dict:
    """The one core loop: AdamW, warmup + cosine, bf16 autocast, periodic held-out eval; keeps
    the weights with the best held-out loss."""
    t_begin = time.perf_counter()
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay}],
        lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda",
    )  # fmt: skip
    fwd = _maybe_compile(model, args, device)
    gen = torch.Generator().manual_seed(args.seed)
    train_ids = train_ids.to(device)
    log = open(args.log_file, "w")  # closed after the loop
    log.write("step\ttokens\tlr\ttrain_loss\theldout_loss\telapsed_s\n")
    total, t0, best = args.steps, time.perf_counter(), (float("inf"), -1, None)
    bar = tqdm(range(args.steps), desc="train", disable=args.quiet)
    running, since_log = torch.zeros((), device=device), 0
    for step in bar:
        if args.time_budget and step == args.calibrate_at // 2:
            t_cal = time.perf_counter()  # first steps (allocator, recompiles) are not timed
        if args.time_budget and step == args.calibrate_at:  # size the schedule to the budget
            now = time.perf_counter()
            per_step = (now - t_cal) / (step - args.calibrate_at // 2)
            left = 0.95 * (args.time_budget - (now - t_begin))  # 5% for held-out evals
            fits = step + int(left / per_step)
            total = max(args.warmup + 1, step + 1, min(args.steps, fits))
        if step >= total:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args)
        x, y = sample_batch(train_ids, args.batch_size, args.seq_len, gen)
        with _autocast(device):
            logits = fwd(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.detach()
        since_log += 1
        last = step + 1 == total
        if (step + 1) % args.log_every == 0 or (step + 1) % args.eval_every == 0 or last:
            train_loss = running.item() / since_log
            running.zero_()
            since_log = 0
            held = ""
            if (step + 1) % args.eval_every == 0 or last:
                h = heldout_eval(model, heldout_windows, device, args.batch_size)
                held = f"{h:.5f}"
                if h < best[0]:
                    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best = (h, step + 1, state)
            elapsed = time.perf_counter() - t0
            tokens = (step + 1) * args.batch_size * args.seq_len
            log.write(f"{step + 1}\t{tokens}\t{lr_at(step, total, args):.3e}\t{train_loss:.5f}"
                      f"\t{held}\t{elapsed:.1f}\n")  # fmt: skip
            log.flush()
            bar.set_postfix(total=total, loss=f"{train_loss:.3f}", heldout=held or "-")
    log.close()
    model.load_state_dict(best[2])
    return {
        "steps": total,
        "best_step": best[1],
        "best_heldout_loss_training_windows": best[0],
        "train_seconds": time.perf_counter() - t_begin,
        "tokens_seen": total * args.batch_size * args.seq_len,
    }


def _maybe_compile(model, args, device):
    """torch.compile on CUDA, checked with one throwaway forward; eager if compiling fails."""
    if device.type != "cuda" or args.no_compile:
        return model
    compiled = torch.compile(model)
    try:
        x = torch.zeros(args.batch_size, args.seq_len, dtype=torch.int64, device=device)
        with _autocast(device):
            compiled(input_ids=x).logits.float().sum().backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as exc:  # any compiler failure means: train eagerly
        print(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly")
        model.zero_grad(set_to_none=True)
        return model


def write_tokenizer_files(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD}  # byte-level: no unknowns
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": ROLE_TOKENS + [END_OF_TURN],
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special["additional_special_tokens"] = ROLE_TOKENS + [END_OF_TURN]
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_heldout_slice(heldout: list[tuple[str, str]], path: Path, target_bytes: int) -> None:
    """The first lines (up to 4 KB) of each held-out file, in path order, joined by EOT, until
    target_bytes: a fixed evaluation text that does not depend on the evaluating machine."""
    parts, total = [], 0
    for _, text in heldout:
        head = text[:4096]
        head = head[: head.rfind("\n") + 1] or head
        parts.append(head)
        total += len(head.encode("utf-8"))
        if total >= target_bytes:
            break
    path.write_text(EOT.join(parts), encoding="utf-8")


def load_eval_module():
    spec = importlib.util.spec_from_file_location("kestrel_eval", REPO_ROOT / "kestrel/eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def greedy_samples(out: Path, max_new_tokens: int) -> list[tuple[str, str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).to(torch.float32).eval()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
        samples.append((prompt, tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)))
    return samples


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--steps", type=int, default=6000, help="upper bound on optimizer steps")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for compiling + training; caps --steps from the speed of the "
                   "first steps")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--calibrate-at", type=int, default=40)
    p.add_argument(
        "--stdlib-dir",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="standard-library tree to train on (default: this interpreter's)",
    )
    p.add_argument(
        "--stdlib-label",
        default=f"CPython {platform.python_version()}",
        help="what --stdlib-dir is, for the model card",
    )
    p.add_argument("--max-corpus-bytes", type=int, default=None)
    p.add_argument("--slice-bytes", type=int, default=64 * 1024)
    p.add_argument("--sample-tokens", type=int, default=48)
    p.add_argument("--log-file", type=Path, default=None, help="default: OUT_DIR/train_log.tsv")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration, a few seconds")
    p.add_argument(
        "--card-only",
        action="store_true",
        help="rewrite OUT_DIR/README.md from its eval.json (samples recomputed), train nothing",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.__dict__.update(
            steps=40, batch_size=8, seq_len=64, vocab_size=400, hidden_size=64,
            intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
            max_position_embeddings=128, lr=3e-3, warmup=5, eval_every=10, eval_windows=8,
            log_every=5, max_corpus_bytes=200_000, slice_bytes=4096, sample_tokens=8,
            device="cpu", time_budget=None,
        )  # fmt: skip
    args.log_file = args.log_file or args.out_dir / "train_log.tsv"
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.card_only:
        return rewrite_card(args.out_dir)
    torch.manual_seed(args.seed)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    t_start = time.perf_counter()

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    train_docs, heldout_docs = collect_corpus(args.stdlib_dir, args.max_corpus_bytes)
    tok = train_tokenizer([t for _, t in train_docs], args.vocab_size)
    train_ids = encode_docs(tok, [t for _, t in train_docs])
    heldout_ids = encode_docs(tok, [t for _, t in heldout_docs])
    n_win = min(args.eval_windows, (heldout_ids.numel() - 1) // (args.seq_len + 1))
    heldout_windows = heldout_ids[: n_win * (args.seq_len + 1)].view(n_win, args.seq_len + 1)
    prep_s = time.perf_counter() - t_start
    print(f"corpus: {len(train_docs)} train / {len(heldout_docs)} held-out files, "
          f"{train_ids.numel()} / {heldout_ids.numel()} tokens, prep {prep_s:.0f}s")  # fmt: skip

    torch.manual_seed(args.seed)
    model = build_model(args, tok.get_vocab_size())
    n_params = sum(p.numel() for p in model.parameters())
    stats = train(args, model, train_ids, heldout_windows, device)

    model.to("cpu", torch.bfloat16).save_pretrained(out)
    eos = [SPECIAL_TOKENS.index(EOT), SPECIAL_TOKENS.index(END_OF_TURN)]
    GenerationConfig(bos_token_id=0, eos_token_id=eos, pad_token_id=1).save_pretrained(out)
    write_tokenizer_files(tok, out, args.max_position_embeddings)
    write_heldout_slice(heldout_docs, out / "heldout_slice.txt", args.slice_bytes)

    eval_mod = load_eval_module()
    seq_len = min(eval_mod.DEFAULT_SEQ_LEN, args.max_position_embeddings)
    loss = eval_mod.heldout_loss(str(out), str(out / "heldout_slice.txt"), seq_len=seq_len)
    summary = {
        "heldout_loss": round(loss, 6),
        "heldout_perplexity": round(math.exp(loss), 4),
        "eval_seq_len": seq_len,
        "eval_max_tokens": eval_mod.DEFAULT_MAX_TOKENS,
        "num_parameters": n_params,
        "train_files": len(train_docs),
        "heldout_files": len(heldout_docs),
        "train_tokens": train_ids.numel(),
        "corpus": args.stdlib_label,
        "python_version": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "prep_seconds": round(prep_s, 1),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "command": "python scripts/train_default_model.py " + shlex.join(argv),
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(out, summary, greedy_samples(out, args.sample_tokens), args)
    print(json.dumps(summary, indent=2))
    return summary


def rewrite_card(out: Path) -> dict:
    summary = json.loads((out / "eval.json").read_text())
    run_args = parse_args(shlex.split(summary["command"])[2:] + ["--out-dir", str(out)])
    write_model_card(out, summary, greedy_samples(out, run_args.sample_tokens), run_args)
    return summary


def write_model_card(out: Path, s: dict, samples: list[tuple[str, str]], args) -> None:
    cfg = json.loads((out / "config.json").read_text())
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.name != "README.md") / 1e6
    shown = "\n".join(f"Prompt `{json.dumps(p)}`:\n\n```python\n{p}{c}\n```\n" for p, c in samples)
    layers = f"{cfg['num_hidden_layers']} / {cfg['hidden_size']} / {cfg['intermediate_size']}"
    attention = (
        f"{cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} KV heads (GQA), "
        f"head dim {cfg['head_dim']}, RoPE theta 10000"
    )
    card = f"""# kestrel default model

A small Llama-architecture language model trained from scratch by
`scripts/train_default_model.py`, shipped inside kestrel so that the engine produces real
(Python-flavoured) text before any other model is downloaded. It is a test and demo model: it
continues Python source code; it does not follow instructions. The chat template exists so that
chat code paths can be exercised end to end.

## Corpus and split

- Text: every UTF-8 `*.py` file of the {s["corpus"]} standard library (`--stdlib-dir`, by
  default `sysconfig.get_paths()["stdlib"]` of the interpreter running the script; its test suite
  included where installed; site-packages and `_sysconfigdata*` excluded), i.e. the Python
  standard library's own source, under the PSF License Agreement. Each file is one document,
  preceded by `<|endoftext|>`.
- Split: a file is held out iff the first 8 bytes of `sha256(relative posix path)`, read as a
  big-endian integer, are `< {HELDOUT_PERCENT}` modulo 100. This gave {s["train_files"]} training
  files ({s["train_tokens"]:,} tokens) and {s["heldout_files"]} held-out files.
- `heldout_slice.txt`: the first lines (up to 4 KB) of held-out files in path order, joined by
  `<|endoftext|>`, {(out / "heldout_slice.txt").stat().st_size:,} bytes. It is stored here so the
  evaluation does not depend on the Python version of the evaluating machine.

## Model

| | |
| --- | --- |
| class | `transformers.LlamaForCausalLM` (`LlamaConfig`) |
| parameters | {s["num_parameters"]:,} (embeddings tied with the LM head) |
| layers / hidden / MLP | {layers} |
| attention | {attention} |
| context | {cfg["max_position_embeddings"]} positions |
| tokenizer | byte-level BPE, {cfg["vocab_size"]} ids; `<|endoftext|>` (0) is BOS and EOS, \
`<|pad|>` (1) pads, `<|system|>` `<|user|>` `<|assistant|>` `<|end|>` (2-5) tag chat turns |
| weights | bfloat16 safetensors; folder {size_mb:.1f} MB |

## Training

```
{s["command"]}
```

AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak LR {args.lr}, {args.warmup} warmup
steps then cosine to {args.min_lr_ratio}x, gradient clipping 1.0, bf16 autocast, batch
{args.batch_size} x {args.seq_len} tokens of randomly placed windows, seed {args.seed}. The run
took {s["steps"]} steps ({s["tokens_seen"]:,} tokens) in {s["train_seconds"]:.0f} s of training,
{s["total_seconds"]:.0f} s end to end, on {_device_words(s["device"])}. The weights kept are those
of step {s["best_step"]}, the best held-out loss seen during training. `train_log.tsv` has the
loss curve (training loss every {args.log_every} steps, held-out loss every {args.eval_every}).
{_corpus_note(args, s)}

## Evaluation

Computed by `kestrel.eval.heldout_loss(model_dir, "heldout_slice.txt", seq_len={s["eval_seq_len"]},
max_tokens={s["eval_max_tokens"]})`: float32 on CPU, non-overlapping windows, mean next-token
cross-entropy. `eval.json` holds the same numbers.

| metric | value |
| --- | --- |
| held-out loss (nats/token) | {s["heldout_loss"]:.4f} |
| held-out perplexity | {s["heldout_perplexity"]:.2f} |

## Greedy samples

Transformers `generate(do_sample=False, max_new_tokens={args.sample_tokens})`, float32 on CPU:

{shown}"""
    (out / "README.md").write_text(card)


def _corpus_note(args, s: dict) -> str:
    if args.stdlib_dir == Path(sysconfig.get_paths()["stdlib"]):
        return f"The training machine's Python was {s['python_version']}."
    return (
        f"The training machine's Python was {s['python_version']}; the corpus was read from\n"
        f"`--stdlib-dir {args.stdlib_dir}`, a copy of the `*.py` files of the standard library\n"
        f"(`lib/pythonX.Y`) of a full {s['corpus']} installation, test suite included."
    )


def _device_words(name: str) -> str:
    return "one H100 80GB" if "H100" in name else name


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
