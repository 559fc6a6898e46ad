"""LocalEngine: SGLang-style sampling, exact behaviour log-probs, weight updates."""

import math
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.rollout import EngineConfig
from megatron_s2lpo.rollout import build_engine
from megatron_s2lpo.rollout.engine import GenerateRequest, RolloutEngine
from megatron_s2lpo.rollout.local import LocalEngine, support_mask
from megatron_s2lpo.types import FinishReason

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


def tiny_engine(tok, init_seed=0, **kwargs) -> LocalEngine:
    arch = ModelArch(family="qwen3", vocab_size=len(tok), hidden_size=32, ffn_hidden_size=64,
                     num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=8,
                     qk_layernorm=True)
    return LocalEngine.from_arch(arch, tokenizer=tok, init_seed=init_seed, **kwargs)


@pytest.fixture(scope="module")
def engine(tok):
    return tiny_engine(tok)


def teacher_forced_logprobs(model, prompt_ids, token_ids, temperature) -> list[float]:
    """Slow reference: one full forward pass over prompt+response, float64 log-softmax."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    start = len(prompt_ids) - 1
    return [logp[start + i, t].item() for i, t in enumerate(token_ids)]


def brute_force_support(probs, top_k, top_p) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for rank, idx in enumerate(order):
        if rank < top_k and mass <= top_p + 1e-12:
            keep.add(idx)
        mass += probs[idx]
    return keep


def test_support_mask_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 13, generator=gen) * 2, dim=-1)
    top_k = torch.tensor([13, 1, 3, 13, 5, 2])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.8, 0.01])
    mask = support_mask(probs, top_k, top_p)
    for row in range(6):
        expected = brute_force_support(probs[row].tolist(), int(top_k[row]), float(top_p[row]))
        assert set(torch.nonzero(mask[row]).flatten().tolist()) == expected, row


def test_logprobs_equal_teacher_forced_pass(engine, tok):
    prompts = ["12+7=", "What is 3*4? ", "x"]  # different lengths: left padding in one batch
    reqs = [GenerateRequest(request_id=f"r{i}", prompt_ids=tok.encode(p), temperature=0.7,
                            top_p=0.9, top_k=40, max_new_tokens=24, seed=100 + i)
            for i, p in enumerate(prompts)]
    for comp in engine.generate(reqs):
        assert len(comp.token_ids) == len(comp.logprobs) > 0
        ref = teacher_forced_logprobs(engine.model, comp.prompt_ids, comp.token_ids, 0.7)
        assert max(abs(a - b) for a, b in zip(ref, comp.logprobs, strict=True)) < 1e-5
        # Log-probs are pre-filter: the sampled tokens' log-probs are not renormalised over
        # the top-p support (they are <= 0 and their exp sums below 1 per step in general).
        assert all(lp <= 0 for lp in comp.logprobs)


def test_seeded_sampling_is_deterministic(engine, tok):
    reqs = [GenerateRequest(request_id=str(i), prompt_ids=tok.encode("1+1="), max_new_tokens=16,
                            seed=i % 2) for i in range(4)]
    first, second = engine.generate(reqs), engine.generate(reqs)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert first[0].token_ids == first[2].token_ids  # same seed, same prompt
    assert first[0].token_ids != first[1].token_ids


def test_engine_seed_makes_unseeded_runs_reproducible(tok):
    reqs = [GenerateRequest(request_id=str(i), prompt_ids=tok.encode("ab"), max_new_tokens=12)
            for i in range(3)]
    runs = [tiny_engine(tok, seed=5).generate(reqs) for _ in range(2)]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]


def test_top_k_one_is_greedy(engine, tok):
    prompt = tok.encode("7*8=")
    (comp,) = engine.generate([GenerateRequest(request_id="g", prompt_ids=prompt, top_k=1,
                                               temperature=0.5, max_new_tokens=10)])
    ids = list(prompt)
    for token in comp.token_ids:
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert token == int(logits.argmax())
        ids.append(token)
    assert comp.finish_reason is FinishReason.LENGTH and len(comp.token_ids) == 10


def _greedy(engine, prompt, **kwargs):
    req = GenerateRequest(request_id="g", prompt_ids=prompt, top_k=1, max_new_tokens=20, **kwargs)
    return engine.generate([req])[0]


def test_stop_token_ids_end_and_keep_the_stop_token(engine, tok):
    prompt = tok.encode("Q: 5-2?")
    free = _greedy(engine, prompt)
    stop = free.token_ids[4]
    cut = free.token_ids.index(stop) + 1
    stopped = _greedy(engine, prompt, stop_token_ids=[stop])
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == free.token_ids[:cut]
    assert stopped.logprobs == pytest.approx(free.logprobs[:cut], abs=1e-6)


def test_eos_stops_generation(tok):
    eng = tiny_engine(tok)
    prompt = tok.encode("hi")
    free = _greedy(eng, prompt)
    eng.eos_token_ids = frozenset({free.token_ids[2]})  # pretend the 3rd greedy token is eos
    stopped = _greedy(eng, prompt)
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[2]) + 1]


def test_stop_string_trims_text(engine, tok):
    prompt = tok.encode("Answer:")
    free = _greedy(engine, prompt)
    text = tok.decode(free.token_ids, skip_special_tokens=True)
    stop = text[3:5]
    stopped = _greedy(engine, prompt, stop=[stop])
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == text[:text.find(stop)]
    assert stop in tok.decode(stopped.token_ids, skip_special_tokens=True)
    assert stopped.token_ids == free.token_ids[:len(stopped.token_ids)]


def test_stop_strings_need_a_tokenizer(tok):
    eng = tiny_engine(tok)
    eng.tokenizer = None
    with pytest.raises(ValueError, match="stop strings"):
        _greedy(eng, tok.encode("ab"), stop=["zz"])


def test_out_of_vocabulary_prompt_is_rejected(engine):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.generate([GenerateRequest(request_id="bad", prompt_ids=[5, 10_000])])


def test_update_weights_from_tensors(tok):
    target, source = tiny_engine(tok, init_seed=0), tiny_engine(tok, init_seed=1)
    req = [GenerateRequest(request_id="a", prompt_ids=tok.encode("3+3="), max_new_tokens=12, seed=7)]
    before, wanted = target.generate(req)[0], source.generate(req)[0]
    named = list(source.model.state_dict().items())
    with pytest.raises(ValueError, match="unknown tensor name 'model.layers.9.mlp.up_proj.weight'"):
        target.update_weights_from_tensors([named[0], ("model.layers.9.mlp.up_proj.weight",
                                                       torch.zeros(1))], version=1)
    bad_shape = [(named[1][0], torch.zeros(3, 3))]
    with pytest.raises(ValueError, match=f"tensor '{named[1][0]}' has shape \\(3, 3\\)"):
        target.update_weights_from_tensors(bad_shape, version=1)
    # Nothing from the rejected buckets was applied.
    assert target.generate(req)[0].token_ids == before.token_ids and target.weight_version == 0
    for start in range(0, len(named), 7):  # bucket by bucket, as weight sync sends them
        target.update_weights_from_tensors(iter(named[start:start + 7]), version=3)
    after = target.generate(req)[0]
    assert target.weight_version == 3 and after.weight_version == 3
    assert after.token_ids == wanted.token_ids
    assert after.logprobs == pytest.approx(wanted.logprobs, abs=1e-6)


def test_update_weights_from_disk_and_from_pretrained(tok, tmp_path):
    source = tiny_engine(tok, init_seed=2)
    source.save_pretrained(str(tmp_path / "hf"))
    req = [GenerateRequest(request_id="a", prompt_ids=tok.encode("9-4="), max_new_tokens=12, seed=3)]
    wanted = source.generate(req)[0]

    loaded = build_engine(EngineConfig(model_path=str(tmp_path / "hf")))  # backend "local"
    assert loaded.tokenizer is not None and loaded.eos_token_ids == {tok.eos_token_id}
    assert loaded.generate(req)[0].token_ids == wanted.token_ids

    target = tiny_engine(tok, init_seed=0)
    target.update_weights_from_disk(str(tmp_path / "hf"), version=5)
    got = target.generate(req)[0]
    assert got.token_ids == wanted.token_ids and got.weight_version == 5

    partial = dict(list(source.model.state_dict().items())[:3])
    os.makedirs(tmp_path / "partial")
    save_file({k: v.contiguous() for k, v in partial.items()},
              str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(ValueError, match="weights missing"):
        target.update_weights_from_disk(str(tmp_path / "partial"), version=6)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        target.update_weights_from_disk(str(tmp_path), version=6)
    assert target.weight_version == 5
    with pytest.raises(ValueError, match="rollout.learner.model_path is empty"):
        build_engine(EngineConfig(), name="learner")


def test_local_engine_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine) and engine.health()


def test_max_new_tokens_and_logprob_sanity(engine, tok):
    reqs = [GenerateRequest(request_id=str(n), prompt_ids=tok.encode("z"), max_new_tokens=n, seed=n)
            for n in (1, 5)]
    out = engine.generate(reqs)
    assert [len(c.token_ids) for c in out] == [1, 5]
    assert all(c.finish_reason is FinishReason.LENGTH for c in out)
    assert all(math.isfinite(lp) for c in out for lp in c.logprobs)
