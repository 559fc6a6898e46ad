"""The protocol test server's contract mode: SGLang 0.5.23's own code judges and serves requests.

Loaded by `tests/protocol_server.py --sglang-source DIR` (a process of its own, see sglang_env.py).
What runs is SGLang's, from the wheel; what is ours is only the glue that stands where a GPU
process would be:

  - the command line: parsed by `ServerArgs.add_cli_args` + `ServerArgs.from_cli_args`
    (`sglang/srt/server_args.py`); a flag SGLang does not know fails the server's start-up;
  - every request body: validated into its route's `io_struct` class the way FastAPI does for
    `Annotated[Cls, Body()]` (pydantic, `utils/msgspec_utils.py::msgspec_struct_pydantic_core_schema`),
    a field SGLang does not define is recorded as a violation of our client and then dropped, as
    the real 0.5.23 server drops it (checked on the real server: tests/real_sglang);
  - /generate bodies: `GenerateReqInput` (pydantic dataclass parse), the JSON contract gate
    `entrypoints/api_contract.py::generate_contract_error` (`api_types.GenerateRequest`),
    `normalize_batch_and_arguments`, then per item `SamplingParams(**params)`, `.normalize`,
    `.verify(vocab_size)` as `TokenizerManager._tokenize_one_request` does;
  - /generate answers: re-encoded through `api_types.GenerateResponse.from_json_value(...).to_json_value()`;
  - weight updates: SGLang's `SchedulerWeightUpdaterManager` (sessions, flush rule, version record)
    over a fake TP worker whose runner holds SGLang's model-runner `WeightUpdater`
    (`init_custom_process_group`, the flattened-bucket broadcast receive, the flattened tensor
    loader); the TP worker's `deserialize_own_rank` is SGLang's three lines (`managers/tp_worker.py`:
    `monkey_patch_torch_reductions()`, `MultiprocessingSerializer.deserialize(payloads[tp_rank])`),
    written out here because importing tp_worker drags in the whole scheduler; the tokenizer
    manager's part of the tensor route is its `normalize_serialized_named_tensor_payloads` call;
    the model's `load_weights` copies into the server's tiny model (LocalEngine, name-checked).
The process context SGLang's code reads (`runtime_context.publish`) comes from a CPU ServerArgs
(`--device cpu`: SGLang's resolution needs an accelerator otherwise) and a one-rank gloo default
group stands for the TP group.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sglang_env  # noqa: E402

ROUTE_TYPES = {  # route -> io_struct class FastAPI parses its body into (http_server.py)
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
    "/abort_request": "AbortReq",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
}


class _Model(torch.nn.Module):
    """What SGLang's weight updater calls on the model: `load_weights` (+ module walks)."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self._state = state

    def load_weights(self, named) -> None:
        engine = self._state.engine
        if engine is not None:
            engine.update_weights_from_tensors([(n, t.cpu()) for n, t in named], version=engine.weight_version,
                                               flush=False)


