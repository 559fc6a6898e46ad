"""Weight sync on CPU next to the raw cost of moving the same bytes, measured in the same run.

    python benchmarks/sync_bench.py                  # disk: 1.12B-parameter Qwen3-like learner, bf16, TP=1
    python benchmarks/sync_bench.py --quick          # small smoke run (seconds)
    python benchmarks/sync_bench.py --distributed    # distributed over gloo into 1, 2, 4 replicas
    python benchmarks/sync_bench.py --distributed --quick
    python benchmarks/sync_bench.py --tensor-ipc     # GPU only: CUDA IPC into a second process
    flock /tmp/s2lpo-heavy.lock python benchmarks/sync_bench.py --real   # disk vs distributed, real SGLang

--real: `WeightSync` with the disk and the distributed (gloo) transports, alternating, into ONE
real SGLang 0.5.23 server on this CPU (launched with `profile: cpu` from .venv-sglang) serving an
fp32 Qwen3-shaped model of about 0.2 GB (hidden 1024, 12 layers, the synthetic vocabulary);
every push is a whole sync (export, push, every replica's version checked, no parity). Seconds
per GB of each and the ratio disk / distributed, in one run.

--distributed: the `distributed` transport (one update group over the trainer and every replica,
one broadcast per bucket, sync/distributed.py) pushes `--gb` GB of bf16 tensors in buckets of
`--bucket-mb` (as the megatron export's flat buffer holds them: back to back, so they are sent
without a copy) into N = 1, 2, 4 protocol-server replicas (`--noop`: they post SGLang's flattened
receive and keep no model), generation paused, one weight-update session per replica, every
HTTP call included; next to it, in the same run, a raw gloo broadcast of the same packed buckets
from the trainer to N processes that only receive (into a new buffer per bucket, as SGLang's
receiver does). Seconds per GB and the ratio raw / transport
(target >= 0.8) per N; one broadcast serves every replica, so both should stay about flat in N
where the machine has a core per receiver.

The learner is megatron-core model chunks with random bf16 weights (2.24 GB; fp32 would need
4.5 GB for the learner plus 4.5 GB for the engine, too much beside other jobs on a shared 24 GiB
machine). One sync (`WeightSync(..., transport="disk")`) is: export (TP gather, HF names) into
buckets, write them as safetensors shards + index + config.json into a temporary directory,
rename it, `LocalEngine.update_weights_from_disk` (read every tensor, copy it into the engine's
fp32 model), version check. The reference in the same run is `safetensors.torch.save_file` of a
dict holding the same tensors (names, shapes, dtype) followed by `load_file`: the least any disk
sync of these bytes can cost here. Both go through the page cache (nothing is fsynced). Also
printed: the in-process `buckets` route (no files), the CPU default for a LocalEngine.

GB/s counts HF tensor bytes (bf16) per second of wall time; ratio = sync time / raw time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron_s2lpo.config.model import ModelArch  # noqa: E402
from shapes import QWEN3_1B, QWEN3_QUICK  # noqa: E402

FULL, QUICK = QWEN3_1B, QWEN3_QUICK


def empty_engine(arch: ModelArch):
    """A LocalEngine of `arch` with uninitialised fp32 weights (random init of 1B parameters on
    CPU takes long and every weight is overwritten by the sync anyway)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_s2lpo.rollout.local import LocalEngine

    cfg = arch.to_hf_config_dict()
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    return LocalEngine(model, model_id="bench")


def raw_safetensors(named: list[tuple[str, torch.Tensor]], out_dir: str) -> tuple[float, float]:
    """(save seconds, load seconds) of one safetensors file holding `named`.

    load_file maps the file lazily; the load time includes one copy of every tensor into
    memory of its own, as the engine's load copies every tensor into its parameters.
    """
    from safetensors.torch import load_file, save_file

    state = {name: tensor.clone() for name, tensor in named}
    path = os.path.join(out_dir, "raw.safetensors")
    start = time.perf_counter()
    save_file(state, path)
    saved = time.perf_counter()
    loaded = {name: tensor.clone() for name, tensor in load_file(path).items()}
    done = time.perf_counter()
    assert len(loaded) == len(state)
    del state, loaded
    os.remove(path)
    return saved - start, done - saved


def _raw_receiver(address: str, port: int, world: int, rank: int, sizes: list[int], rounds: int) -> None:
    """Joins the group and receives `rounds` x the buckets (the raw reference's replica), each into
    a new buffer as SGLang's receiver allocates one per bucket (`FlattenedTensorBucket.empty`)."""
    from megatron_s2lpo.sync.distributed import init_custom_group

    torch.set_num_threads(1)
    group = init_custom_group("gloo", address, port, world, rank, "raw_bench")
    for _ in range(rounds):
        for size in sizes:
            torch.distributed.broadcast(torch.empty(size, dtype=torch.uint8), src=0, group=group)
    torch.distributed.destroy_process_group(group)


