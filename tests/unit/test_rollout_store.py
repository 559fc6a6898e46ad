"""Explorer store (shards, no reuse, cursor resume), fill_store and the background prefetcher."""

import json
import os
import random
import threading

import pytest

from megatron_s2lpo.config.rollout import SamplingConfig
from megatron_s2lpo.rollout.engine import Completion
from megatron_s2lpo.rollout.explorer import LIVE_SAMPLE_INDEX, ExplorerPrefetcher, fill_store
from megatron_s2lpo.rollout.store import ExplorerSample, StoreReader, StoreWriter
from megatron_s2lpo.types import FinishReason, Prompt, Source

pytestmark = pytest.mark.timeout(60)


class FakeEngine:
    """Deterministic in each request's seed; records calls and the threads that made them."""

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self.requests = []
        self.threads = []

    def generate(self, requests):
        self.requests.extend(requests)
        self.threads.append(threading.current_thread().name)
        out = []
        for req in requests:
            rng = random.Random(req.seed)
            tokens = [rng.randrange(4, 100) for _ in range(rng.randint(1, 5))]
            out.append(Completion(request_id=req.request_id, prompt_ids=list(req.prompt_ids),
                                  token_ids=tokens, text=f"t{req.seed}",
                                  logprobs=[-rng.random() for _ in tokens],
                                  finish_reason=FinishReason.STOP, weight_version=self.version))
        return out


def prompts(num: int) -> list[Prompt]:
    return [Prompt(prompt_id=f"p{i}", text=f"q{i}", ground_truth="1", token_ids=[10 + i, 11])
            for i in range(num)]


def completion(i: int, prompt_ids=(1, 2)) -> Completion:
    return Completion(request_id=str(i), prompt_ids=list(prompt_ids), token_ids=[i, i + 1], text=f"r{i}",
                      logprobs=[-0.5, -float(i)], finish_reason=FinishReason.LENGTH, weight_version=0)


def write_store(path, num_prompts=3, per_prompt=4, shard_records=5) -> dict:
    written = {}
    with StoreWriter(str(path), shard_records=shard_records) as writer:
        for j in range(per_prompt):  # interleaved prompts, as a batched fill writes them
            for p in range(num_prompts):
                sample = writer.add(f"p{p}", completion(10 * p + j, prompts(p + 1)[p].token_ids),
                                    explorer_model="explorer-1.7b",
                                    sampling={"temperature": 1.0})
                written.setdefault(f"p{p}", []).append(sample)
    return written


def test_round_trip_over_several_atomic_shards(tmp_path):
    written = write_store(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert not [n for n in names if n.endswith(".tmp")]
    assert [n for n in names if n.endswith(".jsonl")] == [f"shard-{i:06d}.jsonl" for i in range(3)]
    reader = StoreReader(str(tmp_path))
    assert reader.prompt_ids() == ["p0", "p1", "p2"] and reader.num_records == 12
    for prompt_id, samples in written.items():
        assert reader.read_all(prompt_id) == samples
        assert [s.sample_index for s in samples] == [0, 1, 2, 3]
    roll = written["p1"][2].to_rollout(sample_index=6)
    assert (roll.source, roll.sample_index, roll.response_ids) == (Source.EXPLORER, 6, [12, 13])
    with open(tmp_path / "shard-000000.jsonl") as f:
        record = json.loads(f.readline())
    assert set(record) >= {"prompt_id", "sample_index", "prompt_ids", "response_ids", "response_logprobs",
                           "finish_reason", "reward", "explorer_model", "sampling"}


def test_reader_scans_shards_without_index_and_ignores_temporary_files(tmp_path):
    written = write_store(tmp_path)
    for name in os.listdir(tmp_path):
        if name.endswith(".index.json"):
            os.remove(tmp_path / name)
    (tmp_path / "shard-000007.jsonl.tmp").write_text('{"half a record')
    reader = StoreReader(str(tmp_path))
    assert {p: reader.read_all(p) for p in reader.prompt_ids()} == written


def test_writer_appends_to_an_existing_store(tmp_path):
    write_store(tmp_path, per_prompt=2)
    writer = StoreWriter(str(tmp_path), shard_records=100)
    assert writer.num_samples("p0") == 2 and writer.num_samples("new") == 0
    assert writer.add("p0", completion(99)).sample_index == 2
    with pytest.raises(ValueError, match="next sample_index is 3, got 7"):
        writer.append(ExplorerSample(prompt_id="p0", sample_index=7, prompt_ids=[1], response_ids=[],
                                     response_logprobs=[], finish_reason=FinishReason.STOP))
    writer.close()
    assert "shard-000002.jsonl" in os.listdir(tmp_path)
    assert [s.response_ids for s in StoreReader(str(tmp_path)).read_all("p0")][-1] == [99, 100]


def test_duplicate_samples_in_a_store_are_an_error(tmp_path):
    write_store(tmp_path / "a", num_prompts=1, per_prompt=1)
    write_store(tmp_path / "b", num_prompts=1, per_prompt=1)
    os.rename(tmp_path / "b" / "shard-000000.jsonl", tmp_path / "a" / "shard-000001.jsonl")
    with pytest.raises(ValueError, match="prompt 'p0' has sample_index 0 twice"):
        StoreReader(str(tmp_path / "a"))


def test_take_never_reuses_within_a_run(tmp_path):
    written = write_store(tmp_path)
    reader = StoreReader(str(tmp_path))
    first, second = reader.take("p1", 3), reader.take("p1", 1)
    assert first + second == written["p1"]
    assert reader.num_available("p1") == 0 and reader.take("p1", 0) == []
    with pytest.raises(ValueError, match="prompt 'p1' has 4 samples, 4 already used this run, 1 requested"):
        reader.take("p1", 1)
    with pytest.raises(ValueError, match="prompt 'nope' has 0 samples"):
        reader.take("nope", 1)
    cycling = StoreReader(str(tmp_path), reuse=True)
    got = cycling.take("p2", 3) + cycling.take("p2", 3)
    assert [s.sample_index for s in got] == [0, 1, 2, 3, 0, 1]


def test_cursor_state_dict_resumes_exactly(tmp_path):
    write_store(tmp_path)
    run = StoreReader(str(tmp_path))
    run.take("p0", 1)
    run.take("p2", 2)
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
    resumed = StoreReader(str(tmp_path))
    resumed.load_state_dict(state)
    assert resumed.take("p0", 3) == run.take("p0", 3)
    assert resumed.take("p2", 2) == run.take("p2", 2)
    with pytest.raises(ValueError, match="used 9 samples of prompt 'p0' but the store has 4"):
        StoreReader(str(tmp_path)).load_state_dict({"taken": {"p0": 9}})


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="s2lpo explore"):
        StoreReader(str(tmp_path / "missing"))


def test_fill_store_is_deterministic_and_resumable(tmp_path):
    sampling = SamplingConfig(temperature=0.9, max_new_tokens=8)
    engine = FakeEngine()
    stats = fill_store(engine, prompts(3), 2, sampling, str(tmp_path / "a"), explorer_model="x",
                       seed=4, batch_size=4)
    assert stats["num_generated"] == 6
    stats = fill_store(engine, prompts(3) + prompts(1), 5, sampling, str(tmp_path / "a"),
                       explorer_model="x", seed=4, batch_size=4)
    assert stats["num_generated"] == 9  # only the 3 missing samples of each prompt
    fill_store(FakeEngine(), prompts(3), 5, sampling, str(tmp_path / "b"), explorer_model="x", seed=4)
    a, b = StoreReader(str(tmp_path / "a")), StoreReader(str(tmp_path / "b"))
    for prompt_id in ("p0", "p1", "p2"):
        assert a.read_all(prompt_id) == b.read_all(prompt_id)
        assert len(a.read_all(prompt_id)) == 5
    sample = a.read_all("p0")[0]
    assert sample.explorer_model == "x" and sample.sampling["temperature"] == 0.9
    assert "sampling_seed" in sample.sampling


