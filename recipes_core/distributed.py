"""Process groups, seeds, and FSDP2 sharding with a model that is never fully built on every rank.

Launch: `torchrun --nproc_per_node N -m recipes_core.finetune ...` sets RANK/WORLD_SIZE/LOCAL_RANK; a
plain `python -m recipes_core.finetune ...` becomes a one-process group, so there is a single code path
(FSDP with one rank shards nothing but runs the same hooks, all-reduces and checkpoint code).

Loading (why it is done this way): a 70B model in fp32 is 280 GB; N ranks each building it on CPU would
need N x 280 GB, and one rank reading it all to broadcast it needs 280 GB on that rank. Instead every rank
builds the model on the meta device (shapes only, no memory), shards it with fully_shard, allocates only
its own shards (to_empty), and fills them with the rows of the safetensors files that are its own
(load_sharded_weights): each rank reads 1/N of the weights, and none of them sends any. Where the weights
are not in safetensors files (only *.bin), rank 0 alone reads the full weights, which
set_model_state_dict(..., broadcast_from_rank0=True) sends tensor by tensor to the shards
(load_full_weights_from_rank0).
"""

from __future__ import annotations


import gc
import os
import random
import sys
import types
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recipes_core import torch_internals
from recipes_core.launch import free_port


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    created_group: bool  # True when this process created the group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(backend: str = "auto") -> DistEnv:
    """Join (or create) the process group: nccl on CUDA, gloo on CPU unless told otherwise."""
    launched = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():  # NCCL allows one rank per GPU
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Launch one rank per "
                f"GPU (--nproc_per_node {torch.cuda.device_count()}), or run on CPU with CUDA_VISIBLE_DEVICES=''.")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    created = not dist.is_initialized()
    if created:
        device_id = device if device.type == "cuda" else None
        if launched:
            dist.init_process_group(backend=backend, store=_attempt_store(), rank=rank, world_size=world_size,
                                    device_id=device_id)
        else:  # a plain process becomes a group of one on a free local port (os.environ is left alone)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=rank,
                                    world_size=world_size, device_id=device_id)
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend, created)


def _attempt_store() -> dist.Store:
    """torchrun's store, with this restart attempt's keys kept apart from the earlier attempts'.

    After `torchrun --max-restarts` restarts a job whose rank was killed, the store can still hold the
    killed attempt's keys, and a restarted gloo rank that reads the dead rank's address fails with
    "connectFullMesh ... Connection refused". A prefix per attempt (TORCHELASTIC_RESTART_COUNT) makes every
    attempt rendezvous on fresh keys."""
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://"))
    return dist.PrefixStore(f"recipes_attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@contextmanager
def process_group(backend: str = "auto"):
    """Join (or create) the process group for the block and tear it down correctly at its end:

        from recipes_core.distributed import process_group

        def main(env):                    # work in a function: its model and tensors die on return
            ...                           # fully_shard, forward, backward, collectives

        if __name__ == "__main__":
            with process_group() as env:  # torchrun --nproc_per_node 2 my_script.py
                main(env)

    Use it for any script that shards with FSDP2 / DTensor (a raw `dist.destroy_process_group()` at the
    end of such a script now and then aborts the process at exit; see `teardown`)."""
    env = setup(backend)
    try:
        yield env
    finally:
        teardown(env)


def teardown(env: DistEnv) -> None:
    """Destroy the group this process created, and make sure it is really gone before the process exits.

    Why more than destroy_process_group(): that call unregisters the groups but can only free a group
    nobody else references, and after FSDP2 many objects do: DTensor's caches (sharding propagation in
    Python and C++, the redistribute planner, the mesh topology) hold specs that hold the DeviceMesh,
    every DeviceMesh keeps its groups in a registry, and every fully_shard'ed module keeps its mesh's
    group in its FSDPMeshInfo. A group that outlives destroy_process_group() is freed during interpreter
    shutdown instead, with gloo's worker threads still running, and now and then that aborts a process
    whose work had finished ("terminate called without an active exception", SIGABRT, exit -6).
    So: clear the caches, destroy the groups, then drop the references that live objects (a model
    still in scope, a mesh) keep to the destroyed groups, so each is freed here and its threads joined
    while the interpreter is whole. Checked by tests/test_finetune.py::test_teardown_frees_the_process_group
    and tests/stress_exit.py. A group still alive after this (held from C++ or a frame) gets a warning."""
    if not (env.created_group and dist.is_initialized()):
        return
    groups = [weakref.ref(group) for group in torch_internals.live_process_groups()]
    release_dtensor_caches()
    dist.destroy_process_group()
    gc.collect()
    if any(ref() is not None for ref in groups):  # usually none is left: the walk over every object costs ~1.5 s
        _drop_references([ref() for ref in groups if ref() is not None])
        gc.collect()
    alive = sum(ref() is not None for ref in groups)
    if alive:
        warnings.warn(f"{alive} destroyed process group(s) are still referenced; the process may abort at exit. "
                      "Keep FSDP models inside a function called within `with process_group():`.",
                      RuntimeWarning, stacklevel=2)


def _drop_references(groups: list) -> None:
    """Replace every reference that live Python objects keep to the destroyed `groups` by None: object
    attributes, dicts and lists, and the dicts one attribute down (DeviceMesh._pg_registry: a dict of
    groups is not tracked by the garbage collector, so gc.get_referrers cannot see it). A destroyed
    group runs no collective anyway. Module globals are left alone: those are the user's to release."""
    targets = {id(group) for group in groups}
    module_dicts = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}

    def scrub(container) -> None:
        if type(container) is dict and id(container) not in module_dicts:  # not subclasses: lazy mappings load on .items()
            for key in [k for k, v in container.items() if id(v) in targets]:
                container[key] = None
        elif type(container) is list:
            for i, item in enumerate(container):
                if id(item) in targets:
                    container[i] = None

    with warnings.catch_warnings():  # reading deprecated objects' attributes warns; nothing here is the user's
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            _scrub_object(obj, scrub)
    del groups