def raw_broadcast(flats: list[torch.Tensor], num_receivers: int, rounds: int) -> list[float]:
    """Seconds per round of one gloo broadcast per bucket to `num_receivers` processes."""
    import multiprocessing as mp

    from megatron_s2lpo.sync.distributed import init_custom_group
    from megatron_s2lpo.utils.ports import free_port

    ctx = mp.get_context("spawn")
    port, world = free_port(), 1 + num_receivers
    procs = [ctx.Process(target=_raw_receiver, args=("127.0.0.1", port, world, r, [f.numel() for f in flats],
                                                     rounds + 1)) for r in range(1, world)]
    for proc in procs:
        proc.start()
    group = init_custom_group("gloo", "127.0.0.1", port, world, 0, "raw_bench")
    times = []
    for _ in range(rounds + 1):  # the first round warms the connections up
        start = time.perf_counter()
        for flat in flats:
            torch.distributed.broadcast(flat, src=0, group=group)
        times.append(time.perf_counter() - start)
    for proc in procs:
        proc.join(60)
    torch.distributed.destroy_process_group(group)
    return times[1:]


def _ipc_receiver(conn) -> None:
    """A second process that rebuilds tensors the way an SGLang 0.5.23 TP rank does.

    SGLang's side, carried here: `patch_torch.monkey_patch_torch_reductions` (rebuild_cuda_tensor
    maps argument 6, the device, from the GPU's UUID back to this process's index), then
    `MultiprocessingSerializer.deserialize` (base64 + unpickle) of its own rank's payload, then
    `FlattenedTensorBucket.reconstruct_tensors` (views of the flat buffer) and a copy of every
    tensor into the model's parameters (`load_weights`)."""
    import base64
    import pickle

    from torch.multiprocessing import reductions

    original = reductions.rebuild_cuda_tensor

    def rebuild_by_uuid(*args):
        device = args[6]
        if isinstance(device, str):
            device = next(i for i in range(torch.cuda.device_count())
                          if str(torch.cuda.get_device_properties(i).uuid) == device)
        return original(*args[:6], device, *args[7:])

    reductions.rebuild_cuda_tensor = rebuild_by_uuid
    params: dict = {}
    while True:
        payload = conn.recv()
        if payload is None:
            return
        data = pickle.loads(base64.b64decode(payload))
        flat, metadata = data["flattened_tensor"], data["metadata"]
        tensors = [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in metadata]
        for name, tensor in tensors:
            params.setdefault(name, torch.empty_like(tensor)).copy_(tensor)
        torch.cuda.synchronize()
        checksum = float(sum(p.float().sum() for p in params.values()))
        del data, flat, tensors
        conn.send(checksum)


