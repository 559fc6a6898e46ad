"""Teacher scoring: LocalEngine.score, TeacherScorer, align_scores, SGLang client and engine.

The SGLang side runs against the SGLang-protocol test server over real HTTP on 127.0.0.1; the
server reproduces SGLang 0.5.23's prefill-only answers (as read from its source, see
sglang_client.py). A live SGLang server (CUDA only) is not run here.
"""

import asyncio
import copy
import math

import pytest
import torch
from test_rollout_sglang import KEY, admin, engine_config, model_dirs  # noqa: F401 (fixture)

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.rollout import ScoreRequest, TeacherScorer, TokenScores, align_scores
from megatron_s2lpo.rollout.engine import GenerateRequest
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.rollout.scoring import TOPK_PAD_LOGPROB
from megatron_s2lpo.rollout.sglang_client import (
    EngineRequestError,
    SGLangClient,
    parse_score_output,
    score_payload,
)
from megatron_s2lpo.rollout.sglang_engine import SGLangEngine

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]


def tiny_engine(tok, **kwargs) -> LocalEngine:
    arch = ModelArch(family="qwen3", vocab_size=len(tok), hidden_size=32, ffn_hidden_size=64,
                     num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=8,
                     qk_layernorm=True)
    return LocalEngine.from_arch(arch, tokenizer=tok, init_seed=0, **kwargs)


@pytest.fixture(scope="module")
def engine(tok):
    return tiny_engine(tok, max_batch_size=2)  # several batches, left padding inside each


def reference_logprobs(model, prompt_ids, response_ids) -> torch.Tensor:
    """Slow reference: a float64 copy of the model, one full forward pass, log_softmax.

    Returns (R, V): row r is the distribution that predicts response_ids[r].
    """
    model64 = copy.deepcopy(model).double()
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model64(input_ids=ids).logits[0], dim=-1)  # (L, V)
    start = len(prompt_ids) - 1
    return logp[start:start + len(response_ids)]


def requests_for(tok, top_k=0) -> list[ScoreRequest]:
    pairs = [("1+2=", "3<eos>"), ("What is 6*7? ", "42"), ("9", "nine and\tmore"), ("ab", "c")]
    return [ScoreRequest(request_id=f"s{i}", prompt_ids=tok.encode(p),
                         response_ids=tok.encode(r) or [5], top_k=top_k)
            for i, (p, r) in enumerate(pairs)]


# ----- LocalEngine.score -----

def test_local_score_matches_float64_reference(engine, tok):
    reqs = requests_for(tok, top_k=4)
    out = engine.score(reqs)
    assert [s.request_id for s in out] == [r.request_id for r in reqs]
    for req, scores in zip(reqs, out, strict=True):
        ref = reference_logprobs(engine.model, req.prompt_ids, req.response_ids)  # (R, V)
        wanted = ref.gather(-1, torch.tensor(req.response_ids).unsqueeze(-1)).squeeze(-1)
        assert len(scores.logprobs) == len(req.response_ids)
        assert max(abs(a - b) for a, b in zip(scores.logprobs, wanted.tolist(), strict=True)) < 1e-5
        # Top-k: the k largest entries of the distribution predicting each token, descending.
        top = torch.tensor(scores.top_logprobs, dtype=torch.float64)  # (R, k)
        ids = torch.tensor(scores.top_ids)  # (R, k)
        assert top.shape == (len(req.response_ids), 4)
        assert torch.allclose(top, ref.topk(4, dim=-1).values, atol=1e-5)
        assert torch.allclose(top, ref.gather(-1, ids), atol=1e-5)
        assert bool((top[:, :-1] >= top[:, 1:]).all())
        assert all(len(set(row)) == 4 for row in scores.top_ids)


def test_local_score_without_top_k_returns_no_top_entries(engine, tok):
    scores = engine.score(requests_for(tok))
    assert all(s.top_ids is None and s.top_logprobs is None for s in scores)


