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
                       dp_size=1, mem_fraction=0.5, enable_memory_saver=True,
                       extra_args=["--random-seed", "3"])
    cmd = build_launch_command(cfg, python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    flags = cmd[3:]
    for flag, value in (("--model-path", "/ckpt/explorer"), ("--host", "127.0.0.1"),
                        ("--port", "31001"), ("--tp-size", "2"), ("--dp-size", "1"),
                        ("--mem-fraction-static", "0.5")):
        assert flags[flags.index(flag) + 1] == value
    assert "--enable-memory-saver" in flags and flags[-2:] == ["--random-seed", "3"]
    test_cfg = EngineConfig(model_path="m", launch_command=["python", "tests/protocol_server.py"], api_key="k")
    assert build_launch_command(test_cfg)[:2] == ["python", "tests/protocol_server.py"]
    assert "--enable-memory-saver" not in build_launch_command(test_cfg)
    assert build_launch_command(test_cfg)[-2:] == ["--api-key", "k"]  # a program taking SGLang's flags
    with pytest.raises(ValueError, match="model_path is empty"):
        build_launch_command(EngineConfig())


FAKE_LAUNCH_SERVER = """import json, logging, multiprocessing, sys


def child(queue):
    queue.put("spawned child ran")


if __name__ == "__main__":  # as SGLang's server: it logs its arguments and spawns its workers
    logging.basicConfig(level=logging.INFO, force=True)
    logging.getLogger("sglang.srt.entrypoints.engine").info("server_args=%s", {"api_key": sys.argv[-1]})
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    print(json.dumps({"argv": sys.argv[1:], "child": queue.get(timeout=120),
                      "cmdline": open("/proc/self/cmdline", "rb").read().decode(errors="replace")}))
    proc.join()
"""


@pytest.mark.parametrize("how", ["api_key", "api_key_env"])
def test_a_launched_server_reads_its_key_from_the_environment_not_its_command_line(tmp_path, how):
    """SGLang 0.5.23 takes the key only as --api-key; its command line is every user's to read
    (ps), so the key travels in the server's environment and is appended to its own arguments.
    Run against a module in sglang.launch_server's place that reports what it was given."""
    import json
    import os
    import subprocess
    import sys

    from megatron_s2lpo.rollout.sglang_server import launch_env

    (tmp_path / "sglang").mkdir()
    (tmp_path / "sglang" / "__init__.py").write_text("")
    (tmp_path / "sglang" / "launch_server.py").write_text(FAKE_LAUNCH_SERVER)
    key = "secret-key-7f3a"
    if how == "api_key":  # a configured key: launch_env puts it in the server's environment
        cfg = EngineConfig(backend="sglang", model_path="/m", api_key=key)
        env = launch_env(cfg)
    else:  # a key the environment already holds (the cluster launch: the job's S2LPO_API_KEY)
        cfg = EngineConfig(backend="sglang", model_path="/m", host="0.0.0.0", api_key_env="JOB_KEY")
        env = {**os.environ, "JOB_KEY": key}
        assert launch_env(cfg) is None
    cmd = build_launch_command(cfg, python=sys.executable)
    assert key not in " ".join(cmd) and "--api-key" not in cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["argv"][:2] == ["--model-path", "/m"] and seen["argv"][-2:] == ["--api-key", key]
    assert key not in seen["cmdline"] and seen["child"] == "spawned child ran"
    assert "server_args={'api_key': '<redacted>'}" in proc.stderr and key not in proc.stderr


def test_engine_config_new_fields_are_validated():
    with pytest.raises(ValueError, match="max_restarts"):
        EngineConfig(max_restarts=-1)
    with pytest.raises(ValueError, match="startup_timeout_s"):
        EngineConfig(startup_timeout_s=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingConfig(stop_token_ids=[-1])
