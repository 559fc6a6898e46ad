"""Our Qwen3-MoE weights and routing requests through SGLang 0.5.23's own code (one process).

    python tests/contract/sglang_moe_checks.py HF_DIR   # prints one JSON line of results

HF_DIR holds what our disk weight sync writes for a tiny Qwen3-MoE learner (config.json from
`ModelArch`, safetensors under our exported names). What runs is SGLang's:
  - `sglang.srt.models.qwen3_moe.Qwen3MoeForCausalLM`, built on CPU from that config.json, and its
    `load_weights` (the stacked q/k/v and gate/up mapping, `FusedMoE.make_expert_params_mapping`,
    the FusedMoE weight loader): every parameter is NaN-filled first, then must be written, and
    equal our tensors in SGLang's layout (w13 = [gate; up] per expert, w2 = down, qkv = [q; k; v]);
  - the same loader fed a dense-MLP tensor name (what a Qwen3-MoE config with mlp_only_layers
    would send): SGLang drops it silently, which is why ModelArch refuses such configs;
  - `GenerateReqInput` and the /generate JSON contract on our payload with return_routed_experts;
  - a (token, layer, top_k) int32 routing in the detokenizer's base64 encoding, decoded by SGLang's
    `extract_routed_experts_from_meta_info` and by our client's `parse_routed_experts` alike.
The process context (runtime_context.publish with a rank bundle, a one-rank gloo group, SGLang's
own `initialize_model_parallel`) stands where a GPU scheduler process would be.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sglang_env  # noqa: E402


def build_model(hf_dir: str):
    import torch.distributed as dist
    from sglang.srt import runtime_context
    from sglang.srt.distributed import parallel_state
    from sglang.srt.server_args import ServerArgs
    from transformers import AutoConfig

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    server_args = ServerArgs.from_cli_args(parser.parse_args(
        ["--model-path", hf_dir, "--device", "cpu", "--enable-return-routed-experts"]))
    runtime_context.publish(server_args, role="scheduler", ranks=runtime_context.SpawnRanks(world_rank=0))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    parallel_state.init_distributed_environment(backend="gloo", world_size=1, rank=0, local_rank=0,
                                                distributed_init_method=init)
    parallel_state.initialize_model_parallel(backend="gloo")
    from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(AutoConfig.from_pretrained(hf_dir))


def loader_checks(hf_dir: str) -> dict:
    import torch
    from safetensors.torch import load_file

    ours: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            ours.update(load_file(os.path.join(hf_dir, name)))
    model = build_model(hf_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))
    model.load_weights(list(ours.items()))
    vocab = model.config.vocab_size
    unwritten = sorted(n for n, p in params.items()
                       if torch.isnan(p[:vocab] if n in ("model.embed_tokens.weight", "lm_head.weight") else p).any())
    mismatched = []
    layers = model.config.num_hidden_layers
    for layer in range(layers):
        h, s = f"model.layers.{layer}.", f"model.layers.{layer}."
        expect = {s + "self_attn.qkv_proj.weight": torch.cat([ours[h + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
                  s + "mlp.gate.weight": ours[h + "mlp.gate.weight"]}
        for e in range(model.config.num_experts):
            x = f"{h}mlp.experts.{e}."
            expect[f"{s}mlp.experts.w13_weight[{e}]"] = torch.cat([ours[x + "gate_proj.weight"], ours[x + "up_proj.weight"]])
            expect[f"{s}mlp.experts.w2_weight[{e}]"] = ours[x + "down_proj.weight"]
        for key, value in expect.items():
            name, index = (key[:-3], int(key[-2])) if key.endswith("]") else (key, None)
            got = params[name] if index is None else params[name][index]
            if not torch.equal(got, value):
                mismatched.append(key)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        # SGLang pads the vocabulary rows of its (vocab-parallel) embedding and head to a multiple of 64
        if key in ours and not torch.equal(params[key][:ours[key].shape[0]], ours[key]):
            mismatched.append(key)
    # a dense-layer MLP weight is not an error to SGLang: it is skipped without a word
    before = {n: p.clone() for n, p in params.items()}
    dense = torch.ones(model.config.moe_intermediate_size, model.config.hidden_size)
    model.load_weights([("model.layers.0.mlp.gate_proj.weight", dense)])
    dense_ignored = all(torch.equal(p, before[n]) for n, p in params.items())
    return {"num_tensors_sent": len(ours), "num_params": len(params), "unwritten": unwritten,
            "mismatched": mismatched, "dense_mlp_weight_silently_ignored": dense_ignored}


def request_checks() -> dict:
    import pybase64
    import pydantic
    import torch
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.state_capturer.routed_experts import extract_routed_experts_from_meta_info

    from megatron_s2lpo.rollout.engine import GenerateRequest
    from megatron_s2lpo.rollout.sglang_client import generate_payload, parse_routed_experts

    payload = generate_payload(GenerateRequest(request_id="r0", prompt_ids=[1, 2, 3], max_new_tokens=4,
                                               return_routed_experts=True))
    parsed = pydantic.TypeAdapter(GenerateReqInput).validate_python(payload)
    routing = torch.randint(0, 128, (6, 3, 8), dtype=torch.int32)  # (token, layer, top_k) as captured
    # the encoding of DetokenizerManager._b64_encode_per_request / TokenizerManager (one line, written
    # out: importing the detokenizer drags in uvloop and setproctitle), decoded by SGLang's own helper
    encoded = pybase64.b64encode(routing.numpy().tobytes()).decode("utf-8")
    theirs = torch.from_numpy(extract_routed_experts_from_meta_info({"meta_info": {"routed_experts": encoded}}).copy())
    decoded = parse_routed_experts(encoded, 6, where="contract")
    return {"payload_accepted": bool(parsed.return_routed_experts) and generate_contract_error(payload) is None,
            "start_len_default": parsed.routed_experts_start_len,
            "routing_round_trip": bool(torch.equal(decoded.to(torch.int32).flatten(), theirs))
            and bool(torch.equal(theirs.view(6, 3, 8), routing))}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--sglang-source", default=None)
    args = parser.parse_args()
    sglang_env.load(args.sglang_source)
    print("RESULT " + json.dumps({**loader_checks(args.hf_dir), **request_checks()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