class ContractBackend:
    """Request checks and weight updates of a protocol server by SGLang's own code."""

    def __init__(self, source_dir: str, argv: list[str], state: Any) -> None:
        sglang_env.load(source_dir)
        from sglang.srt.managers import io_struct
        from sglang.srt.server_args import ServerArgs

        self.io = io_struct
        self.state = state
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        known = _sglang_flags(argv)
        self.server_args = ServerArgs.from_cli_args(parser.parse_args(known))  # exits on an unknown flag
        state.sglang_args = {k: getattr(self.server_args, k, None) for k in (
            "model_path", "host", "port", "tp_size", "dp_size", "base_gpu_id", "mem_fraction_static", "random_seed",
            "enable_deterministic_inference", "api_key", "enable_memory_saver")}
        self._publish(parser, argv)
        self.manager = self._manager()

    def _publish(self, parser: argparse.ArgumentParser, argv: list[str]) -> None:
        from sglang.srt import runtime_context
        from sglang.srt.server_args import ServerArgs

        model = _flag(argv, "--model-path") or "."
        runtime_context.publish(ServerArgs.from_cli_args(parser.parse_args(["--model-path", model, "--device", "cpu"])),
                                role="scheduler")
        if not dist.is_initialized():  # SGLang's workers always have a default group
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

        class TpGroup:
            cpu_group = dist.group.WORLD

        runtime_context.get_parallel().override_permanently(tp_rank=0, tp_group=TpGroup())

    def _manager(self) -> Any:
        from sglang.srt.managers.scheduler_components.weight_updater import SchedulerWeightUpdaterManager
        from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater
        from sglang.srt.runtime_context import get_parallel
        from sglang.srt.utils.common import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        model, state = _Model(self.state), self.state
        updater = WeightUpdater(tp_rank=0, device="cpu", gpu_id=0, model_config=None, custom_weight_loaders={},
                                get_model=lambda: model, update_model_fields=lambda *a, **k: None,
                                recapture_cuda_graph=lambda: None, get_model_runner=lambda: None)

        class Runner:
            weight_updater = updater

        class TpWorker:
            model_runner = Runner()

            def weight_update_runners(self):
                return [("target", self.model_runner)]

            def init_weights_update_group(self, req):  # TpModelWorker.init_weights_update_group
                return updater.init_weights_update_group(req.master_address, req.master_port, req.rank_offset,
                                                         req.world_size, req.group_name, req.backend)

            def destroy_weights_update_group(self, req):
                return updater.destroy_weights_update_group(req.group_name)

            def deserialize_own_rank(self, payloads):  # TpModelWorker.deserialize_own_rank
                monkey_patch_torch_reductions()
                return MultiprocessingSerializer.deserialize(payloads[get_parallel().tp_rank])

        class Scheduler:
            _engine_paused = False

            def record_weight_version_change(self, new_version):
                state.set_version(new_version)

        self.updater = updater
        return SchedulerWeightUpdaterManager(tp_worker=TpWorker(), draft_worker=None, memory_saver_adapter=None,
                                             flush_cache=lambda **kw: not state.inflight,
                                             is_fully_idle=lambda **kw: not state.inflight, scheduler=Scheduler())

    # ----- request checks -----

    def _violation(self, route: str, message: str) -> ValueError:
        self.state.violations.append(f"{route}: {message}")
        return ValueError(f"{route}: {message}")

    def parse(self, route: str, body: dict) -> Any:
        """The route's io_struct object, parsed as FastAPI parses it (ValueError if refused)."""
        import msgspec
        import pydantic

        cls = getattr(self.io, ROUTE_TYPES[route])
        fields = {f.name for f in msgspec.structs.fields(cls)}
        unknown = sorted(set(body) - fields)
        if unknown:  # recorded, then ignored as the real server ignores them
            self._violation(route, f"fields {unknown} are not fields of SGLang's {cls.__name__} "
                                   f"(it has {sorted(fields)}); SGLang ignores them")
        try:
            return pydantic.TypeAdapter(cls).validate_python({k: v for k, v in body.items() if k in fields})
        except (pydantic.ValidationError, TypeError, ValueError) as err:
            raise self._violation(route, f"SGLang's {cls.__name__} refuses the body: {err}") from None

    def check(self, route: str, body: dict, state: Any) -> None:
        if route in ROUTE_TYPES:
            self.parse(route, body)

    def check_generate(self, body: dict, state: Any) -> None:
        import dataclasses

        import pydantic
        from sglang.srt.entrypoints.api_contract import generate_contract_error
        from sglang.srt.sampling.sampling_params import SamplingParams

        fields = {f.name for f in dataclasses.fields(self.io.GenerateReqInput)}
        unknown = sorted(set(body) - fields)
        if unknown:  # recorded, then ignored as the real server ignores them
            self._violation("/generate", f"fields {unknown} are not fields of GenerateReqInput; SGLang ignores them")
            body = {k: v for k, v in body.items() if k in fields}
        error = generate_contract_error(body)
        if error is not None:
            raise self._violation("/generate", f"the JSON contract refuses the body: {error}")
        try:
            obj = pydantic.TypeAdapter(self.io.GenerateReqInput).validate_python(body)
            obj.normalize_batch_and_arguments()
            items = [obj] if obj.is_single else [obj[i] for i in range(obj.batch_size)]
            vocab = state.engine.model.config.vocab_size if state.engine is not None else 1 << 20
            tokenizer = state.engine.tokenizer if state.engine is not None else None
            for item in items:
                params = SamplingParams(**dict(item.sampling_params or {}))
                params.normalize(tokenizer)
                params.verify(vocab)
        except (pydantic.ValidationError, TypeError, ValueError) as err:
            raise self._violation("/generate", f"SGLang refuses the request: {err}") from None

    def encode_generate(self, out: dict) -> dict:
        from sglang.api.v1.api_types import GenerateResponse

        return GenerateResponse.from_json_value(out).to_json_value()

    # ----- weight updates (the protocol server's weights interface) -----

    @property
    def session_open(self) -> bool:
        return self.manager._session is not None

    @property
    def groups(self) -> dict:
        return self.updater._model_update_group

    def _run(self, route: str, method: str, body: dict) -> tuple[bool, str]:
        obj = self.parse(route, body)
        if method == "update_weights_from_tensor":  # TokenizerManager.update_weights_from_tensor
            from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads

            obj.serialized_named_tensors = normalize_serialized_named_tensor_payloads(obj.serialized_named_tensors)
        out = getattr(self.manager, method)(obj)
        return bool(out.success), str(out.message)

    def begin(self, body: dict) -> tuple[bool, str]:
        return self._run("/begin_weight_update", "begin_weight_update", body)

    def end(self, body: dict) -> tuple[bool, str]:
        return self._run("/end_weight_update", "end_weight_update", body)

    def update_from_tensor(self, body: dict) -> tuple[bool, str]:
        return self._run("/update_weights_from_tensor", "update_weights_from_tensor", body)

    def update_from_distributed(self, body: dict) -> tuple[bool, str]:
        return self._run("/update_weights_from_distributed", "update_weights_from_distributed", body)

    def init_group(self, body: dict) -> tuple[bool, str]:
        return self._run("/init_weights_update_group", "init_weights_update_group", body)

    def destroy_group(self, body: dict) -> tuple[bool, str]:
        return self._run("/destroy_weights_update_group", "destroy_weights_update_group", body)


PROTOCOL_ONLY = ("--tiny", "--noop", "--sglang-source", "--fail-first", "--delay-s", "--max-batch-size", "--seed",
                 "--num-threads", "--noop-tokens")


def _sglang_flags(argv: list[str]) -> list[str]:
    """The command line without the protocol server's own flags (everything else is SGLang's)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in PROTOCOL_ONLY:
            takes_value = name not in ("--tiny", "--noop") and "=" not in arg
            skip = takes_value
            continue
        out.append(arg)
    return out


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None