def tensor_ipc_bench(args: argparse.Namespace) -> None:
    """CUDA IPC of flattened buckets into a second process vs a device-to-device copy (GPU only)."""
    import multiprocessing as mp

    from megatron_s2lpo.rollout.sglang_tensors import pack_bucket, serialize_per_rank

    if not torch.cuda.is_available():
        raise SystemExit("--tensor-ipc needs a CUDA device")
    total, tensor_bytes = int(args.gb * 1e9), 8 << 20
    per = max(1, (args.bucket_mb << 20) // tensor_bytes)
    named = [(f"layer{i}.weight", torch.randn(tensor_bytes // 2, device="cuda", dtype=torch.bfloat16))
             for i in range(max(1, total // tensor_bytes))]
    buckets = [named[i:i + per] for i in range(0, len(named), per)]
    num_bytes = len(named) * tensor_bytes
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_ipc_receiver, args=(child,))
    proc.start()
    expected = float(sum(t.float().sum() for _, t in named))
    times = []
    for _ in range(args.repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for bucket in buckets:
            flat, metadata = pack_bucket(bucket)
            (payload,) = serialize_per_rank(flat, metadata, 1)
            parent.send(payload)
            checksum = parent.recv()  # the receiver copied everything: the buffer may go
        times.append(time.perf_counter() - start)
    parent.send(None)
    proc.join(60)
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copies = []
    for _ in range(args.repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - start)
    ipc, copy = min(times[1:]), min(copies[1:])
    print(f"{num_bytes / 1e9:.2f} GB bf16, {len(buckets)} buckets: CUDA IPC into a second process {num_bytes / ipc / 1e9:.1f} "
          f"GB/s, device-to-device copy {num_bytes / copy / 1e9:.1f} GB/s, ratio {copy / ipc:.2f}; "
          f"checksum {'ok' if abs(checksum - expected) <= 1e-3 * abs(expected) + 1 else 'MISMATCH'}")


def distributed_bench(args: argparse.Namespace) -> None:
    """The distributed transport into N noop replicas vs a raw broadcast (see the module docstring)."""
    from benchmarks_servers import noop_replicas

    from megatron_s2lpo.config.sync import SyncConfig
    from megatron_s2lpo.rollout.sglang_tensors import pack_bucket
    from megatron_s2lpo.sync.base import TransportContext
    from megatron_s2lpo.sync.distributed import DistributedTransport

    total = int((0.05 if args.quick else args.gb) * 1e9)
    tensor_bytes, bucket_bytes = 8 << 20, args.bucket_mb << 20
    num_tensors, per = max(1, total // tensor_bytes), max(1, bucket_bytes // tensor_bytes)
    # Buckets as the megatron export hands them over (`flat_buckets`): views into one flat buffer
    # per bucket, back to back; random bf16 bytes.
    buckets = []
    for first in range(0, num_tensors, per):
        count = min(per, num_tensors - first)
        flat = torch.randint(0, 255, (count * tensor_bytes,), dtype=torch.uint8)
        buckets.append([(f"layer{first + j}.weight", flat[j * tensor_bytes:(j + 1) * tensor_bytes].view(torch.bfloat16))
                        for j in range(count)])
    num_bytes = num_tensors * tensor_bytes
    flats = [pack_bucket(b)[0] for b in buckets]
    print(f"{num_bytes / 1e9:.2f} GB bf16 in {len(buckets)} buckets of <= {args.bucket_mb} MiB, gloo on 127.0.0.1, "
          f"{os.cpu_count()} cores, best of {args.repeats}")
    print(f"{'replicas':>8} | {'raw s/GB':>8} | {'transport s/GB':>14} | raw/transport")
    for n in (1, 2, 4):
        raw = min(raw_broadcast(flats, n, args.repeats))
        with noop_replicas(n) as engine:
            transport = DistributedTransport(engine, SyncConfig(group_backend="gloo", master_address="127.0.0.1",
                                                                group_timeout_s=300), TransportContext(arch=None))
            pushes = []
            for version in range(1, args.repeats + 2):  # the first push also builds the group
                start = time.perf_counter()
                with engine.paused():
                    transport.push(iter(buckets), version)
                pushes.append(time.perf_counter() - start)
            transport.close()
        best = min(pushes[1:])
        gb = num_bytes / 1e9
        print(f"{n:>8} | {raw / gb:>8.3f} | {best / gb:>14.3f} | {raw / best:>13.2f}")


def real_server_bench(args: argparse.Namespace) -> None:
    """disk vs distributed (gloo) WeightSync into one real SGLang server (module docstring, --real)."""
    from types import SimpleNamespace

    from megatron_s2lpo.config.rollout import EngineConfig
    from megatron_s2lpo.config.sync import SyncConfig
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer
    from megatron_s2lpo.rollout import LocalEngine, SGLangEngine
    from megatron_s2lpo.sync.exporter import StateDictExporter
    from megatron_s2lpo.sync.weight_sync import WeightSync
    from megatron_s2lpo.utils.ports import server_ports

    tok = build_synthetic_tokenizer()
    arch = ModelArch(family="qwen3", vocab_size=len(tok), hidden_size=1024, ffn_hidden_size=1024, num_layers=12,
                     num_attention_heads=8, num_query_groups=4, head_dim=128, qk_layernorm=True,
                     tie_word_embeddings=False, max_position_embeddings=256)
    root = tempfile.mkdtemp(prefix="sync_bench_real_")
    try:
        model = LocalEngine.from_arch(arch, tokenizer=tok, init_seed=0).model
        model.save_pretrained(os.path.join(root, "model"))
        tok.save_pretrained(os.path.join(root, "model"))
        state = model.state_dict()
        num_bytes = sum(t.numel() * t.element_size() for t in state.values())
        engine = SGLangEngine(EngineConfig(backend="sglang", model_path=os.path.join(root, "model"), profile="cpu",
                                           port=server_ports(1)[0], startup_timeout_s=900), name="bench")
        one_rank = SimpleNamespace(rank=0, world_size=1, dp_rank=0)
        syncs = {name: WeightSync(None, one_rank, arch, engine,
                                  SyncConfig(transport=name, disk_dir=os.path.join(root, "sync"), disk_keep=1,
                                             group_backend="gloo", master_address="127.0.0.1", parity_every=0,
                                             bucket_bytes=args.bucket_mb << 20),
                                  exporter=StateDictExporter(state, args.bucket_mb << 20))
                 for name in ("disk", "distributed")}
        times: dict[str, list[float]] = {"disk": [], "distributed": []}
        version = 0
        try:
            for _ in range(args.repeats + 1):  # alternating; the first round also builds the group
                for name, sync in syncs.items():
                    version += 1
                    times[name].append(sync.sync(version).seconds)
        finally:
            for sync in syncs.values():
                sync.close()
            engine.close()
        gb = num_bytes / 1e9
        disk, dist = min(times["disk"][1:]), min(times["distributed"][1:])
        print(f"{gb:.3f} GB fp32 into one real SGLang 0.5.23 server (CPU profile), best of {args.repeats}")
        print(f"{'transport':>11} | {'s/GB':>6} | rounds (s)")
        for name, best in (("disk", disk), ("distributed", dist)):
            print(f"{name:>11} | {best / gb:>6.2f} | {' '.join(f'{t:.3f}' for t in times[name])}")
        print(f"ratio disk / distributed: {disk / dist:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, for a smoke run")
    parser.add_argument("--bucket-mb", type=int, default=512, help="bucket (and shard) size in MiB")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (raw safetensors, disk sync)")
    parser.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
    parser.add_argument("--distributed", action="store_true", help="distributed over gloo into 1, 2, 4 replicas")
    parser.add_argument("--tensor-ipc", action="store_true", help="GPU: CUDA IPC into a second process")
    parser.add_argument("--gb", type=float, default=1.0, help="--distributed / --tensor-ipc: GB per sync")
    parser.add_argument("--real", action="store_true", help="disk vs distributed into a real SGLang server (CPU)")
    args = parser.parse_args()
    if args.real:
        real_server_bench(args)
        return
    if args.distributed:
        distributed_bench(args)
        return
    if args.tensor_ipc:
        tensor_ipc_bench(args)
        return

    from megatron_s2lpo.config.sync import SyncConfig
    from megatron_s2lpo.convert.mcore_io import build_conversion_chunks
    from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel
    from megatron_s2lpo.sync.exporter import MegatronExporter
    from megatron_s2lpo.sync.weight_sync import WeightSync

    arch = QUICK if args.quick else FULL
    groups = init_parallel(1, 1)
    chunks = build_conversion_chunks(arch, groups, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.bfloat16))
    root = args.dir or tempfile.mkdtemp(prefix="sync_bench_")
    os.makedirs(root, exist_ok=True)
    bucket_bytes = args.bucket_mb << 20
    try:
        # The same (name, shape, dtype) tensors as the sync writes, from one export.
        exporter = MegatronExporter(chunks, groups, arch, bucket_bytes)
        named = [pair for bucket in exporter.buckets() for pair in bucket]
        num_bytes = sum(t.numel() * t.element_size() for _, t in named)
        engine = empty_engine(arch)
        config = SyncConfig(disk_dir=os.path.join(root, "sync"), disk_keep=1, bucket_bytes=bucket_bytes,
                            parity_every=0)
        sync = WeightSync(chunks, groups, arch, engine, config, transport="disk")
        raw, disk = [], []
        for version in range(1, args.repeats + 1):  # alternate, so page-cache writeback hits both alike
            raw.append(raw_safetensors(named, root))
            disk.append(sync.sync(version))
        del named
        in_process = WeightSync(chunks, groups, arch, engine, config).sync(args.repeats + 1)

        print(f"model: {arch.family} hidden={arch.hidden_size} layers={arch.num_layers} vocab={arch.vocab_size} "
              f"params={arch.num_params() / 1e9:.3f}B, learner bf16 TP=1, engine LocalEngine fp32, "
              f"threads={torch.get_num_threads()}")
        print(f"bytes: {num_bytes / 1e9:.3f} GB of HF tensors, buckets/shards of <= {args.bucket_mb} MiB, "
              f"{disk[0].num_buckets} buckets")
        for i, ((save_s, load_s), result) in enumerate(zip(raw, disk), 1):
            raw_s = save_s + load_s
            print(f"round {i}: raw safetensors save {save_s:.2f} s + load {load_s:.2f} s = {raw_s:.2f} s "
                  f"({num_bytes / raw_s / 1e9:.2f} GB/s) | disk sync {result.seconds:.2f} s "
                  f"({result.gb_per_s:.2f} GB/s) | ratio {result.seconds / raw_s:.2f}")
        best_raw = min(save_s + load_s for save_s, load_s in raw)
        best_sync = min(result.seconds for result in disk)
        print(f"best: raw safetensors {best_raw:.2f} s ({num_bytes / best_raw / 1e9:.2f} GB/s), disk sync "
              f"{best_sync:.2f} s ({num_bytes / best_sync / 1e9:.2f} GB/s), ratio {best_sync / best_raw:.2f}")
        print(f"in-process buckets sync (no files): {in_process.seconds:.2f} s ({in_process.gb_per_s:.2f} GB/s)")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
        destroy_parallel()


if __name__ == "__main__":
    main()