def test_prefetcher_serves_store_then_live_explorer_in_background(tmp_path):
    write_store(tmp_path, num_prompts=3, per_prompt=2)
    live = FakeEngine()
    sampling = SamplingConfig(max_new_tokens=4)
    pre = ExplorerPrefetcher(reader=StoreReader(str(tmp_path)), engine=live, sampling=sampling, seed=1)
    batch = prompts(3)
    pre.submit(1, batch, 2)
    pre.submit(2, batch, 2)
    pre.submit(3, batch, 1)
    step1 = pre.get(1, batch, 2)
    assert [[s.sample_index for s in group] for group in step1] == [[0, 1]] * 3
    assert pre.get(2, batch, 2) and pre.get(3, batch, 1)
    assert pre.num_from_store == 6 and pre.num_live == 9
    assert set(live.threads) == {"explorer-prefetch_0"}  # generated off the caller's thread
    with pytest.raises(ValueError, match="submitted with other prompts"):
        pre.submit(4, batch, 2)
        pre.submit(4, batch[:1], 2)
    pre.close()


def test_prefetcher_cursor_resumes_the_same_samples(tmp_path):
    write_store(tmp_path, num_prompts=2, per_prompt=6)
    batch = prompts(2)
    run = ExplorerPrefetcher(reader=StoreReader(str(tmp_path)))
    run.get(1, batch, 2)
    run.submit(2, batch, 2)  # prefetched, not yet handed out: must not count in the checkpoint
    run.submit(3, batch, 2)
    state = run.state_dict()
    assert state["taken"] == {"p0": 2, "p1": 2}
    expected = [run.get(2, batch, 2), run.get(3, batch, 2)]
    run.close()
    resumed = ExplorerPrefetcher(reader=StoreReader(str(tmp_path)))
    resumed.load_state_dict(state)
    assert [resumed.get(2, batch, 2), resumed.get(3, batch, 2)] == expected
    resumed.close()


def test_prefetcher_without_live_engine_fails_clearly_and_keeps_the_cursor(tmp_path):
    write_store(tmp_path, num_prompts=2, per_prompt=1)
    reader = StoreReader(str(tmp_path))
    pre = ExplorerPrefetcher(reader=reader)
    with pytest.raises(ValueError, match="1 unused samples of prompt 'p0' but step 5 needs 2"):
        pre.get(5, prompts(2), 2)
    assert reader.state_dict()["taken"] == {}
    stored = pre.get(6, prompts(2), 1)
    assert [g[0].sample_index for g in stored] == [0, 0]
    pre.close()
    with pytest.raises(ValueError, match="needs an explorer store reader, a live explorer engine"):
        ExplorerPrefetcher()
    assert LIVE_SAMPLE_INDEX == -1


def test_a_stale_store_sample_is_a_clear_error(tmp_path):
    """A store filled from other prompt tokens (another template or tokenizer) is refused when its
    samples are taken, naming the store and the prompt, before anything is scored or trained."""
    write_store(tmp_path, num_prompts=2, per_prompt=2)
    stale = [Prompt(prompt_id=p.prompt_id, text=p.text, ground_truth="1", token_ids=[7, *p.token_ids])
             for p in prompts(2)]
    pre = ExplorerPrefetcher(reader=StoreReader(str(tmp_path)))
    with pytest.raises(ValueError, match=rf"explorer store {tmp_path}: sample 0 of prompt 'p0' was generated "
                                         "from other prompt tokens.*s2lpo explore"):
        pre.get(1, stale, 2)
    assert [g[0].sample_index for g in pre.get(2, prompts(2), 2)] == [0, 0]  # the cursor did not move
    pre.close()
