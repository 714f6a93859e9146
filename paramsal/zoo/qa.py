"""Questions and reference answers for a chat LLM: the ``qa:FILE.jsonl`` data spec.

Each line of the file is a JSON object ``{"prompt": ..., "answer": ...}`` with
two optional fields: ``"prefix"``, the start of the assistant's reply, given to
the model and not scored (a small instruct model restates the question, so
"The capital of France is" before " Paris." measures knowledge rather than
style), and ``"label"``, an error category carried with the sample. A sample
is the chat template applied to the prompt as a user turn (with the
generation prompt), then the prefix, then the answer, as token ids; its labels
are the answer's ids and -100 everywhere else, so that the causal-LM loss is
the mean cross-entropy of the reference answer's tokens given prompt and
prefix (teacher forcing). Every sample is padded on the right to the file's
longest, with the end-of-text id and label -100 (a causal model's earlier
positions never see later ones, so padding changes no scored logit).

Where the prefix is not empty, ends in no whitespace and the answer begins
with none, a space joins them (" Paris." after "The capital of France is").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from paramsal.errors import InputError
from paramsal.options import IGNORE_INDEX


@dataclass(frozen=True)
class Question:
    """One line of a ``qa:`` file."""

    prompt: str
    answer: str
    prefix: str = ""
    label: str | None = None

    @property
    def scored(self) -> str:
        """The answer as it follows the prefix (a space between them where neither has one)."""
        joined = self.prefix and not self.prefix[-1].isspace() and not self.answer[:1].isspace()
        return f" {self.answer}" if joined else self.answer


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a JSONL file, each line checked (one line naming the line and the fix where one is not)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"data spec 'qa:{path}': {file} is not a file (a JSONL file of "
                         '{"prompt": ..., "answer": ...} lines is needed)')
    questions = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                questions.append(_question(line, f"data spec 'qa:{path}', line {number}"))
    if not questions:
        raise InputError(f"data spec 'qa:{path}': the file holds no question")
    return questions


def _question(line: str, where: str) -> Question:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not JSON ({exc.msg}); write one JSON object per line") from None
    if not isinstance(fields, dict):
        raise InputError(f"{where} is a {type(fields).__name__}, not a JSON object with prompt and answer")
    unknown = sorted(set(fields) - {"prompt", "answer", "prefix", "label"})
    if unknown:
        raise InputError(f"{where} has unknown field(s) {unknown}; the fields are prompt, answer, prefix, label")
    for name in ("prompt", "answer"):
        if not isinstance(fields.get(name), str) or not fields[name].strip():
            raise InputError(f"{where} needs a non-empty string {name!r}")
    for name in ("prefix", "label"):
        if name in fields and not isinstance(fields[name], str):
            raise InputError(f"{where}: {name!r} must be a string, got {type(fields[name]).__name__}")
    return Question(fields["prompt"], fields["answer"], fields.get("prefix", ""), fields.get("label"))


class QADataset(Dataset):
    """A ``qa:`` file tokenized for a chat model: ``(ids [T], labels [T])`` per question, as the module describes.

    Attributes:
        questions: the file's questions, in order (sample i is line i of the non-empty lines).
        answer_starts: ``[N]`` where each answer's first token sits in its ids.
        answer_lengths: ``[N]`` its number of tokens.
        pad_id: the id padding the sequences (the end-of-text token).
    """

    def __init__(self, path: str | Path, tokenizer: Any):
        self.path = Path(path)
        self.questions = read_questions(path)
        self.pad_id = tokenizer.eos_token_id
        rows = [(_context_ids(tokenizer, q), _ids(tokenizer, q.scored)) for q in self.questions]
        empty = next((i for i, (_, answer) in enumerate(rows) if not answer), None)
        if empty is not None:
            raise InputError(f"data spec 'qa:{path}': the answer of question {empty} has no token")
        length = max(len(context) + len(answer) for context, answer in rows)
        self.ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        self.labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        self.answer_starts = torch.tensor([len(context) for context, _ in rows])
        self.answer_lengths = torch.tensor([len(answer) for _, answer in rows])
        for n, (context, answer) in enumerate(rows):
            end = len(context) + len(answer)
            self.ids[n, :end] = torch.tensor(context + answer)
            self.labels[n, len(context):end] = torch.tensor(answer)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[index], self.labels[index]

    def context(self, index: int) -> torch.Tensor:
        """``[answer_start]`` the ids of the prompt and prefix alone: what the model continues."""
        return self.ids[index, :int(self.answer_starts[index])]

    @property
    def categories(self) -> list[str | None]:
        """Each question's ``label`` (None where the line gives none)."""
        return [q.label for q in self.questions]

    def judge(self, model: Any, rows: Any) -> np.ndarray:
        """``[len(rows)]`` bool: whether the model's greedy answer to each question :func:`matches` its reference
        (what a run of task "answer" records as correct)."""
        rows = [int(r) for r in rows]
        return self._judged(rows, model.tokenizer.batch_decode(self._greedy(model, rows), skip_special_tokens=True))

    def sample_columns(self, model: Any, rows: Any, losses: np.ndarray,
                       said: list[list[int]] | None = None) -> dict[str, np.ndarray]:
        """What a run of task "answer" records of each question beside its profile (the sample table's answer
        columns, :data:`paramsal.rundir.integrity.ANSWER_COLUMNS`): ``correct`` (:meth:`judge`), ``prompt``,
        ``answer`` (the greedy answer's text), ``reference``, ``answer_logprob`` (the log-probability of the
        answer the loss was taken at, given prompt and prefix: the profiled mean token loss times its token count)
        and ``label``.

        Args:
            model: the profiled model.
            rows: the questions.
            losses: ``[len(rows)]`` their profiled losses.
            said: the greedy answers' tokens where the loss was taken at them (target "predicted",
                :meth:`predicted`); None: the loss is the reference's, and the answers are generated here.
        """
        rows = [int(r) for r in rows]
        tokens = self._greedy(model, rows) if said is None else said
        texts = model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        scored = self.answer_lengths[rows].numpy() if said is None else np.array([max(len(t), 1) for t in said])
        return {"correct": self._judged(rows, texts),
                "prompt": np.array([self.questions[r].prompt for r in rows], dtype=object),
                "answer": np.array(texts, dtype=object),
                "reference": np.array([self.questions[r].answer for r in rows], dtype=object),
                "answer_logprob": -np.asarray(losses, np.float64) * scored,
                "label": np.array([self.questions[r].label for r in rows], dtype=object)}

    def predicted(self, model: Any, rows: Any) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """The samples of target "predicted": ``(ids [n, T], labels [n, T], said)``, each question's prompt and
        prefix followed by the model's own greedy answer ``said`` (token ids), labelled on that answer (on the
        end-of-turn token where the model said nothing), so that the loss is the model's on what it said."""
        rows = [int(r) for r in rows]
        said = self._greedy(model, rows)
        sequences = [(self.context(r).tolist(), tokens or [self.pad_id]) for r, tokens in zip(rows, said)]
        width = max(len(context) + len(answer) for context, answer in sequences)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for n, (context, answer) in enumerate(sequences):
            ids[n, :len(context) + len(answer)] = torch.tensor(context + answer)
            labels[n, len(context):len(context) + len(answer)] = torch.tensor(answer)
        return ids, labels, said

    def _greedy(self, model: Any, rows: list[int]) -> list[list[int]]:
        """The greedy answers' tokens, with a budget of the batch's longest reference plus 8 tokens: enough for the
        answer and what follows it on its line."""
        budget = int(self.answer_lengths[rows].max()) + 8
        return greedy_tokens(model, self, rows, max_new_tokens=budget, batch_size=len(rows))

    def _judged(self, rows: list[int], said: list[str]) -> np.ndarray:
        return np.array([matches(answer, self.questions[r].answer) for answer, r in zip(said, rows)], bool)