def test_local_score_equals_the_engines_own_sampling_logprobs(engine, tok):
    gens = [GenerateRequest(request_id=f"g{i}", prompt_ids=tok.encode(p), temperature=1.0,
                            max_new_tokens=16, seed=i)
            for i, p in enumerate(["3+4=", "Say hi: ", "x"])]
    comps = engine.generate(gens)
    scores = engine.score([ScoreRequest(request_id=c.request_id, prompt_ids=c.prompt_ids,
                                        response_ids=c.token_ids) for c in comps])
    for comp, s in zip(comps, scores, strict=True):
        assert max(abs(a - b) for a, b in zip(comp.logprobs, s.logprobs, strict=True)) < 1e-5


def test_local_score_rejects_bad_ids_naming_the_request(engine, tok):
    with pytest.raises(ValueError, match="score request 'bad'.*\\[10000\\].*vocabulary of 101"):
        engine.score([ScoreRequest(request_id="bad", prompt_ids=[5], response_ids=[6, 10_000])])
    with pytest.raises(ValueError, match="score request 'wide': top_k=500 exceeds"):
        engine.score([ScoreRequest(request_id="wide", prompt_ids=[5], response_ids=[6], top_k=500)])


def test_score_request_validation_names_the_request():
    with pytest.raises(ValueError, match="score request 'a': prompt_ids is empty"):
        ScoreRequest(request_id="a", prompt_ids=[], response_ids=[1])
    with pytest.raises(ValueError, match="score request 'b': response_ids is empty"):
        ScoreRequest(request_id="b", prompt_ids=[1], response_ids=[])
    with pytest.raises(ValueError, match="score request 'c': top_k must be >= 0"):
        ScoreRequest(request_id="c", prompt_ids=[1], response_ids=[2], top_k=-1)
    with pytest.raises(ValueError, match="top_ids and top_logprobs come together"):
        TokenScores(request_id="d", logprobs=[0.0], top_ids=[[1]])


# ----- TeacherScorer -----

class CountingEngine:
    """Scores token t as -t / 100 (top-k: ids 0 .. k-1); records every call."""

    def __init__(self) -> None:
        self.calls: list[list[ScoreRequest]] = []

    def score(self, requests):
        self.calls.append(list(requests))
        return [TokenScores(request_id=r.request_id, logprobs=[-t / 100 for t in r.response_ids],
                            top_ids=[list(range(r.top_k))] * len(r.response_ids) if r.top_k else None,
                            top_logprobs=[[-0.5] * r.top_k] * len(r.response_ids) if r.top_k else None)
                for r in requests]


def test_teacher_scorer_batches_and_caches_per_step():
    fake = CountingEngine()
    scorer = TeacherScorer(fake, top_k=2, batch_size=2)
    scorer.new_step(3)
    pairs = [([1], [2, 3]), ([1], [4]), ([1], [2, 3]), ([5, 6], [7]), ([1], [4])]
    out = scorer.score(pairs)
    assert [len(c) for c in fake.calls] == [2, 1]  # 3 distinct pairs, batch_size 2
    assert [r.request_id for c in fake.calls for r in c] == ["teacher-3-0", "teacher-3-1", "teacher-3-2"]
    assert all(r.top_k == 2 for c in fake.calls for r in c)
    assert [s.logprobs for s in out] == [[-0.02, -0.03], [-0.04], [-0.02, -0.03], [-0.07], [-0.04]]
    assert out[0] is out[2] and out[0].top_ids == [[0, 1], [0, 1]]
    assert (scorer.hits, scorer.misses) == (2, 3)

    again = scorer.score([([5, 6], [7]), ([1], [2, 3]), ([9], [9])])  # repeated within the step
    assert [len(c) for c in fake.calls] == [2, 1, 1] and fake.calls[-1][0].request_id == "teacher-3-3"
    assert again[0] is out[3] and again[2].logprobs == [-0.09]
    assert (scorer.hits, scorer.misses) == (4, 4)
    metrics = scorer.metrics()
    assert metrics["teacher/requests"] == 4 and metrics["teacher/cache_hits"] == 4
    assert metrics["teacher/tokens"] == 5 and metrics["teacher/seconds"] >= 0

    scorer.new_step(4)  # a new step scores everything again, with the new step's ids
    scorer.score([([1], [2, 3])])
    assert fake.calls[-1][0].request_id == "teacher-4-0"
    assert (scorer.hits, scorer.misses) == (4, 5)  # cumulative
    assert scorer.metrics()["teacher/requests"] == 1 and scorer.metrics()["teacher/cache_hits"] == 0


