"""The demo base model: a real pretraining run in miniature, saved as an HF checkpoint."""

import gzip
import json
import math

from conftest import DATASETS, rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from refit.flows.demo_base import DemoBaseSpec, build_demo_base
from refit.stages.core.config import PRETRAINING_RECORD


def test_builds_a_loadable_checkpoint_that_learned(tmp_path):
    corpus = tmp_path / "legacy.jsonl.gz"
    with gzip.open(corpus, "wt") as out:
        for doc in rows(DATASETS / "legacy_python_docs.jsonl.gz")[:150]:
            out.write(json.dumps(doc) + "\n")
    spec = DemoBaseSpec(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        layers=2,
        heads=2,
        seq_len=64,
        batch_size=8,
        tokens=40 * 8 * 64,
    )
    out = build_demo_base(corpus, tmp_path / "base", spec)

    assert not (tmp_path / "base.tmp").exists()  # staged, then renamed into place
    record = json.loads((out / PRETRAINING_RECORD).read_text())
    assert record["pretraining_min_lr"] == spec.min_lr and record["pretraining_max_lr"] == spec.max_lr
    assert record["pretraining_tokens"] == 40 * 8 * 64 and record["steps"] == 40
    assert record["final_loss"] < math.log(512) - 0.5  # well below a uniform guess: it learned
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and tokenizer.eos_token == "<|endoftext|>"
    text = "def os.path.join(a, *p)"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless
