"""Build the demo's base model: the "expensive pretrained model" that Refit then refreshes.

Nothing can be downloaded here, so the demo pretrains its own: a byte-level BPE tokenizer
and a small Llama-style causal LM, trained on the legacy corpus only (Python standard
library documentation) with a warmup-cosine schedule, like a real pretraining run in
miniature. The result is a normal Hugging Face checkpoint (safetensors) plus
`refit_pretraining.json`, which records the schedule's min/max LR and the tokens seen:
the numbers a continued-pretraining recipe starts from.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from refit.stages.core.config import PRETRAINING_RECORD
from refit.stages.core.schedule import Schedule

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class DemoBaseSpec:
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 512
    layers: int = 4
    heads: int = 4
    seq_len: int = 256
    batch_size: int = 8
    tokens: int = 600_000  # ~1.3 epochs of the legacy corpus, ~2.5 min on 2 CPU cores
    max_lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_fraction: float = 0.05
    seed: int = 0


def read_texts(path: Path, field: str = "text") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line)[field] for line in lines if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE (as GPT-2 and Llama 3 use), saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    return fast


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int):
    """Join documents with EOS and cut into rows of seq_len tokens (the tail is dropped)."""
    import torch

    flat = [t for tokens in token_lists for t in (*tokens, eos_id)]
    rows = len(flat) // seq_len
    return torch.tensor(flat[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def build_demo_base(corpus: Path, out_dir: Path, spec: DemoBaseSpec = DemoBaseSpec()) -> Path:
    """Pretrain the demo base model into out_dir (atomically: a temp folder renamed at the end)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.time()
    texts = read_texts(corpus)
    tokenizer = train_tokenizer(texts, spec.vocab_size, staging)
    data = pack(tokenizer(texts)["input_ids"], tokenizer.eos_token_id, spec.seq_len)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.seq_len * 4,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    steps = spec.tokens // (spec.batch_size * spec.seq_len)
    schedule = Schedule(
        max_lr=spec.max_lr,
        total_steps=steps,
        min_lr_ratio=spec.min_lr / spec.max_lr,
        warmup_steps=int(spec.warmup_fraction * steps),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.max_lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed))
    log.info(
        "pretraining demo base: %.1fM parameters, %d rows of %d tokens, %d steps",
        model.num_parameters() / 1e6,
        len(data),
        spec.seq_len,
        steps,
    )
    losses = []
    for step in range(steps):
        index = torch.arange(step * spec.batch_size, (step + 1) * spec.batch_size) % len(order)
        batch = data[order[index]]
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            log.info(
                "step %d/%d loss %.3f lr %.2e (%.0fs)",
                step + 1,
                steps,
                losses[-1],
                schedule.lr(step),
                time.time() - started,
            )
    model.save_pretrained(staging, safe_serialization=True)
    record = {
        "architecture": asdict(spec),
        "pretraining_min_lr": spec.min_lr,
        "pretraining_max_lr": spec.max_lr,
        "pretraining_tokens": steps * spec.batch_size * spec.seq_len,
        "schedule": "warmup-cosine",
        "steps": steps,
        "corpus": corpus.name,
        "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "wall_seconds": round(time.time() - started, 1),
    }
    (staging / PRETRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir
