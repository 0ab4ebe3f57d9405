"""Chat data for supervised fine-tuning: JSONL conversations → token ids with an assistant-only loss mask →
packed rows with segment ids → a grain iterator with exact resume (the contract of `train.data`).

File format, one conversation per line (blank lines are ignored):

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Roles are `system`, `user` and `assistant`; any other role is an error naming `file:line` and the role. A line
that is not such an object is an error naming `file:line` (or, with `skip_bad_lines`, skipped and counted). A
conversation without an assistant turn teaches nothing: it is skipped and counted.

A conversation is rendered with a jinja2 chat template (`render_chat`: the tokenizer's
`chat_template`, else `DEFAULT_CHAT_TEMPLATE`) turn by turn: for assistant message i, the text of messages[:i]
with the generation prompt ends where the reply starts, and the text of messages[:i + 1] contains the reply. The
reply's tokens, up to and including its last `eos_token` (the end of turn that makes `generate` stop), are the
only ones the loss sees. Each piece is tokenized on its own, exactly as at inference, where the rendered prompt is
encoded and the reply is generated after it; `eos_token` in a text always becomes the tokenizer's eos id.

Packing: each conversation is one segment (positions from 0, its own segment id), placed whole into the first
row with room (best fit), so attention never crosses conversations; a conversation longer than seq_len + 1
tokens is truncated and counted. Rows are shuffled per epoch by grain, like pretraining windows.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import grain
import numpy as np

from train.data.corpus import batch_iterator
from train.data.sources import CORPORA, DataError, hold_out

ROLES = ("system", "user", "assistant")
BUNDLED_CHAT = {"chat_tiny": CORPORA / "chat_tiny.jsonl"}
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

# The built-in chat format (used when a checkpoint has no chat_template, and by our SFT data): every message is
# "<|role|>\n" + content + eos_token + "\n", and the generation prompt is "<|assistant|>\n". `eos_token` is
# whatever the caller passes to `render_chat` ("" when not given): training text that ends each turn with the
# tokenizer's eos string teaches the model to emit eos, which is where `generate` stops.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render_chat(messages: Sequence[dict], template: str | None = None, add_generation_prompt: bool = True,
                **variables) -> str:
    """Render a conversation ([{"role": ..., "content": ...}, ...]) with a jinja2 chat template, the way
    transformers' `apply_chat_template` does (sandboxed, trim_blocks, lstrip_blocks). `template=None` uses
    DEFAULT_CHAT_TEMPLATE; `variables` (e.g. bos_token, eos_token) are passed to the template, and
    bos_token / eos_token default to ""."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    context = {"bos_token": "", "eos_token": "", **variables}
    return env.from_string(template or DEFAULT_CHAT_TEMPLATE).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **context)


class ChatError(DataError):
    """A chat file or conversation that cannot be used; the message names `file:line` and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    where: str                           # "path:line", for error messages


def chat_path(name: str) -> Path:
    """A bundled chat file name ("chat_tiny") or a path."""
    path = BUNDLED_CHAT.get(name, Path(name).expanduser())
    if not path.is_file():
        raise ChatError(f"chat file {name!r} does not exist; pass a .jsonl path or one of {sorted(BUNDLED_CHAT)}")
    return path


def _check_line(obj) -> str | None:
    """Why a parsed line is not a conversation (None if it is one); roles are checked separately."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return 'not a JSON object with a "messages" list'
    for j, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f'message {j} is not an object with string "role" and "content"'
    return None


