"""Mixture-of-experts pieces of the in-process engine (local.py): per-expert weight names over
transformers' fused expert tensors, and the experts each router chose during a forward.

transformers 5 keeps a Qwen3-MoE layer's experts as two 3-D parameters, `experts.gate_up_proj`
(E, 2 * F, H) = per expert [gate; up], and `experts.down_proj` (E, H, F); checkpoints (and
SGLang's loader) name them per expert. Its router (`mlp.gate`, Qwen3MoeTopKRouter) returns
(logits, top-k weights, top-k ids) for the (tokens, H) hidden states of one forward, tokens in
(batch, sequence) order.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

Tensor = torch.Tensor
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def expert_views(model: torch.nn.Module) -> tuple[dict[str, Tensor], set[str]]:
    """({per-expert checkpoint name: view into the fused parameter}, the fused parameters' names)."""
    views: dict[str, Tensor] = {}
    fused: set[str] = set()
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter)
                and gate_up.dim() == 3 and down.dim() == 3):
            continue
        width = gate_up.shape[1] // 2
        fused |= {f"{name}.gate_up_proj", f"{name}.down_proj"}
        for e in range(gate_up.shape[0]):
            views[f"{name}.{e}.gate_proj.weight"] = gate_up[e, :width]
            views[f"{name}.{e}.up_proj.weight"] = gate_up[e, width:]
            views[f"{name}.{e}.down_proj.weight"] = down[e]
    return views, fused


class _Recorded:
    """The top-k ids of one forward, per layer."""

    def __init__(self, num_layers: int) -> None:
        self.ids: list[Tensor | None] = [None] * num_layers

    def stacked(self, batch_size: int) -> Tensor:
        """(batch, sequence, layers * k): layer-major columns, as SGLang's (token, layer, k) flattened."""
        if any(ids is None for ids in self.ids):
            raise RuntimeError("a router did not run during the forward: the routing would be incomplete")
        per_layer = torch.stack([ids.to(torch.int32) for ids in self.ids], dim=1)  # (tokens, layers, k)
        return per_layer.reshape(batch_size, -1, per_layer.shape[1] * per_layer.shape[2]).cpu()


class RoutingRecorder:
    """Forward hooks on every router of `model` that keep its top-k ids while `recording(True)`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers: dict[int, torch.nn.Module] = {}
        for name, module in model.named_modules():
            parent_name = name.rsplit(".", 1)[0]
            if not name.endswith(".gate") or not hasattr(model.get_submodule(parent_name), "experts"):
                continue
            layer = int(_LAYER.search(name + ".").group(1))
            self.routers[layer] = module
            module.register_forward_hook(self._hook(layer))
        self._current: _Recorded | None = None

    def _hook(self, layer: int):
        def keep(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            if self._current is not None:
                self._current.ids[layer] = output[2].detach()  # (logits, weights, ids)
        return keep

    @contextlib.contextmanager
    def recording(self, on: bool) -> Iterator[_Recorded | None]:
        """Record the routers' choices during the block (a no-op when `on` is false)."""
        if not on:
            yield None
            return
        self._current = _Recorded(len(self.routers))
        try:
            yield self._current
        finally:
            self._current = None
