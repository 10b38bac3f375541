"""Conversation memory: with `conversation_id`, each request's text and the audio generated for it become
context turns of the next request. Held in memory only (a restart forgets conversations; voices persist), at
most `max_conversations` (the least recently used goes first) each of at most `max_frames` positions (the
oldest turns go first; `serve.context.fit` prunes further to what each request leaves room for). A conversation
untouched for `ttl_seconds` is forgotten."""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from csm_train.layout import Segment
from serve.context import segment_length

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass
class Conversation:
    turns: list[Segment] = field(default_factory=list)
    used: float = field(default_factory=time.monotonic)


class Conversations:
    def __init__(self, tokenizer, max_frames: int, ttl_seconds: float, max_conversations: int):
        self.tokenizer, self.max_frames = tokenizer, max_frames
        self.ttl, self.capacity = ttl_seconds, max_conversations
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def history(self, conversation_id: str) -> list[Segment]:
        with self._lock:
            self._expire()
            item = self._items.get(conversation_id)
            if item is None:
                return []
            item.used = time.monotonic()
            self._items.move_to_end(conversation_id)
            return list(item.turns)

    def append(self, conversation_id: str, turn: Segment) -> int:
        """Add a finished turn; returns the conversation's number of turns."""
        with self._lock:
            self._expire()
            item = self._items.setdefault(conversation_id, Conversation())
            item.turns.append(turn)
            item.used = time.monotonic()
            self._items.move_to_end(conversation_id)
            while sum(segment_length(self.tokenizer, t) for t in item.turns) > self.max_frames:
                item.turns.pop(0)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return len(item.turns)

    def delete(self, conversation_id: str) -> bool:
        with self._lock:
            return self._items.pop(conversation_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl
        while self._items and next(iter(self._items.values())).used < cutoff:
            self._items.popitem(last=False)
