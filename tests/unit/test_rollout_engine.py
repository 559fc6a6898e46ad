"""Engine contract objects, SGLang payload/answer mapping, launch command (no processes)."""

import pytest

from megatron_s2lpo.config.rollout import EngineConfig, SamplingConfig
from megatron_s2lpo.rollout.engine import (
    Completion,
    GenerateRequest,
    RolloutEngine,
    derive_seed,
    parse_weight_version,
)
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.rollout.sglang_client import (
    EngineRequestError,
    generate_payload,
    parse_generate_output,
)
from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
from megatron_s2lpo.rollout.sglang_server import build_launch_command
from megatron_s2lpo.types import FinishReason, Source

URL = "http://127.0.0.1:1"


def test_request_validation_names_the_field():
    with pytest.raises(ValueError, match="request 'r1': temperature must be > 0"):
        GenerateRequest(request_id="r1", prompt_ids=[1], temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be -1 or >= 1"):
        GenerateRequest(request_id="r", prompt_ids=[1], top_k=0)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        GenerateRequest(request_id="r", prompt_ids=[])


def test_request_from_sampling_and_sglang_params():
    sampling = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=64,
                              stop=["</answer>"], stop_token_ids=[7])
    req = GenerateRequest.from_sampling("r", [4, 5], sampling, seed=11)
    # Field names of sglang.srt.sampling.sampling_params.SamplingParams (0.5.23).
    assert req.sampling_params() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                     "max_new_tokens": 64, "stop": ["</answer>"],
                                     "stop_token_ids": [7], "sampling_seed": 11}
    assert generate_payload(req) == {"rid": "r", "input_ids": [4, 5], "stream": False,
                                     "sampling_params": req.sampling_params(), "return_logprob": True}
    plain = GenerateRequest(request_id="p", prompt_ids=[1])
    assert set(plain.sampling_params()) == {"temperature", "top_p", "top_k", "max_new_tokens"}


def _answer(**meta):
    base = {"finish_reason": {"type": "stop", "matched": 1}, "prompt_tokens": 2,
            "completion_tokens": 3, "weight_version": "4",
            "output_token_logprobs": [[-0.5, 9, None], [-1.25, 8, None], [-0.1, 1, None]]}
    base.update(meta)
    return {"text": "ab", "output_ids": [9, 8, 1], "meta_info": base}


def test_parse_generate_output():
    req = GenerateRequest(request_id="r", prompt_ids=[3, 4])
    comp = parse_generate_output(_answer(id="r"), req, url=URL)
    assert comp.token_ids == [9, 8, 1] and comp.logprobs == [-0.5, -1.25, -0.1]
    assert comp.finish_reason is FinishReason.STOP and comp.weight_version == 4
    assert comp.prompt_ids == [3, 4] and comp.text == "ab"
    length = parse_generate_output(_answer(finish_reason={"type": "length", "length": 3},
                                           weight_version="default"), req, url=URL)
    assert length.finish_reason is FinishReason.LENGTH and length.weight_version == 0
    abort = parse_generate_output(_answer(finish_reason={"type": "abort", "message": "x"}), req, url=URL)
    assert abort.finish_reason is FinishReason.ABORT


def test_parse_generate_output_rejects_malformed_answers():
    req = GenerateRequest(request_id="r7", prompt_ids=[3])
    with pytest.raises(EngineRequestError, match="r7.*output_token_logprobs"):
        parse_generate_output(_answer(output_token_logprobs=[[-0.5, 9, None]]), req, url=URL)
    with pytest.raises(EngineRequestError, match="log-prob 1 is for token 5"):
        parse_generate_output(_answer(output_token_logprobs=[[-0.5, 9, None], [-1, 5, None],
                                                              [-1, 1, None]]), req, url=URL)
    with pytest.raises(EngineRequestError, match="the answer is for request 'r8'"):
        parse_generate_output(_answer(id="r8"), req, url=URL)
    with pytest.raises(EngineRequestError, match="unknown finish_reason"):
        parse_generate_output(_answer(finish_reason={"type": "eos"}), req, url=URL)
    with pytest.raises(EngineRequestError, match=f"{URL}/generate request 'r7': unexpected answer"):
        parse_generate_output({"error": "boom"}, req, url=URL)


def test_parse_weight_version():
    assert parse_weight_version(None) == 0 and parse_weight_version("default") == 0
    assert parse_weight_version("12") == 12 and parse_weight_version(3) == 3
    with pytest.raises(ValueError, match="'step-3', which is not an integer"):
        parse_weight_version("step-3", where=URL)


def test_derive_seed_is_a_fixed_function():
    # Literal values: stores and resumed runs depend on seeds never changing between versions
    # or processes (hash() would change with PYTHONHASHSEED).
    assert derive_seed(1, "learner", "p0", 3) == 1466566185
    assert derive_seed(0, "fill", "q", 0) == 1094236870
    assert len({derive_seed(1, "learner", "p0", j) for j in range(100)}) == 100


def test_completion_to_rollout():
    comp = Completion(request_id="r", prompt_ids=[1, 2], token_ids=[3], text="x", logprobs=[-0.2],
                      finish_reason=FinishReason.LENGTH, weight_version=2)
    roll = comp.to_rollout(prompt_id="p", sample_index=5, source=Source.LEARNER)
    assert (roll.prompt_id, roll.sample_index, roll.source) == ("p", 5, Source.LEARNER)
    assert roll.weight_version == 2
    assert roll.response_ids == [3] and roll.response_logprobs == [-0.2] and roll.loss_mask == [1]
    with pytest.raises(ValueError, match="1 tokens but 0 log-probs"):
        Completion(request_id="r", prompt_ids=[1], token_ids=[3], text="", logprobs=[],
                   finish_reason=FinishReason.STOP, weight_version=0)


def test_engines_satisfy_the_protocol():
    for cls in (LocalEngine, SGLangEngine):
        for name in ("generate", "agenerate", "update_weights_from_disk",
                     "update_weights_from_tensors", "health", "close", "weight_version"):
            assert hasattr(cls, name), (cls, name)
    assert isinstance(RolloutEngine, type)


def test_launch_command():
    cfg = EngineConfig(backend="sglang", model_path="/ckpt/explorer", port=31001, tp_size=2,
                       dp_size=1, mem_fraction=0.5, api_key="k", enable_memory_saver=True,
                       extra_args=["--random-seed", "3"])
    cmd = build_launch_command(cfg, python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    flags = cmd[3:]
    for flag, value in (("--model-path", "/ckpt/explorer"), ("--host", "127.0.0.1"),
                        ("--port", "31001"), ("--tp-size", "2"), ("--dp-size", "1"),
                        ("--mem-fraction-static", "0.5"), ("--api-key", "k")):
        assert flags[flags.index(flag) + 1] == value
    assert "--enable-memory-saver" in flags and flags[-2:] == ["--random-seed", "3"]
    test_cfg = EngineConfig(model_path="m", launch_command=["python", "tests/protocol_server.py"])
    assert build_launch_command(test_cfg)[:2] == ["python", "tests/protocol_server.py"]
    assert "--enable-memory-saver" not in build_launch_command(test_cfg)
    with pytest.raises(ValueError, match="model_path is empty"):
        build_launch_command(EngineConfig())


def test_engine_config_new_fields_are_validated():
    with pytest.raises(ValueError, match="max_restarts"):
        EngineConfig(max_restarts=-1)
    with pytest.raises(ValueError, match="startup_timeout_s"):
        EngineConfig(startup_timeout_s=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingConfig(stop_token_ids=[-1])
