"""A file of training results keyed by everything that determines them, shared by the quality benchmarks
(census_quality.py, synthetic.py) so that an interrupted command resumes where it stopped and more seeds
add to the runs already made instead of repeating them."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


class RunCache:
    """Training results keyed by everything that determines them; saved after every run (merged with what
    other commands saved to the same file meanwhile, so two commands can share it)."""

    def __init__(self, path, fresh=False):
        self.path = Path(path)
        self.fresh = fresh
        self.computed = set()  # keys computed by this instance: with `fresh`, the only ones it reuses
        self.runs = {} if fresh or not self.path.exists() else self._read()

    def _read(self) -> dict:
        try:
            runs = json.loads(self.path.read_text())
        except (ValueError, OSError) as err:
            raise ValueError(f"{self.path}: not a run cache ({err}); move it aside, or pass --fresh") from None
        if not isinstance(runs, dict):
            raise ValueError(f"{self.path}: not a run cache (a JSON mapping); move it aside, or pass --fresh")
        return runs

    def get(self, key, compute):
        text = json.dumps(key, sort_keys=True)
        if text in self.runs and (not self.fresh or text in self.computed):
            return self.runs[text]
        result = compute()
        # Re-read before writing: another command may have added runs to the same file meanwhile (with
        # `fresh` that brings old runs back into `runs`, which is why `computed` decides what is reused).
        # The lock makes read-merge-write one step, so two commands finishing a run together lose neither.
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.runs.update(self._read())
            self.runs[text] = result
            self.computed.add(text)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.runs, indent=0))
            tmp.replace(self.path)
        return result
