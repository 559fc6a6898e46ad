"""Run verl's DAPORewardManager (verl/workers/reward_manager/dapo.py) on cases read as JSON from
stdin; print its rewards as JSON. Started by tests/contract/test_verl_dapo.py with verl's
unpacked wheel (verl_env.fetch) on PYTHONPATH, in a process of its own.

A case: {"max_resp_len", "buffer_len", "penalty_factor", "lengths": [...], "scores": [...]}. Each
response is `length` tokens of the project's synthetic tokenizer; the verifier verl calls
(`compute_score`) returns the case's score for it, carried as the ground truth, so what runs is
verl's length measure and overlong arithmetic around the score. Output per case: the reward verl
puts on each response's last token, and its logged `overlong_reward`.
"""

import json
import sys
from types import SimpleNamespace

import numpy as np
import torch

from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer
from verl import DataProto
from verl.workers.reward_manager.dapo import DAPORewardManager


def run_case(case: dict, tokenizer) -> dict:
    lengths, scores = case["lengths"], case["scores"]
    prompt = tokenizer.encode("3+4=")
    width = max(lengths)
    prompts = torch.tensor([prompt] * len(lengths))  # (B, P), verl left-pads prompts; these are full
    responses = torch.full((len(lengths), width), tokenizer.pad_token_id)  # (B, R), right-padded
    mask = torch.zeros(len(lengths), len(prompt) + width, dtype=torch.long)
    mask[:, :len(prompt)] = 1
    digit = tokenizer.encode("7")[0]
    for i, n in enumerate(lengths):
        responses[i, :n] = digit
        mask[i, len(prompt):len(prompt) + n] = 1
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": mask},
        non_tensors={"reward_model": np.array([{"ground_truth": str(s)} for s in scores], dtype=object),
                     "data_source": np.array(["math"] * len(lengths), dtype=object)})
    overlong = SimpleNamespace(enable=True, len=case["buffer_len"], penalty_factor=case["penalty_factor"], log=True)
    manager = DAPORewardManager(tokenizer, num_examine=0, max_resp_len=case["max_resp_len"],
                                overlong_buffer_cfg=overlong,
                                compute_score=lambda data_source, solution_str, ground_truth, extra_info:
                                float(ground_truth))
    out = manager(data, return_dict=True)
    rewards = [float(out["reward_tensor"][i, n - 1]) for i, n in enumerate(lengths)]
    penalties = [float(v) for v in out["reward_extra_info"]["overlong_reward"]]
    return {"rewards": rewards, "overlong_reward": penalties}


def main() -> None:
    tokenizer = build_synthetic_tokenizer()
    cases = json.load(sys.stdin)
    json.dump([run_case(case, tokenizer) for case in cases], sys.stdout)


if __name__ == "__main__":
    main()