def test_teacher_scorer_checks_the_engine():
    with pytest.raises(ValueError, match="has no score\\(\\) method"):
        TeacherScorer(object())

    class Short(CountingEngine):
        def score(self, requests):
            return [TokenScores(request_id=r.request_id, logprobs=[0.0]) for r in requests]

    with pytest.raises(RuntimeError, match="answered request 'teacher-0-0' \\(2 tokens\\)"):
        TeacherScorer(Short()).score([([1], [2, 3])])


def test_teacher_scorer_over_local_engine(engine, tok):
    reqs = requests_for(tok, top_k=3)
    direct = engine.score(reqs)
    via = TeacherScorer(engine, top_k=3, batch_size=3).score(
        [(r.prompt_ids, r.response_ids) for r in reqs])
    for a, b in zip(direct, via, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6) and a.top_ids == b.top_ids


# ----- align_scores -----

def test_align_scores_layout():
    scores = [TokenScores(request_id="a", logprobs=[-1.0, -2.0], top_ids=[[4, 5], [6, 7]],
                          top_logprobs=[[-0.1, -0.2], [-0.3, -0.4]]),
              TokenScores(request_id="b", logprobs=[-3.0], top_ids=[[8, 9]], top_logprobs=[[-0.5, -0.6]])]
    logp, ids, lps = align_scores(scores, prompt_lens=[3, 1], seq_len=6, top_k=2)
    expected = torch.zeros(2, 6)
    expected[0, 3:5] = torch.tensor([-1.0, -2.0])
    expected[1, 1] = -3.0
    assert logp.dtype == torch.float32 and torch.equal(logp, expected)
    assert ids.shape == (2, 6, 2) and ids.dtype == torch.long and lps.dtype == torch.float32
    assert ids[0, 3].tolist() == [4, 5] and ids[0, 4].tolist() == [6, 7] and ids[1, 1].tolist() == [8, 9]
    assert lps[0, 4].tolist() == pytest.approx([-0.3, -0.4])
    outside = torch.ones(2, 6, dtype=torch.bool)
    outside[0, 3:5] = False
    outside[1, 1] = False
    assert bool((ids[outside] == 0).all()) and bool((lps[outside] == TOPK_PAD_LOGPROB).all())
    assert torch.isfinite(torch.softmax(lps, dim=-1)).all()  # padded rows stay finite

    one = align_scores(scores, prompt_lens=[3, 1], seq_len=5, top_k=1)  # first (largest) entry
    assert one[1][0, 3].tolist() == [4] and one[2][1, 1].tolist() == pytest.approx([-0.5])
    assert align_scores(scores, [3, 1], 5)[1:] == (None, None)
    with pytest.raises(ValueError, match="row 0 \\('a'\\).*seq_len 4"):
        align_scores(scores, [3, 1], 4)
    with pytest.raises(ValueError, match="top-2 scores, top_k=3"):
        align_scores(scores, [3, 1], 6, top_k=3)
    with pytest.raises(ValueError, match="2 scores but 1 prompt_lens"):
        align_scores(scores, [3], 6)


# ----- SGLang client and engine over HTTP -----

@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):  # noqa: F811
    log = str(tmp_path_factory.mktemp("logs") / "server.log")
    engine = SGLangEngine(engine_config(model_dirs[0], api_key=KEY), backoff_s=0.05, log_path=log)
    yield engine
    engine.close()


def test_score_payload_asks_for_the_response_tokens_only(tok):
    req = ScoreRequest(request_id="p", prompt_ids=[7, 8, 9], response_ids=[10, 11], top_k=3)
    assert score_payload(req) == {
        "rid": "p", "input_ids": [7, 8, 9, 10, 11],
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True, "logprob_start_len": 2, "stream": False, "top_logprobs_num": 3}
    assert "top_logprobs_num" not in score_payload(ScoreRequest(request_id="q", prompt_ids=[1],
                                                                response_ids=[2]))


def test_sglang_engine_scores_like_the_local_engine(server, model_dirs, tok):  # noqa: F811
    local = LocalEngine.from_pretrained(model_dirs[0])
    reqs = requests_for(tok, top_k=5)
    reqs.append(ScoreRequest(request_id="tab", prompt_ids=tok.encode("7"),
                             response_ids=[100, 100, 40], top_k=5))  # id 100 = vocab_size - 1
    got, want = server.score(reqs), local.score(reqs)
    for req, g, w in zip(reqs, got, want, strict=True):
        assert g.request_id == req.request_id
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert torch.allclose(torch.tensor(g.top_logprobs), torch.tensor(w.top_logprobs), atol=1e-5)
        ref = reference_logprobs(local.model, req.prompt_ids, req.response_ids)
        got_top = torch.tensor(g.top_logprobs, dtype=torch.float64)
        assert torch.allclose(got_top, ref.gather(-1, torch.tensor(g.top_ids)), atol=1e-5)
    plain = server.score([ScoreRequest(request_id="plain", prompt_ids=[3], response_ids=[4, 5])])
    assert plain[0].top_ids is None and len(plain[0].logprobs) == 2


def test_sglang_client_score_from_another_event_loop(server, tok):
    async def run():
        client = SGLangClient(server.url, api_key=KEY)
        try:
            return await client.score(requests_for(tok)[:2])
        finally:
            await client.close()

    direct = server.score(requests_for(tok)[:2])
    for a, b in zip(asyncio.run(run()), direct, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)


def test_score_is_retried_like_generate(server, tok):
    before = admin(server.url, "/_test/state")["num_failed"]
    admin(server.url, "/_test/faults", {"fail_next": 1, "status": 503})
    (scores,) = server.score(requests_for(tok)[:1])
    assert admin(server.url, "/_test/state")["num_failed"] - before == 1
    assert len(scores.logprobs) == len(requests_for(tok)[0].response_ids)


