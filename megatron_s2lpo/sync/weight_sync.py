"""`WeightSync`: push the learner's weights into its rollout engine, verify the version, check parity.

    sync = WeightSync.from_learner(learner, engine, run_config.sync, temperature=sampling.temperature)
    result = sync.sync(version=step)       # on EVERY learner rank, collectively
    log(result.metrics())                  # sync/seconds, sync/gb_per_s, parity/mean_abs_logp_diff, ...

What runs where:
  - every rank of the driver's data-parallel replica (dp_rank 0: all its TP and PP ranks) runs
    the exporter, whose collectives gather TP shards and PP stages into full HF tensors;
  - the driver, global rank 0, alone talks to the engine: it pushes the buckets through the
    transport, then checks the engine's weight version; the other replicas hold the same
    weights and skip the export;
  - the outcome (a `SyncResult` or the driver's error) is broadcast, so every rank returns the
    same result or raises the same error.

Every bucket is checked against the learner's architecture before it is sent (bucket_rules.py:
HF names, shapes, floating dtypes): a malformed bucket can take a real SGLang server down or be
skipped by it while it reports the new version, so it never leaves the trainer.

Version protocol: `sync(version)` needs an integer greater than the last synced version and
than the engine's current one. The transport sends it with the weights; afterwards the
engine's `weight_version` and, for an SGLang engine, EVERY replica's `/model_info`
`weight_version` must equal it, else `WeightVersionError` names the replicas and versions.
For an SGLang engine the push and this check run with generation paused on every replica
(`SGLangEngine.paused`: requests aborted by the pause are resubmitted afterwards, so each
completion comes from one version), and generation continues only once every replica holds
the new version. Every `sync.parity_every`-th sync ends with the parity check (parity.py), on
one replica per check, rotating; a failure names the replica.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.convert.export import takes_part_in_export

from .base import TransportContext
from .bucket_rules import BucketRules
from .collective import run_on_driver
from .errors import WeightVersionError
from .exporter import Bucket, Exporter, MegatronExporter
from .parity import LogProbLearner, ParityReport, check_parity
from .transports import TRANSPORTS, build_transport, describe_engine, engine_kind, route


@dataclass(kw_only=True, slots=True)
class SyncResult:
    version: int
    transport: str  # the TRANSPORTS key that ran (e.g. "buckets" for disk + an in-process engine)
    num_bytes: int  # HF tensor bytes pushed
    num_buckets: int
    seconds: float  # export + push + version check, on the driver
    path: str | None = None  # disk transport: the directory the engine loaded
    parity: ParityReport | None = None

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def metrics(self) -> dict[str, float]:
        out = {"sync/seconds": self.seconds, "sync/gb_per_s": self.gb_per_s, "sync/bytes": float(self.num_bytes),
               "sync/buckets": float(self.num_buckets), "sync/version": float(self.version)}
        if self.parity is not None:
            out.update(self.parity.metrics())
        return out


def reported_versions(engine: Any) -> dict[str, int]:
    """Every version the engine reports: its `weight_version`, and each server's own answer
    (`/model_info` of every replica, by replica name)."""
    versions = {"weight_version": int(engine.weight_version)}
    if callable(getattr(engine, "replica_versions", None)):
        versions.update({f"{name} /model_info": v for name, v in engine.replica_versions().items()})
    elif engine_kind(engine) == "server":
        from megatron_s2lpo.rollout.engine import parse_weight_version

        info = engine.get_model_info()
        versions["model_info"] = parse_weight_version(info.get("weight_version"), where=describe_engine(engine))
    return versions


def verify_version(engine: Any, version: int) -> None:
    """WeightVersionError unless every version the engine reports equals `version`."""
    wrong = {where: v for where, v in reported_versions(engine).items() if v != version}
    if wrong:
        raise WeightVersionError(
            f"{describe_engine(engine)} reports weight version {wrong} after a push of version {version}; "
            "the update did not take effect (or another writer changed the version): check the engine's "
            "log, then sync again")


class WeightSync:
    """Learner -> rollout engine weight sync. Construct and call it on every learner rank.

    model_chunks / groups / arch: the learner's bare or wrapped megatron chunks, its
    `ParallelGroups`, its `ModelArch`. engine: the rollout engine (read on the driver rank
    only; other ranks may pass None). learner: anything with `compute_logprobs(batch,
    temperature)`, needed when `config.parity_every > 0`. temperature: the rollout sampling
    temperature (the parity check compares log-probs at it). hf_config_dir: a HF model
    directory whose config.json / tokenizer files the disk transport copies (else config.json
    is written from `arch`). transport: a `TRANSPORTS` key that overrides the routing of
    `config.transport` (e.g. "disk" to write files for an in-process engine). exporter: the
    bucket source, by default the megatron export of `model_chunks`.
    """

    def __init__(self, model_chunks: Sequence[Any] | None, groups: Any, arch: ModelArch, engine: Any,
                 config: SyncConfig, *, learner: LogProbLearner | None = None, temperature: float = 1.0,
                 hf_config_dir: str | None = None, transport: str | None = None,
                 exporter: Exporter | None = None) -> None:
        if config.parity_every > 0 and learner is None:
            raise ValueError(f"sync.parity_every={config.parity_every} needs the learner to recompute log-probs: "
                             "build WeightSync.from_learner(...) or pass learner=, or set sync.parity_every=0")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (the rollout sampling temperature), got {temperature}")
        if exporter is None and model_chunks is None:
            raise ValueError("pass the learner's model_chunks (or an exporter)")
        self.groups = groups
        self.arch = arch
        self.engine = engine
        self.config = config
        self.learner = learner
        self.temperature = temperature
        self.is_driver = groups.rank == 0
        # the driver's replica (with EP, the ranks holding its experts too); the others hold the same weights
        self.exports = takes_part_in_export(groups) if model_chunks else groups.dp_rank == 0
        self.exporter = exporter or MegatronExporter(model_chunks, groups, arch, config.bucket_bytes)
        self.version: int | None = None  # the last version synced by this object
        self.num_syncs = 0
        self.num_parity_checks = 0  # picks the replica of the next check
        self._transport: Any = None
        self.rules = BucketRules.from_arch(arch)  # every bucket is checked before it is sent (bucket_rules.py)
        context = TransportContext(arch=arch, hf_config_dir=hf_config_dir)
        self.transport_name = run_on_driver(lambda: self._open_transport(transport, context), groups)

    @classmethod
    def from_learner(cls, learner: Any, engine: Any, config: SyncConfig, **kwargs: Any) -> "WeightSync":
        """From a `learner.Learner`: its policy chunks, groups and arch; it also serves parity."""
        return cls(learner.policy_chunks, learner.groups, learner.arch, engine, config, learner=learner, **kwargs)

    def _open_transport(self, forced: str | None, context: TransportContext) -> str:
        if self.engine is None:
            raise ValueError("WeightSync on the driver rank (global rank 0) needs the rollout engine; got None")
        name = forced if forced is not None else route(self.config.transport, self.engine)
        self._transport = build_transport(name, self.engine, self.config, context)
        return name

    def _buckets(self) -> Iterator[Bucket]:
        if not self.exports:
            return iter(())
        flat = TRANSPORTS[self.transport_name].flat
        return self.exporter.flat_buckets() if flat else self.exporter.buckets()

    def sync(self, version: int, *, resume: bool = False) -> SyncResult:
        """Export, push, verify the version, and every `parity_every` syncs check parity.

        resume: the first push after a resume. The engine may then report a LATER version than
        `version` (attached servers that a run updated past its last checkpoint keep that
        version): the checkpoint's weights replace those, under the checkpoint's version."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"weight version must be an integer >= 1 (0 is the initial weights), got {version!r}")
        if self.version is not None and version <= self.version:
            raise ValueError(f"weight version {version} does not increase: the last sync pushed {self.version}")
        start = time.perf_counter()
        buckets = self._buckets()
        if not self.is_driver:
            for _ in buckets:  # the export's collectives need every rank of the replica
                pass

        def push() -> SyncResult:
            try:
                before = int(self.engine.weight_version)
                if version <= before and not resume:
                    raise ValueError(f"weight version {version} does not increase: "
                                     f"{describe_engine(self.engine)} already reports {before}")
                self.engine.onload()  # a colocated server takes back the memory it freed for training
                with _paused(self.engine):  # every replica verified before generation continues
                    stats = self._transport.push(self.rules.checked(buckets), version)
                    verify_version(self.engine, version)
            finally:
                for _ in buckets:  # after a failure, finish the export the other ranks are in
                    pass
            return SyncResult(version=version, transport=self.transport_name, num_bytes=stats.num_bytes,
                              num_buckets=stats.num_buckets, seconds=time.perf_counter() - start, path=stats.path)

        result = run_on_driver(push, self.groups)
        self.version = version
        self.num_syncs += 1
        every = self.config.parity_every
        if every > 0 and self.num_syncs % every == 0:
            result.parity = self.check_parity()
        return result

    def check_parity(self) -> ParityReport:
        """The parity check now (all ranks); WeightParityError above `sync.parity_threshold`.

        An SGLang engine is checked on one replica per call, rotating over its replicas."""
        if self.learner is None:
            raise ValueError("the parity check needs the learner: build WeightSync.from_learner(...) or pass learner=")
        engine = self.engine
        if self.is_driver and callable(getattr(engine, "replica_engine", None)):
            engine = engine.replica_engine(self.num_parity_checks)
        self.num_parity_checks += 1
        return check_parity(engine, self.learner, self.groups, vocab_size=self.arch.vocab_size,
                            num_sequences=self.config.parity_num_sequences,
                            max_new_tokens=self.config.parity_max_new_tokens,
                            threshold=self.config.parity_threshold, temperature=self.temperature,
                            version=self.version)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _paused(engine: Any) -> Any:
    """The engine's `paused()` (SGLang: every replica), or nothing for an in-process engine."""
    paused = getattr(engine, "paused", None)
    return paused() if callable(paused) else contextlib.nullcontext()
