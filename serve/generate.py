"""Token-by-token generation: sampling, incremental detokenization, stop handling, batched decoding.

Everything here is synchronous; :mod:`serve.engine` runs it on a worker thread.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

PREFIX_TOKENS = 4  # prompt tokens decoded with the output so the first piece keeps its leading space


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: ``temperature`` 0 is greedy; ``stop`` sequences end the text before them."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """New text since the previous chunk, tokens generated so far, and why generation ended (or None)."""

    text: str
    tokens: int
    finish_reason: str | None = None


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from ``logits [V]``: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # the smallest head whose mass reaches top_p
        return int(order[torch.multinomial(sorted_p * keep, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """Text of the generated tokens, released piece by piece.

    Text that could still become a stop sequence, or that ends in an incomplete UTF-8
    character, is held back until it is decided; a stop sequence cuts the text before it.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._prefix = list(prompt_ids[-PREFIX_TOKENS:])
        self._prefix_text = self._decode(self._prefix)
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._sent = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; return the text now safe to send and whether a stop sequence was hit."""
        self._ids.append(token)
        full = self._decode(self._prefix + self._ids)
        text = full[len(self._prefix_text):] if full.startswith(self._prefix_text) else self._decode(self._ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.text = text[:cut]
            return self.flush(), True
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        safe -= self._partial_stop(text[:safe])
        if safe <= self._sent:
            return "", False
        delta, self._sent = text[self._sent:safe], safe
        return delta, False

    def flush(self) -> str:
        """Everything not yet sent (held-back text is final once generation ends)."""
        delta, self._sent = self.text[self._sent:], len(self.text)
        return delta

    def _find_stop(self, text: str) -> int | None:
        start = max(0, self._sent - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop sequence."""
        return max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class _Row:
    """One request inside a batch: its sampler, its text, its token count."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        self.detok = Detokenizer(tokenizer, prompt_ids, params.stop)
        self.tokens = 0

    def advance(self, token: int, eos_ids: frozenset[int]) -> Chunk | None:
        """Take the row's next token; the chunk to send, if any (a finishing chunk ends the row)."""
        self.tokens += 1
        if token in eos_ids:
            return Chunk(self.detok.flush(), self.tokens, "stop")
        text, stopped = self.detok.push(token)
        if stopped:
            return Chunk(text, self.tokens, "stop")
        if self.tokens == self.params.max_tokens:
            return Chunk(text + self.detok.flush(), self.tokens, "length")
        return Chunk(text, self.tokens) if text else None


def stream_batch(model: torch.nn.Module, tokenizer, requests: Sequence[tuple[Sequence[int], SamplingParams]],
                 eos_ids: frozenset[int], active: Callable[[int], bool] = lambda i: True
                 ) -> Iterator[tuple[int, Chunk]]:
    """Generate for several requests at once: ``(request index, chunk)`` pairs as text becomes ready.

    Prompts are left-padded into one batch that shares a KV cache; each request samples with
    its own parameters and seed, and leaves the batch when it finishes or ``active(i)`` turns
    False (then it gets no finishing chunk). A request's last chunk carries ``finish_reason``
    "stop" (EOS or a stop sequence) or "length".
    """
    device = next(model.parameters()).device
    rows = [_Row(tokenizer, ids, params) for ids, params in requests]
    width = max(len(ids) for ids, _ in requests)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, _) in enumerate(requests):
        input_ids[i, width - len(ids):] = torch.tensor(list(ids))
        mask[i, width - len(ids):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    live = list(range(len(rows)))  # request index of each batch row
    cache = None
    with torch.inference_mode():
        while live:
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1].float().cpu()
            tokens, keep = [], []
            for b, i in enumerate(live):
                row = rows[i]
                token = sample_next(logits[b], row.params.temperature, row.params.top_p, row.generator)
                chunk = row.advance(token, eos_ids)
                if chunk is not None:
                    yield i, chunk
                if (chunk is None or chunk.finish_reason is None) and active(i):
                    tokens.append(token)
                    keep.append(b)
            if len(keep) < len(live):
                live = [live[b] for b in keep]
                if not live:
                    return
                index = torch.tensor(keep)
                cache.batch_select_indices(index.to(device))
                mask = mask[index]
                positions = positions[index]
            input_ids = torch.tensor(tokens).unsqueeze(1)
            mask = torch.cat([mask, torch.ones(len(live), 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
