"""The tiny-model fixtures are real checkpoints that transformers loads offline."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_loads_from_safetensors_and_scores_text(tiny_model_dir):
    assert (tiny_model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    ids = tokenizer("SELECT name FROM users;", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    # an untrained model is near-uniform over the vocabulary: loss close to ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(float(len(tokenizer)))).item()) < 1.0
