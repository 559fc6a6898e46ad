"""SGLang 0.5.23's tensor wire formats, written for the trainer (which may not have SGLang).

Both fast weight updates move one flat byte buffer per bucket:

- `/update_weights_from_distributed` with load_format="flattened_bucket": the server allocates
  `FlattenedTensorBucket.empty(names, dtypes, shapes)` (`sglang/srt/weight_sync/tensor_bucket.py`:
  the tensors' bytes back to back in the given order, no padding, and it refuses a tensor whose
  byte offset is not a multiple of its dtype's size) and receives ONE broadcast into it
  (`model_runner_components/weight_updater.py::_receive_bucketed_weights_from_distributed`).
- `/update_weights_from_tensor` with load_format="flattened_bucket": each TP rank deserializes
  its own entry of `serialized_named_tensors` (`TpModelWorker.deserialize_own_rank`) with
  `MultiprocessingSerializer.deserialize` (base64, then `SafeUnpickler`, `utils/common.py`) into
  {"flattened_tensor": uint8 tensor, "metadata": [m, ...]} and rebuilds the tensors from the
  attributes name, shape, dtype, start_idx, end_idx, numel of each m
  (`WeightUpdater._update_weights_from_flattened_bucket`).

`pack_bucket` lays a bucket out that way: tensors ordered by dtype size, largest first (every
offset is then aligned), bytes concatenated; a bucket that already lies back to back in one
buffer (the exporter's reused flat buffer, whose 16-byte-aligned offsets leave no gaps when every
tensor's size is a multiple of 16 bytes, as in real models) is sent as it is, without a copy. The metadata entries are `types.SimpleNamespace`
objects with FlattenedTensorMetadata's fields: SafeUnpickler allows that class, the server reads
the entries by attribute, and the trainer needs no SGLang import to build them.

`serialize_per_rank` pickles the payload once PER TP RANK, as `Engine._serialize_tensors_per_rank`
does (`entrypoints/engine.py`): each rank opens its own CUDA-IPC reference, so the trainer's IPC
reference counts drop cleanly after every load (`deserialize_own_rank` warns that a shared payload
breaks them). The pickler is `multiprocessing.reduction.ForkingPickler` (the class SGLang's
serializer uses; torch registers its tensor reductions on it) with the device of every CUDA tensor
written as the GPU's UUID instead of its index, what SGLang's `monkey_patch_torch_reductions`
(`utils/patch_torch.py::_reduce_tensor_modified`, argument 6 of `rebuild_cuda_tensor`) does in the
sender: the server, whose CUDA_VISIBLE_DEVICES may number the GPUs differently, maps the UUID back
(its own patched `rebuild_cuda_tensor`). Here that is a dispatch table of one pickler, not a
process-wide patch. The caller keeps the flat tensor alive until every server has answered.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import types
from collections.abc import Iterable

import torch

FLATTENED_BUCKET = "flattened_bucket"  # SGLang's load_format for both routes
_ARG_DEVICE = 6  # rebuild_cuda_tensor's storage_device argument (SGLang: _REDUCE_TENSOR_ARG_DEVICE_INDEX)
_SHARING_LOCK = threading.Lock()


def pack_order(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The bucket in packing order: larger dtypes first, export order within a dtype size."""
    items = list(named)
    return sorted(items, key=lambda item: -item[1].element_size())  # stable


def _metadata(items: list[tuple[str, torch.Tensor]]) -> list[types.SimpleNamespace]:
    out, offset = [], 0
    for name, tensor in items:
        size = tensor.numel() * tensor.element_size()
        out.append(types.SimpleNamespace(name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype,
                                         start_idx=offset, end_idx=offset + size, numel=size))
        offset += size
    return out