def read_chat_jsonl(path: str | Path, *, skip_bad_lines: bool = False) -> tuple[list[Conversation], dict]:
    """The conversations of one JSONL file and counts of what was left out (`bad_lines`, `no_assistant`)."""
    path = Path(path)
    conversations, counts = [], {"bad_lines": 0, "no_assistant": 0}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
                problem = _check_line(obj)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e})"
            if problem is not None:
                if skip_bad_lines:
                    counts["bad_lines"] += 1
                    continue
                raise ChatError(f"{where}: {problem}; fix the line or set sft.skip_bad_lines=true to skip such lines")
            for j, m in enumerate(obj["messages"]):
                if m["role"] not in ROLES:
                    raise ChatError(f"{where}: message {j} has unknown role {m['role']!r}; allowed: {', '.join(ROLES)}")
            if not any(m["role"] == "assistant" for m in obj["messages"]):
                counts["no_assistant"] += 1
                continue
            conversations.append(Conversation(tuple(obj["messages"]), where))
    return conversations, counts


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How conversations become tokens: a chat template and the tokenizer's end-of-turn token.

    `encode(text)` tokenizes text that holds no `eos_token`; `template=None` is DEFAULT_CHAT_TEMPLATE."""
    encode: Callable[[str], list[int]]
    eos_id: int
    eos_token: str
    bos_token: str = ""
    template: str | None = None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        return render_chat(messages, self.template, add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of rendered text; every `eos_token` becomes `eos_id` whatever the tokenizer does with it
        (the byte and GPT-2 tokenizers would spell it out)."""
        pieces = text.split(self.eos_token) if self.eos_token else [text]
        ids = self.encode(pieces[0]) if pieces[0] else []
        for piece in pieces[1:]:
            ids += [self.eos_id] + (self.encode(piece) if piece else [])
        return ids

    def reply_spans(self, messages: Sequence[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The whole rendered conversation and the character span of each assistant reply in it."""
        import jinja2
        try:
            full = self.render(messages, False)
            spans = []
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                prompt = self.render(messages[:i], True)
                upto = full if i == len(messages) - 1 else self.render(messages[:i + 1], False)
                if not (upto.startswith(prompt) and full.startswith(upto)):
                    raise ChatError(f"{where}: the chat template does not render this conversation turn by turn "
                                    f"(the text up to message {i} is not a prefix of the whole), so assistant "
                                    "tokens cannot be located; use a prefix-stable template")
                end = len(upto)
                if self.eos_token and self.eos_token in upto[len(prompt):]:  # stop after the end-of-turn token
                    end = len(prompt) + upto[len(prompt):].rindex(self.eos_token) + len(self.eos_token)
                spans.append((len(prompt), end))
        except jinja2.TemplateError as e:
            raise ChatError(f"{where}: the chat template failed on this conversation: {e}") from e
        return full, spans

    def tokenize(self, messages: Sequence[dict], where: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n], assistant bool [n]): the rendered conversation and which tokens are reply tokens."""
        full, spans = self.reply_spans(messages, where)
        ids, mask, pos = [], [], 0
        for start, end in [*spans, (len(full), len(full))]:
            for text, is_reply in ((full[pos:start], False), (full[start:end], True)):
                piece = self.encode_text(text) if text else []
                ids += piece
                mask += [is_reply] * len(piece)
            pos = end
        return np.asarray(ids, np.int32), np.asarray(mask, bool)


def pack_conversations(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
                       order: Sequence[int] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Rows [R, seq_len] (inputs, targets, segment_ids, positions, loss_mask) holding whole conversations.

    A conversation of n tokens is n - 1 (input, target) pairs; the loss is on targets that are reply tokens. One
    longer than seq_len + 1 tokens keeps its first seq_len + 1 (`truncated` counts them); one left with no reply
    target is dropped (`dropped`). Conversations are placed in `order` (default: as given) into the fullest row
    with room (best fit). Padding has segment id 0 and no loss."""
    items, stats = [], {"truncated": 0, "dropped": 0}
    for k in (range(len(examples)) if order is None else order):
        ids, reply = examples[k]
        if len(ids) > seq_len + 1:
            stats["truncated"] += 1
            ids, reply = ids[:seq_len + 1], reply[:seq_len + 1]
        if len(ids) < 2 or not reply[1:].any():
            stats["dropped"] += 1
            continue
        items.append((ids, reply))
    free, members = [], []  # free: sorted (room left, row); members: conversation indices per row
    for k, (ids, _) in enumerate(items):
        n = len(ids) - 1
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, row = free.pop(j)
        else:
            room, row = seq_len, len(members)
            members.append([])
        members[row].append(k)
        if room > n:
            bisect.insort(free, (room - n, row))
    rows = {key: np.zeros((len(members), seq_len), np.float32 if key == "loss_mask" else np.int32) for key in KEYS}
    for row, ks in enumerate(members):
        col = 0
        for segment, k in enumerate(ks, 1):
            ids, reply = items[k]
            n = len(ids) - 1
            span = slice(col, col + n)
            rows["inputs"][row, span], rows["targets"][row, span] = ids[:-1], ids[1:]
            rows["segment_ids"][row, span], rows["positions"][row, span] = segment, np.arange(n)
            rows["loss_mask"][row, span] = reply[1:]
            col += n
    stats.update(conversations=len(items), rows=len(members), reply_tokens=int(rows["loss_mask"].sum()),
                 fill=float((rows["segment_ids"] > 0).mean()) if members else 0.0)
    return rows, stats


def make_chat_iterator(rows: dict[str, np.ndarray], *, global_batch: int, seed: int, shuffle: bool = True,
                       process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """An endless iterator of this process's rows of each global batch over packed rows, built by
    `train.data.batch_iterator` (whose `iterator_state` / `restore_iterator` apply)."""
    n = len(rows["inputs"])
    return batch_iterator(n, lambda ids: {k: v[ids] for k, v in rows.items()}, global_batch=global_batch,
                          seed=seed, shuffle=shuffle, process_index=process_index, process_count=process_count,
                          what=f"conversations packed into {n} rows of seq_len tokens")


def val_batches(rows: dict[str, np.ndarray], batch_size: int, max_batches: int | None = None) -> list[dict]:
    """Fixed validation batches over packed rows; the last is filled with empty rows (no loss), so a small
    held-out set still gives a batch."""
    n = len(rows["inputs"])
    if n == 0:
        raise DataError("the validation conversations pack into no rows; hold out more (sft.val_fraction) or "
                        "give sft.val_file")
    count = -(-n // batch_size) if max_batches is None else min(-(-n // batch_size), max_batches)
    padded = {k: np.concatenate([v, np.zeros((count * batch_size - n, *v.shape[1:]), v.dtype)])
              if count * batch_size > n else v for k, v in rows.items()}
    return [{k: v[b * batch_size:(b + 1) * batch_size] for k, v in padded.items()} for b in range(count)]


@dataclasses.dataclass
class ChatData:
    train: dict[str, np.ndarray]         # packed rows
    val: dict[str, np.ndarray]
    stats: dict                          # counts per split: conversations, truncated, dropped, rows, ...


def load_chat_data(fmt: ChatFormat, *, train_file: str, val_file: str = "", val_fraction: float = 0.1,
                   seq_len: int, seed: int, skip_bad_lines: bool = False) -> ChatData:
    """Read, tokenize and pack the train and validation conversations (train order shuffled by `seed`)."""
    conversations, counts = read_chat_jsonl(chat_path(train_file), skip_bad_lines=skip_bad_lines)
    if val_file:
        val, val_counts = read_chat_jsonl(chat_path(val_file), skip_bad_lines=skip_bad_lines)
        counts = {k: counts[k] + val_counts[k] for k in counts}
        train = conversations
    else:
        if len(conversations) < 2:
            raise ChatError(f"{train_file}: {len(conversations)} usable conversation(s); need at least 2 to hold "
                            "one out for validation (or give sft.val_file)")
        train, val = hold_out(conversations, val_fraction)
    if not train or not val:
        raise ChatError(f"no usable conversations in {train_file if not train else val_file}")
    train_rows, train_stats = pack_conversations(
        [fmt.tokenize(c.messages, c.where) for c in train], seq_len,
        order=np.random.default_rng(seed).permutation(len(train)))
    val_rows, val_stats = pack_conversations([fmt.tokenize(c.messages, c.where) for c in val], seq_len)
    return ChatData(train_rows, val_rows, {**counts, "train": train_stats, "val": val_stats})