def test_protocol_server_prefill_answers_follow_sglang(server, model_dirs, tok):  # noqa: F811
    """Raw answers for several logprob_start_len values (what parse_score_output relies on)."""
    ids = tok.encode("12+30=42")
    local = LocalEngine.from_pretrained(model_dirs[0])
    full = local.score([ScoreRequest(request_id="f", prompt_ids=ids[:1], response_ids=ids[1:])])[0]

    def ask(**body):
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "rid": "raw", **body}
        return admin(server.url, "/generate", body)

    for start in (0, 3, len(ids) - 1):
        out = ask(return_logprob=True, logprob_start_len=start, top_logprobs_num=2)
        meta = out["meta_info"]
        assert out["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
        assert meta["output_token_logprobs"] == [] and meta["completion_tokens"] == 0
        entries = meta["input_token_logprobs"]
        assert [e[1] for e in entries] == ids[start:]  # entry j is token start + j ...
        assert entries[0][0] is None and meta["input_top_logprobs"][0] is None  # ... 0 has none
        values = [e[0] for e in entries[1:]]
        assert values == pytest.approx(full.logprobs[start:], abs=1e-5)
        assert all(len(row) == 2 for row in meta["input_top_logprobs"][1:])
    assert ask(return_logprob=True)["meta_info"]["input_token_logprobs"] == []  # default: -1
    assert "input_token_logprobs" not in ask(logprob_start_len=0)["meta_info"]
    with pytest.raises(Exception, match="HTTP Error 400"):
        ask(return_logprob=True, logprob_start_len=len(ids) + 1)


# ----- malformed answers -----

def answer(entries, tops=None, **meta):
    meta = {"id": "m", "finish_reason": {"type": "length", "length": 0},
            "input_token_logprobs": entries, **meta}
    if tops is not None:
        meta["input_top_logprobs"] = tops
    return {"text": "", "output_ids": [], "meta_info": meta}


REQ = ScoreRequest(request_id="m", prompt_ids=[7, 8], response_ids=[9, 10])
GOOD = [[None, 8, None], [-1.5, 9, None], [-0.5, 10, None]]


def test_parse_score_output_accepts_sglang_answers():
    scores = parse_score_output(answer(GOOD), REQ, url="http://h")
    assert scores.logprobs == [-1.5, -0.5] and scores.top_ids is None
    clipped = [[None, 8, None], [-1.5, 0, None], [-0.5, 10, None]]  # SGLang's last-id clip
    assert parse_score_output(answer(clipped), REQ, url="http://h").logprobs == [-1.5, -0.5]
    top_req = ScoreRequest(request_id="m", prompt_ids=[7, 8], response_ids=[9, 10], top_k=2)
    tops = [None, [[-0.1, 3, None], [-1.5, 9, None]], [[-0.5, 10, "x"], [-2.0, 4, None]]]
    scores = parse_score_output(answer(GOOD, tops), top_req, url="http://h")
    assert scores.top_ids == [[3, 9], [10, 4]] and scores.top_logprobs == [[-0.1, -1.5], [-0.5, -2.0]]


@pytest.mark.parametrize("out, req, problem", [
    ({"error": "x"}, REQ, "unexpected answer"),
    (answer(GOOD, id="other"), REQ, "the answer is for request 'other'"),
    (answer(GOOD, finish_reason={"type": "abort", "message": "too long"}), REQ, "aborted.*too long"),
    (answer(GOOD[1:]), REQ, "expected 3 input_token_logprobs"),
    (answer([]), REQ, "expected 3 input_token_logprobs"),
    (answer([[None, 8, None], [-1.5, 9, None], [-0.5, 11, None]]), REQ,
     "input_token_logprobs\\[2\\] is for token 11, the request has 10"),
    (answer([[None, 8, None], [None, 9, None], [-0.5, 10, None]]), REQ,
     "input_token_logprobs\\[1\\] \\(response token 0\\) has no log-prob"),
    (answer([[None, 8, None], "x", [-0.5, 10, None]]), REQ, "input_token_logprobs\\[1\\] is 'x'"),
    (answer(GOOD), ScoreRequest(request_id="m", prompt_ids=[7, 8], response_ids=[9, 10], top_k=2),
     "expected 3 input_top_logprobs rows"),
    (answer(GOOD, [None, [[-0.1, 3, None]], [[-0.5, 10, None], [-2.0, 4, None]]]),
     ScoreRequest(request_id="m", prompt_ids=[7, 8], response_ids=[9, 10], top_k=2),
     "input_top_logprobs\\[1\\] should hold 2"),
])
def test_parse_score_output_rejects_malformed_answers(out, req, problem):
    with pytest.raises(EngineRequestError, match=f"http://h/generate score request 'm'.*{problem}"):
        parse_score_output(out, req, url="http://h")


def test_scores_are_finite_log_probs(engine, tok):
    for s in engine.score(requests_for(tok, top_k=2)):
        assert all(math.isfinite(v) and v <= 0 for v in s.logprobs)