def packed_view(named: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """The bucket's bytes as one uint8 view when its tensors already lie back to back in one
    storage, in order, each offset aligned to its dtype (the exporter's flat buffer when no
    tensor needs padding): SGLang's layout without a copy. None otherwise."""
    first = named[0][1]
    storage, start = first.untyped_storage(), first.storage_offset() * first.element_size()
    offset = start
    for _, tensor in named:
        if (not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() != storage.data_ptr()
                or tensor.storage_offset() * tensor.element_size() != offset
                or (offset - start) % tensor.element_size()):
            return None
        offset += tensor.numel() * tensor.element_size()
    flat = torch.empty(0, dtype=torch.uint8, device=first.device)
    flat.set_(storage, start, (offset - start,))
    return flat


def pack_bucket(named: Iterable[tuple[str, torch.Tensor]], *, buffer: "PackBuffer | None" = None
                ) -> tuple[torch.Tensor, list[types.SimpleNamespace]]:
    """(flat uint8 tensor, FlattenedTensorMetadata-like entries) of a bucket.

    A bucket already laid out back to back (`packed_view`) is used as it is, in its own order;
    otherwise it is copied in `pack_order`, into `buffer` when given (reused: the result is a
    view of it, valid until the next pack into the same buffer) or a new tensor."""
    named = list(named)
    if not named:
        raise ValueError("cannot pack an empty bucket")
    view = packed_view(named)
    if view is not None:
        return view, _metadata(named)
    items = pack_order(named)
    if not items:
        raise ValueError("cannot pack an empty bucket")
    parts = [tensor.detach().contiguous().flatten().view(torch.uint8) for _, tensor in items]
    metadata = _metadata(items)
    if buffer is None:
        return torch.cat(parts), metadata
    out = buffer.take(metadata[-1].end_idx, parts[0].device)
    torch.cat(parts, out=out)
    return out, metadata


class PackBuffer:
    """One flat byte buffer reused by every bucket of every sync (grown to the largest bucket).

    A fresh allocation per bucket costs its page faults on every sync (on a CPU, more than the
    copy itself); the exporter keeps its own buffer for the same reason."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, num_bytes: int, device: torch.device) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < num_bytes or self._buffer.device != device:
            self._buffer = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        return self._buffer[:num_bytes]


def check_flattened(flat: torch.Tensor, metadata: list) -> None:
    """ValueError unless `flat` is exactly the bytes `metadata` describes, as SGLang rebuilds them.

    The server trusts the metadata: on the tensor route a bucket whose bytes do not match it fails
    to rebuild inside the scheduler and the whole server exits; on the distributed route the
    metadata sizes the receive buffer of the one broadcast. So every payload is checked before it
    is sent: one uint8 buffer, tensors back to back from byte 0 in metadata order, each `numel`
    (bytes) = its shape's elements x its dtype's size, each offset aligned to its dtype, names
    unique, and the last tensor ending at the buffer's end."""
    if flat.dtype != torch.uint8 or flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"a flattened bucket is one contiguous uint8 vector, got {flat.dtype} of shape "
                         f"{tuple(flat.shape)}")
    if not metadata:
        raise ValueError("a flattened bucket needs metadata for at least one tensor")
    offset, names = 0, set()
    for m in metadata:
        where = f"flattened bucket tensor {m.name!r}"
        if m.name in names:
            raise ValueError(f"{where} appears twice in the bucket's metadata")
        names.add(m.name)
        if not isinstance(m.dtype, torch.dtype) or any(int(d) < 0 for d in m.shape):
            raise ValueError(f"{where}: dtype {m.dtype!r} / shape {tuple(m.shape)} is not a tensor's")
        size = torch.Size(m.shape).numel() * m.dtype.itemsize
        if m.start_idx != offset or m.end_idx - m.start_idx != size or m.numel != size:
            raise ValueError(f"{where}: metadata says bytes [{m.start_idx}, {m.end_idx}) numel {m.numel}, but a "
                             f"{m.dtype} tensor of shape {tuple(m.shape)} right after the previous one takes "
                             f"[{offset}, {offset + size})")
        if offset % m.dtype.itemsize:
            raise ValueError(f"{where}: byte offset {offset} is not a multiple of its dtype's size "
                             f"{m.dtype.itemsize} (SGLang refuses it)")
        offset += size
    if offset != flat.numel():
        raise ValueError(f"the flattened bucket holds {flat.numel()} bytes but its metadata describes {offset} "
                         "(truncated or padded); SGLang would fail to rebuild it")


def unpack_bucket(flat: torch.Tensor, metadata: list) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a packed bucket (views into `flat`), as FlattenedTensorBucket rebuilds them."""
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in metadata]


def _device_uuid(device: object) -> object:
    return str(torch.cuda.get_device_properties(device).uuid) if isinstance(device, int) else device


def _reduce_tensor_by_uuid(tensor: torch.Tensor):
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    if getattr(rebuild, "__name__", "") in ("rebuild_cuda_tensor", "_rebuild_cuda_tensor_modified"):
        args = (*args[:_ARG_DEVICE], _device_uuid(args[_ARG_DEVICE]), *args[_ARG_DEVICE + 1:])
    return rebuild, args


@contextlib.contextmanager
def _cpu_sharing(strategy: str | None):
    """CPU storages travel as shared-memory files only under the file_system strategy (the
    default file_descriptor one needs the sender's resource sharer and authkey)."""
    if strategy is None:
        yield
        return
    import torch.multiprocessing as tmp

    with _SHARING_LOCK:
        before = tmp.get_sharing_strategy()
        tmp.set_sharing_strategy(strategy)
        try:
            yield
        finally:
            tmp.set_sharing_strategy(before)


def serialize(obj: object, *, cpu_sharing: str | None = None) -> str:
    """base64(ForkingPickler bytes) of `obj`: `MultiprocessingSerializer.serialize(obj,
    output_str=True)` with CUDA devices named by UUID."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing.reductions  # noqa: F401 - registers torch's reductions on ForkingPickler

    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    table = dict(pickler.dispatch_table)
    for cls in (torch.Tensor, torch.nn.Parameter):
        table[cls] = _reduce_tensor_by_uuid
    pickler.dispatch_table = table
    with _cpu_sharing(cpu_sharing):
        pickler.dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def serialize_per_rank(flat: torch.Tensor, metadata: list, num_ranks: int, *,
                       cpu_sharing: str | None = None) -> list[str]:
    """`serialized_named_tensors` of a flattened bucket for a server with `num_ranks` TP ranks.

    CUDA tensors only, unless `cpu_sharing="file_system"` (CPU tests: shared-memory files that a
    process on the same machine opens by name). The payload is checked first (`check_flattened`)."""
    if not flat.is_cuda and cpu_sharing != "file_system":
        raise ValueError("the tensor weight update passes CUDA IPC handles and needs CUDA tensors "
                         f"(got a {flat.device} bucket); use sync.transport=disk without CUDA")
    check_flattened(flat, metadata)
    payload = {"flattened_tensor": flat, "metadata": metadata}
    return [serialize(payload, cpu_sharing=None if flat.is_cuda else cpu_sharing) for _ in range(num_ranks)]
