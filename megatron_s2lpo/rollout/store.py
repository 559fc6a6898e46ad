"""Explorer rollout store: pre-generated samples of the frozen explorer, on disk.

The explorer never changes during training, so its rollouts can be generated once (`s2lpo
explore`, see `fill_store`) and read back at each step instead of occupying a server.

Layout of a store directory:

    shard-000000.jsonl          one JSON record per line (see ExplorerSample.to_json)
    shard-000000.index.json     {"records": [[prompt_id, sample_index, byte_offset, byte_len]]}
    shard-000001.jsonl ...

Shards are immutable: the writer buffers records and writes each flush as a new shard to a
temporary name, fsyncs it and renames it into place, so a reader never sees half a shard. The
index is a cache written the same way right after its shard; a shard without one (a crash in
between, or a hand-made jsonl) is scanned when opened. Within a store (prompt_id,
sample_index) is unique; sample_index counts a prompt's samples from 0 in the order written.

The reader hands out samples with `take(prompt_id, n)`: the next n unused samples of that
prompt in sample_index order. A sample is never handed out twice in a run unless the reader
is opened with `reuse=True` (then a prompt's samples are cycled). The cursor (samples taken
per prompt) is saved and restored with `state_dict` / `load_state_dict` for exact resume.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
from dataclasses import dataclass, field

from ..types import FinishReason, Rollout, Source
from ..utils.files import write_atomic
from .engine import Completion

SHARD_RE = re.compile(r"^shard-(\d{6})\.jsonl$")
INDEX_SUFFIX = ".index.json"


@dataclass(kw_only=True, slots=True)
class ExplorerSample:
    """One stored explorer completion of one prompt."""

    prompt_id: str
    sample_index: int  # the prompt's n-th stored sample (not its place in a training group)
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    finish_reason: FinishReason
    text: str = ""
    reward: float | None = None
    explorer_model: str = ""
    sampling: dict = field(default_factory=dict)  # SGLang sampling_params it was drawn with
    weight_version: int = 0

    def __post_init__(self) -> None:
        if len(self.response_logprobs) != len(self.response_ids):
            raise ValueError(f"explorer sample {self.prompt_id}/{self.sample_index}: "
                             f"{len(self.response_ids)} response tokens but "
                             f"{len(self.response_logprobs)} log-probs")

    @classmethod
    def from_completion(cls, comp: Completion, *, prompt_id: str, sample_index: int,
                        explorer_model: str = "", sampling: dict | None = None) -> "ExplorerSample":
        return cls(prompt_id=prompt_id, sample_index=sample_index, prompt_ids=list(comp.prompt_ids),
                   response_ids=list(comp.token_ids), response_logprobs=list(comp.logprobs),
                   finish_reason=comp.finish_reason, text=comp.text, explorer_model=explorer_model,
                   sampling=dict(sampling or {}), weight_version=comp.weight_version)

    def to_rollout(self, *, sample_index: int) -> Rollout:
        """As a Rollout at position `sample_index` of a training group."""
        return Rollout(prompt_id=self.prompt_id, sample_index=sample_index, source=Source.EXPLORER,
                       prompt_ids=list(self.prompt_ids), response_ids=list(self.response_ids),
                       response_logprobs=list(self.response_logprobs),
                       finish_reason=self.finish_reason, weight_version=self.weight_version,
                       text=self.text, reward=self.reward)

    def to_json(self) -> dict:
        return {
            "prompt_id": self.prompt_id, "sample_index": self.sample_index,
            "prompt_ids": self.prompt_ids, "response_ids": self.response_ids,
            "response_logprobs": self.response_logprobs, "finish_reason": self.finish_reason.value,
            "text": self.text, "reward": self.reward, "explorer_model": self.explorer_model,
            "sampling": self.sampling, "weight_version": self.weight_version,
        }

    @classmethod
    def from_json(cls, data: dict, *, where: str) -> "ExplorerSample":
        missing = [k for k in ("prompt_id", "sample_index", "prompt_ids", "response_ids",
                               "response_logprobs", "finish_reason") if k not in data]
        if missing:
            raise ValueError(f"{where}: record lacks fields {missing}")
        try:
            reason = FinishReason(data["finish_reason"])
        except ValueError:
            raise ValueError(f"{where}: finish_reason {data['finish_reason']!r} is not one of "
                             f"{[r.value for r in FinishReason]}") from None
        return cls(prompt_id=str(data["prompt_id"]), sample_index=int(data["sample_index"]),
                   prompt_ids=list(data["prompt_ids"]), response_ids=list(data["response_ids"]),
                   response_logprobs=[float(x) for x in data["response_logprobs"]],
                   finish_reason=reason, text=data.get("text", ""), reward=data.get("reward"),
                   explorer_model=data.get("explorer_model", ""),
                   sampling=dict(data.get("sampling") or {}),
                   weight_version=int(data.get("weight_version", 0)))


# (prompt_id, sample_index, shard path, byte offset, byte length)
_Entry = tuple[str, int, str, int, int]


def _shard_paths(store_dir: str) -> list[str]:
    names = sorted(n for n in os.listdir(store_dir) if SHARD_RE.match(n))
    return [os.path.join(store_dir, n) for n in names]


def _index_shard(path: str) -> list[_Entry]:
    """Entries of one shard: from its index file, or by scanning the shard."""
    index_path = path[: -len(".jsonl")] + INDEX_SUFFIX
    if os.path.isfile(index_path):
        with open(index_path) as f:
            return [(str(p), int(i), path, int(o), int(n)) for p, i, o, n in json.load(f)["records"]]
    entries = []
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    entries.append((str(rec["prompt_id"]), int(rec["sample_index"]), path, offset, len(line)))
                except (ValueError, KeyError) as err:
                    raise ValueError(f"{path}:{line_no}: not a store record ({err})") from None
            offset += len(line)
    return entries


def _scan(store_dir: str) -> dict[str, list[_Entry]]:
    """prompt_id -> its entries sorted by sample_index (duplicates are an error)."""
    by_prompt: dict[str, list[_Entry]] = {}
    for path in _shard_paths(store_dir):
        for entry in _index_shard(path):
            by_prompt.setdefault(entry[0], []).append(entry)
    for prompt_id, entries in by_prompt.items():
        entries.sort(key=lambda e: e[1])
        for a, b in itertools.pairwise(entries):
            if a[1] == b[1]:
                raise ValueError(f"explorer store {store_dir}: prompt {prompt_id!r} has sample_index "
                                 f"{a[1]} twice ({a[2]} and {b[2]})")
    return by_prompt


class StoreWriter:
    """Appends samples to a store directory (new or existing) as atomic shard files."""

    def __init__(self, store_dir: str, *, shard_records: int = 4096) -> None:
        if shard_records < 1:
            raise ValueError(f"shard_records must be >= 1, got {shard_records}")
        os.makedirs(store_dir, exist_ok=True)
        self.store_dir = store_dir
        self.shard_records = shard_records
        existing = _scan(store_dir)
        self._next_index = {p: e[-1][1] + 1 for p, e in existing.items()}
        paths = _shard_paths(store_dir)
        self._next_shard = int(SHARD_RE.match(os.path.basename(paths[-1])).group(1)) + 1 if paths else 0
        self._buffer: list[ExplorerSample] = []

    def num_samples(self, prompt_id: str) -> int:
        """Samples of `prompt_id` written so far (flushed or buffered)."""
        return self._next_index.get(prompt_id, 0)

    def add(self, prompt_id: str, comp: Completion, *, explorer_model: str = "",
            sampling: dict | None = None) -> ExplorerSample:
        """Append a completion as the prompt's next sample."""
        sample = ExplorerSample.from_completion(comp, prompt_id=prompt_id,
                                                sample_index=self.num_samples(prompt_id),
                                                explorer_model=explorer_model, sampling=sampling)
        self.append(sample)
        return sample

    def append(self, sample: ExplorerSample) -> None:
        expected = self.num_samples(sample.prompt_id)
        if sample.sample_index != expected:
            raise ValueError(f"explorer store {self.store_dir}: prompt {sample.prompt_id!r} next "
                             f"sample_index is {expected}, got {sample.sample_index}; use add()")
        self._buffer.append(sample)
        self._next_index[sample.prompt_id] = expected + 1
        if len(self._buffer) >= self.shard_records:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one new shard (shard first, then its index)."""
        if not self._buffer:
            return
        stem = os.path.join(self.store_dir, f"shard-{self._next_shard:06d}")
        lines, records, offset = [], [], 0
        for sample in self._buffer:
            line = (json.dumps(sample.to_json(), separators=(",", ":")) + "\n").encode()
            records.append([sample.prompt_id, sample.sample_index, offset, len(line)])
            lines.append(line)
            offset += len(line)
        write_atomic(stem + ".jsonl", b"".join(lines))
        write_atomic(stem + INDEX_SUFFIX, json.dumps({"records": records}))
        self._next_shard += 1
        self._buffer.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StoreReader:
    """Hands out stored samples per prompt, each at most once per run (unless `reuse`)."""

    def __init__(self, store_dir: str, *, reuse: bool = False) -> None:
        if not os.path.isdir(store_dir):
            raise FileNotFoundError(f"explorer store {store_dir} does not exist; create it with "
                                    "`s2lpo explore` (fill_store)")
        self.store_dir = store_dir
        self.reuse = reuse
        self._entries = _scan(store_dir)
        self._taken: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def num_records(self) -> int:
        return sum(len(e) for e in self._entries.values())

    def prompt_ids(self) -> list[str]:
        return sorted(self._entries)

    def num_samples(self, prompt_id: str) -> int:
        return len(self._entries.get(prompt_id, ()))

    def num_available(self, prompt_id: str) -> int:
        """Samples `take` can still return for the prompt (reuse: any number if it has one)."""
        count = self.num_samples(prompt_id)
        if self.reuse and count:
            return 2**62
        return count - self._taken.get(prompt_id, 0)

    def take(self, prompt_id: str, num: int) -> list[ExplorerSample]:
        """The prompt's next `num` unused samples, in sample_index order."""
        with self._lock:
            count = self.num_samples(prompt_id)
            taken = self._taken.get(prompt_id, 0)
            if num and (count == 0 or (not self.reuse and taken + num > count)):
                raise ValueError(
                    f"explorer store {self.store_dir}: prompt {prompt_id!r} has {count} samples, "
                    f"{taken} already used this run, {num} requested; generate more with "
                    "fill_store or open the store with reuse=True")
            entries = self._entries.get(prompt_id, [])
            picked = [entries[(taken + i) % count] for i in range(num)]
            self._taken[prompt_id] = taken + num
        return [self._read(e) for e in picked]

    def read_all(self, prompt_id: str) -> list[ExplorerSample]:
        """Every stored sample of a prompt (does not move the cursor)."""
        return [self._read(e) for e in self._entries.get(prompt_id, [])]

    def state_dict(self) -> dict:
        with self._lock:
            return {"taken": dict(self._taken), "reuse": self.reuse}

    def load_state_dict(self, state: dict) -> None:
        taken = {str(k): int(v) for k, v in state["taken"].items()}
        for prompt_id, num in taken.items():
            count = self.num_samples(prompt_id)
            if count == 0 or (not self.reuse and num > count):
                raise ValueError(f"explorer store {self.store_dir}: the saved cursor used {num} samples "
                                 f"of prompt {prompt_id!r} but the store has {count}; resume with the "
                                 "store the run started with")
        with self._lock:
            self._taken = taken

    def _read(self, entry: _Entry) -> ExplorerSample:
        prompt_id, sample_index, path, offset, length = entry
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.read(length)
        where = f"{path} (prompt {prompt_id!r}, sample {sample_index})"
        try:
            data = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where}: unreadable record ({err}); was the shard modified?") from None
        return ExplorerSample.from_json(data, where=where)