def _context_ids(tokenizer: Any, question: Question) -> list[int]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": question.prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return _ids(tokenizer, chat + question.prefix)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def normalized(text: str) -> str:
    """An answer as it is compared: lower case, inner whitespace single spaces, punctuation off both ends."""
    return " ".join(text.lower().split()).strip(_PUNCTUATION + " ")


def matches(answer: str, reference: str) -> bool:
    """Whether a model's answer begins with the reference: as numbers where the reference is one (the answer's first
    number compared by value: "12." and "12.0" match "12"), else as :func:`normalized` text (at a word's end)."""
    wanted = _number(normalized(reference))
    if wanted is not None:
        found = _NUMBER.search(answer.replace(",", ""))
        return found is not None and float(found.group()) == wanted
    said, ref = normalized(answer), normalized(reference)
    return said == ref or said.startswith(ref) and not said[len(ref)].isalnum()


def greedy_answers(model: Any, data: QADataset, rows: Any = None, *, max_new_tokens: int = 16,
                   batch_size: int = 16) -> list[str]:
    """The model's greedy continuations of each question's prompt and prefix (:func:`greedy_tokens`), decoded
    without special tokens.

    Args:
        model: a :class:`~paramsal.zoo.hf.TextModel` of a causal LM with its tokenizer (``smollm2-135m``, ``gguf:``).
        data: the questions.
        rows: which questions (default all).
    """
    said = greedy_tokens(model, data, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return model.tokenizer.batch_decode(said, skip_special_tokens=True)


def greedy_tokens(model: Any, data: QADataset, rows: Any = None, *, max_new_tokens: int = 16,
                  batch_size: int = 16) -> list[list[int]]:
    """The model's greedy continuations of each question's prompt and prefix as token ids, a batch at a time with a
    KV cache (the contexts padded on the left and masked), each cut before its first end-of-turn token."""
    rows = list(range(len(data))) if rows is None else [int(r) for r in rows]
    training = model.training
    model.eval()  # greedy answers of the model as it is deployed (no dropout), as every profile is taken
    try:
        return _generated(model, data, rows, max_new_tokens, batch_size)
    finally:
        model.train(training)


def _generated(model: Any, data: QADataset, rows: list[int], max_new_tokens: int,
               batch_size: int) -> list[list[int]]:
    end = model.tokenizer.eos_token_id
    device = next(model.parameters()).device
    said: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            contexts = [data.context(r) for r in rows[start:start + batch_size]]
            width = max(len(c) for c in contexts)
            ids = torch.full((len(contexts), width), data.pad_id, dtype=torch.long)
            mask = torch.zeros((len(contexts), width), dtype=torch.long)
            for n, context in enumerate(contexts):
                ids[n, width - len(context):], mask[n, width - len(context):] = context, 1
            out = model.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=end, pad_token_id=data.pad_id)
            for tokens in out[:, width:].tolist():
                said.append(tokens[:tokens.index(end)] if end in tokens else tokens)
    return said


_PUNCTUATION = ".,;:!?\"'()[]{}"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _number(text: str) -> float | None:
    text = text.replace(",", "")
    return float(text) if _NUMBER.fullmatch(text) else None


def answer_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``([n], [n])`` each reference answer's log-probability given its prompt and prefix (the sum over its tokens)
    and its mean token probability, in float64, from a causal LM's logits ``[n, T, V]`` and the labels ``[n, T]`` of
    :class:`QADataset` (the answer's ids, -100 elsewhere)."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    logprobs = logprobs * scored
    tokens = scored.sum(1).clamp_min(1)
    return logprobs.sum(1).cpu().numpy(), ((logprobs.exp() * scored).sum(1) / tokens).cpu().numpy()
