"""Rollouts: engines that sample completions with behaviour log-probs, and the group collector.

engine         RolloutEngine protocol, GenerateRequest, Completion
local          LocalEngine: in-process transformers model (CPU default, test server model)
scoring        teacher scoring: ScoreRequest, TokenScores, TeacherScorer (cached), align_scores
sglang_client  async HTTP client for SGLang's native API (0.5.23)
sglang_server  launch command, server process, health wait
sglang_engine  SGLangEngine: a pool of launched or attached SGLang servers as a RolloutEngine
sglang_replica one server of the pool: start, health, restart after a death or a hang
sglang_tensors SGLang's flattened-bucket tensor formats (broadcast layout, CUDA-IPC payloads)
store          explorer rollout store (jsonl shards) writer and reader
explorer       fill_store (`s2lpo explore`) and the background ExplorerPrefetcher
collector      GroupCollector: explorer + learner samples of every group, concurrently

This package never imports megatron.
"""

from .collector import GroupCollector
from .engine import Completion, GenerateRequest, RolloutEngine, derive_seed, parse_weight_version
from .explorer import ExplorerPrefetcher, fill_store
from .local import LocalEngine
from .scoring import ScoreRequest, TeacherScorer, TokenScores, align_scores
from .sglang_client import EngineRequestError, SGLangClient
from .sglang_engine import SGLangEngine
from .sglang_server import ServerProcess, build_launch_command
from .store import ExplorerSample, StoreReader, StoreWriter


def build_engine(cfg, *, tokenizer=None, name: str = "engine", seed: int = 0,
                 log_dir: str | None = None) -> RolloutEngine:
    """The engine an `EngineConfig` describes: `local` (in-process) or `sglang` (HTTP; launched
    replica i gets --random-seed seed + i, logs in cfg.log_dir or else `log_dir`)."""
    if cfg.backend == "sglang":
        return SGLangEngine(cfg, name=name, seed=seed, log_dir=cfg.log_dir or log_dir)
    if not cfg.model_path:
        raise ValueError(f"rollout.{name}.model_path is empty: the local engine loads a Hugging Face "
                         "model directory")
    return LocalEngine.from_pretrained(cfg.model_path, tokenizer=tokenizer, seed=seed, dtype=cfg.local_dtype)


def build_prefetcher(cfg, *, explorer: RolloutEngine | None, seed: int = 0) -> ExplorerPrefetcher | None:
    """The explorer-sample supply a `RolloutConfig` describes (None without an explorer store)."""
    if not cfg.explorer_store:
        return None
    reader = StoreReader(cfg.explorer_store, reuse=cfg.reuse_explorer_samples)
    return ExplorerPrefetcher(reader=reader, engine=explorer,
                              sampling=cfg.explorer.sampling if explorer is not None else None,
                              seed=seed, explorer_model=cfg.explorer.model_path)


__all__ = [
    "Completion", "EngineRequestError", "ExplorerPrefetcher", "ExplorerSample", "GenerateRequest",
    "GroupCollector", "LocalEngine", "RolloutEngine", "SGLangClient", "SGLangEngine",
    "ScoreRequest", "ServerProcess", "StoreReader", "StoreWriter", "TeacherScorer", "TokenScores",
    "align_scores", "build_engine", "build_launch_command", "build_prefetcher",
    "derive_seed", "fill_store", "parse_weight_version",
]
