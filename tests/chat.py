"""A tiny chat LLM for tests of answer runs: a random grouped-query Llama with a word-level tokenizer and a chat
template, so that ``qa:`` data, greedy answers and every analysis of an answer run run in seconds, offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from paramsal import profile_dataset
from paramsal.rundir.run import Run
from paramsal.zoo.hf import TextModel
from paramsal.zoo.qa import QADataset

SPECIAL = ["<pad>", "<unk>", "<|im_end|>", "<|im_start|>"]
WORDS = ["user", "assistant", "what", "is", "plus", "times", "the", "answer", "?", "=", "+", "*", ".",
         *map(str, range(10))]
VOCAB = SPECIAL + WORDS
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def chat_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Words and digits, one token each; end of turn ``<|im_end|>`` (the end-of-text id generation stops at)."""
    core = Tokenizer(models.WordLevel({word: n for n, word in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="<|im_end|>", chat_template=TEMPLATE)


def chat_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> TextModel:
    """A random Llama (4 query heads over 2 key/value heads, RMSNorm, tied embeddings) that answers with the
    tokenizer above; its weights are scaled up so that its greedy answers vary with the question."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                      max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                      bos_token_id=3, eos_token_id=2, pad_token_id=0)
    llama = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in llama.parameters():
            if param.dim() == 2:
                param.mul_(8.0)
    model = TextModel(llama, None, "causal-lm", tokenizer=chat_tokenizer)
    return model.to(dtype).eval()


def write_questions(path: Path, count: int = 24) -> Path:
    """``count`` sums "what is A plus B ?" answered "= S ." after the prefix "the answer", labelled "large" (a sum
    of 5 or more) or "small"."""
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            a, b = n % 7, (3 * n) % 5
            out.write(json.dumps({"prompt": f"what is {a} plus {b} ?", "prefix": "the answer",
                                  "answer": f"= {a + b} .", "label": "large" if a + b >= 5 else "small"}) + "\n")
    return path


def chat_questions(tmp_path: Path, model: TextModel, count: int = 24) -> QADataset:
    return QADataset(write_questions(tmp_path / "questions.jsonl", count), model.tokenizer)


def trained(model: TextModel, data: QADataset, steps: int) -> TextModel:
    """``model`` after ``steps`` full-batch Adam steps on the answers of ``data`` (deterministic on the CPU): few
    steps leave some answers wrong, as a real model's are."""
    ids, labels = data.ids, data.labels
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(ids)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
    return model.eval()


def answer_run(tmp_path: Path, units: str = "neurons", count: int = 24) -> tuple[TextModel, QADataset, Run]:
    """The trained tiny chat model, its questions and a run of task "answer" over them (about 60% right)."""
    model = chat_model()
    data = chat_questions(tmp_path, model, count)
    trained(model, data, steps=40)
    run = profile_dataset(model, data, tmp_path / f"run-{units}", batch_size=8, units=units, task="answer",
                          progress=False)
    return model, data, run
