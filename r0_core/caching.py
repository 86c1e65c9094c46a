"""A bounded cache of loaded models: the most recently used stay loaded, the least recently used are dropped.

The pack's pipelines and reward scorers live outside any host's model management (ComfyUI's included), so this is
the rule that keeps them from piling up: at most `$<env>` entries (a default per cache), most recently used last.
"""
from __future__ import annotations

import gc
import os
from collections import OrderedDict
from typing import Callable, Optional


class ModelCache(OrderedDict):
    def __init__(self, env: str, default: int, on_drop: Optional[Callable[[], None]] = None):
        super().__init__()
        self.env, self.default, self.on_drop = env, default, on_drop

    def limit(self) -> int:
        value = os.environ.get(self.env, str(self.default))
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{self.env}={value!r}: expected a whole number of models to keep loaded, 1 or more")
        return int(value)

    def get_or_load(self, key, load: Callable[[], object]):
        """The entry for `key`, loaded by `load()` if absent; older entries beyond the limit are dropped."""
        limit = self.limit()
        if key not in self:
            self.drop(limit - 1)   # before loading: the new model needs the room
            self[key] = load()
        self.move_to_end(key)
        self.drop(limit)
        return self[key]

    def drop(self, keep: int) -> None:
        """Drop the least recently used entries until `keep` remain, then free their memory."""
        if len(self) <= keep:
            return
        while len(self) > keep:
            self.popitem(last=False)
        gc.collect()
        if self.on_drop is not None:
            self.on_drop()