def _scrub_object(obj, scrub) -> None:
    """The object itself (a dict or list), its attributes, and the untracked dicts/lists among them."""
    scrub(obj)
    if isinstance(obj, types.ModuleType):
        return
    try:  # not getattr: a class's own __getattr__ (lazy modules, lazy mappings) must not run here
        attributes = object.__getattribute__(obj, "__dict__")
    except (AttributeError, TypeError):
        return
    if type(attributes) is dict:
        scrub(attributes)
        for value in list(attributes.values()):
            if type(value) in (dict, list) and not gc.is_tracked(value):
                scrub(value)


def release_dtensor_caches() -> None:
    """Empty the caches of torch.distributed that hold DTensor specs (and through them meshes and process
    groups). They are private to PyTorch (fenced in recipes_core.torch_internals)."""
    torch_internals.clear_dtensor_caches()
    gc.collect()  # FSDP modules sit in reference cycles; free them before the group goes


def seed_everything(seed: int, rank: int = 0) -> None:
    """One seed for torch, numpy and random. Offset by rank: dropout masks must differ between ranks
    (they see different data), while data order comes from the sampler's own seed, shared by all."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def enable_determinism() -> None:
    """Bitwise-reproducible kernels where PyTorch has them, an error where it does not."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs a fixed workspace
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def all_reduce_sum(value: float | int | torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                             device=device).clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----- sharding ----------------------------------------------------------------------------------------

def build_mesh(env: DistEnv, sharding: str, replicate_degree: int = 0):
    """1-D mesh ("shard",) for full sharding; 2-D ("replicate", "shard") for HSDP, where parameters are
    sharded inside a group (typically a node, fast links) and replicated across groups."""
    from torch.distributed.device_mesh import init_device_mesh

    if sharding == "full":
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    replicas = replicate_degree or max(1, env.world_size // env.local_world_size)
    if env.world_size % replicas:
        raise ValueError(f"fsdp.replicate_degree={replicas} does not divide world size {env.world_size}")
    return init_device_mesh(env.device.type, (replicas, env.world_size // replicas),
                            mesh_dim_names=("replicate", "shard"))


def mixed_precision_policy(setting: str, device: torch.device):
    """bf16 compute with fp32 gradient reduction on CUDA; fp32 throughout on CPU (CPU bf16 matmuls are
    slow and the tests compare losses to 1e-5)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    use_bf16 = setting == "bf16" or (setting == "auto" and device.type == "cuda")
    if use_bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), "bf16"
    return MixedPrecisionPolicy(), "fp32"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (LlamaDecoderLayer and friends), also inside a peft wrapper."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard_model(model: nn.Module, mesh, mp_policy, cpu_offload: bool = False,
                activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                gather_once_per_step: bool = False) -> nn.Module:
    """fully_shard each decoder layer (one all-gather per layer, freed after use), then the root (the
    embeddings, final norm and lm_head, and tied weights, which must live in one group).

    The last decoder layer keeps its gathered parameters from forward to backward (as torchtitan does):
    backward starts with it, so freeing them would only gather them again at once; one all-gather fewer
    per micro-batch for the memory of one layer. FSDP2 never reshards the root after forward either.
    reshard_after_forward=False keeps every layer gathered from forward to backward (ZeRO-2-like: half
    the all-gathers, full parameters in memory during backward). gather_once_per_step=True (with
    finetune.train_step(gather_once_per_step=True), which keeps them gathered from one micro-batch to the
    next) implies it: each layer is all-gathered once per optimizer step (config.FSDPConfig explains the trade)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if activation_checkpointing:
        # Recompute each layer's activations in backward instead of keeping them: memory for compute.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no *DecoderLayer modules found to shard")
    for i, layer in enumerate(layers):
        reshard = reshard_after_forward and not gather_once_per_step and i < len(layers) - 1
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    return model


def offloaded_activations(enabled: bool):
    """The context for a forward pass under fsdp.activation_offload: what autograd saves for backward is
    packed into pinned CPU memory and unpacked on the GPU in backward (the copies are synchronous: no
    overlap with compute, unlike stream-based offloading). Only the forward needs to run inside it."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True) if enabled else nullcontext()


def compile_layers(model: nn.Module) -> None:
    """torch.compile every decoder layer in place. Module.compile, not torch.compile(module): the module
    stays where it is, so parameter names (and with them checkpoints, conversion and resume) do not change.
    TorchDynamo skips FSDP2's hooks (torch._dynamo.config.skip_fsdp_hooks), so each layer's all-gather and
    reduce-scatter run as in eager mode around its compiled forward and backward. Layers of one shape share
    the compiled code: only the first step pays for compiling."""
    for layer in decoder_layers(model):
        layer.compile()


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a load must fill, by state-dict name: a tied weight once, under its first name
    (model.embed_tokens.weight, not lm_head.weight, which is the same Parameter and which save_pretrained
    leaves out of the file)."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():  # keep_vars: the Parameters themselves
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


def load_sharded_weights(model: nn.Module, weights: dict, device: torch.device, cpu_offload: bool = False, *,
                         reset_buffers) -> None:
    """Allocate this rank's shards and fill each with its own rows of the full tensor, read from `weights`
    (name -> full tensor, or a lazy view that reads only the rows it is indexed with, as
    models.safetensors_weights gives): no rank holds more than its shards plus one shard being read, and
    nothing is sent between ranks. The DTensor says which rows are this rank's (FSDP2 shards dim 0 like
    torch.chunk, the last ranks shorter or empty; with HSDP each replica reads the same rows). copy_
    converts the file's dtype (bf16, say) to the parameter's, as from_pretrained(dtype=...) does.
    reset_buffers as in load_full_weights_from_rank0."""
    from torch.distributed.tensor import DTensor

    model.to_empty(device="cpu" if cpu_offload else device)
    with torch.no_grad():
        for name, tensor in state_tensors(model).items():
            if isinstance(tensor, DTensor):
                shape, offset = torch_internals.local_shape_and_offset(tensor)
                tensor = tensor.to_local()
            else:
                shape, offset = tuple(tensor.shape), (0,) * tensor.dim()
            tensor.copy_(weights[name][tuple(slice(start, start + n) for start, n in zip(offset, shape))])
    reset_buffers(model, device)


def load_full_weights_from_rank0(model: nn.Module, full_state_dict: dict | None, device: torch.device,
                                 cpu_offload: bool = False, *, reset_buffers) -> None:
    """Allocate this rank's shards and fill them: rank 0 passes the full state dict, the others None.
    reset_buffers(model, device) recomputes the buffers no state dict holds, which to_empty left as
    garbage (models.reset_rotary_buffers for Hugging Face models): the model layer knows them, not this one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device="cpu" if cpu_offload else device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=cpu_offload)
    set_model_state_dict(model, full_state_dict or {}, options=options)
    reset_buffers(model, device)
