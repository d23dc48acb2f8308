"""Memory planner: what one rank of this recipe holds at its peak, and whether it fits a GPU.

    python -m recipes_core.plan --model meta-llama/Llama-3.1-8B-Instruct --world-size 8 --gpu-memory 80GiB
    python -m recipes_core.plan --model models/smollm2/SmolLM2-135M-Instruct.Q4_1.hf --world-size 2 --device cpu \
        --precision fp32 --seq-len 128 --micro-batch 4

--model is a local Hugging Face folder (its config.json is read; nothing is downloaded) or one of the
shapes built in (KNOWN_SHAPES: Llama 3.2 1B/3B, Llama 3.1 8B/70B, SmolLM2-135M), by hub name or short name.
It prints one table (rows: parameters, gradients, optimizer, FSDP working set, activations, loss/logits,
total; columns: the settings asked for, and the same with and without CPU offload and chunked loss) and a
verdict against --gpu-memory. Every assumption is printed with it (ASSUMPTIONS).

The model is the recipe's (recipes_core.finetune + distributed.shard_model), per rank, N = world size:
  parameters, gradients, AdamW: fp32 masters sharded over N ranks: 4 + 4 + 8 bytes x P / N (the recipe
      keeps fp32 parameters also under bf16 mixed precision: FSDP casts them for compute);
  activations: what autograd keeps for backward per micro-batch, from the layer shapes (per token and
      layer, Hugging Face's Llama with SDPA: 4 x hidden for the two RMSNorms, 4 x (heads x head_dim) and
      2 x (kv heads x head_dim) for attention, 4 x intermediate for the SwiGLU MLP; 3.5 x hidden outside
      the layers). With activation checkpointing only each layer's input (hidden per token and layer) is
      kept, plus one layer recomputed in backward;
  loss/logits: log-softmax kept for backward plus its gradient and the logits' gradient at the start of
      backward: 12 bytes x tokens x vocab (fp32 loss), 14 with bf16 logits; with chunked loss the same for
      one chunk of loss_chunk_size tokens only (recipes_core.loss);
  FSDP working sets (c = compute bytes: 2 bf16, 4 fp32; the reduce-scatter input is an fp32 copy; on CPU,
      gloo copies the whole buffer once more inside every all-gather and reduce-scatter, NCCL does not):
      at backward's start the root group (embeddings, final norm, lm_head: FSDP2 keeps it gathered from
      forward to backward) and two layers gathered (the last, kept from forward, and the next, prefetched),
      the lm_head's unsharded gradient, the computing layer's unsharded gradients and their reduce-scatter
      input; at backward's end the root group's reduce-scatter: its parameters, unsharded gradients and
      reduce-scatter input.
The peak is the larger of two moments, not the sum of every part: backward frees each layer's activations as
it makes that layer's gradients (the last step's were freed by zero_grad before the forward), so
  backward start = parameters + AdamW + activations + loss/logits + working set at the start,
  backward end   = parameters + gradients + AdamW + working set at the end (the root group's reduce-scatter).
Loading, before any training memory exists: every rank reads only its own rows of the safetensors files into its
shards (distributed.load_sharded_weights): its shards plus one tensor's rows being read, the same on every rank
(rank0_load). Only a folder without safetensors (*.bin weights) makes rank 0 load a full fp32 copy (4 x P) and
broadcast it; the printout gives that figure too.
Checked against measured runs (tests/test_plan.py: real torchrun fine-tunes on 1, 2 and 4 CPU ranks, every rank,
peak RSS above the RSS the rank had just before the model was built) and against benchmarks/memory_scaling.py
(SmolLM2 at 1, 2 and 4 ranks).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from recipes_core.errors import UserError, command

GiB = 2**30
MiB = 2**20

# Shapes from the models' config.json on the Hugging Face Hub (the Instruct and base models share them).
KNOWN_SHAPES = {
    "meta-llama/Llama-3.2-1B-Instruct": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                             vocab_size=128256, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-3B-Instruct": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                             num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                             vocab_size=128256, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B-Instruct": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                             vocab_size=128256, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-70B-Instruct": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                              num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                                              vocab_size=128256, tie_word_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                                vocab_size=49152, tie_word_embeddings=True),
}

ASSUMPTIONS = [
    "per rank; AdamW (two fp32 moments); fp32 master parameters and gradients sharded over all ranks (FSDP2 full "
    "sharding, shards padded to a multiple of N rows: not counted); micro-batches of micro_batch x seq_len tokens; "
    "with --grad-accum > 1 every layer's unsharded gradient (fp32) is kept between micro-batches (FSDP2 "
    "reduce-scatters once per step) unless --reduce-every-micro-batch",
    "not counted: the runtime itself (CUDA context, NCCL/gloo buffers, Python and libraries, the data pipeline: "
    "give it with --runtime-overhead; measured here on CPU: ~0.47 GiB per process, what a rank holds just before "
    "the model is built), the allocator's caching and fragmentation (plan 5-10% headroom on CUDA), checkpoint saving",
    "activations from Hugging Face's Llama layers with SDPA (no attention matrix kept); other architectures differ",
    "peak = the larger of backward's start (all activations, no gradients) and backward's end (all gradients, the "
    "root group's reduce-scatter): backward frees a layer's activations as it makes its gradients; the optimizer "
    "step holds less than backward's end (its AdamW moments exist from the first step on, which the plan assumes)",
    "FSDP working sets: the root group and two decoder layers gathered, one layer's (at the end: the root's) "
    "unsharded gradients and their fp32 reduce-scatter input; --device cpu adds gloo's copy of the buffer inside "
    "each collective (N > 1); collectives run one at a time",
    "cpu offload: parameters, gradients and optimizer states live in host memory (per rank, listed as host); "
    "the working sets, activations and logits stay on the GPU",
    "loading: each rank reads its own rows of the safetensors files (distributed.load_sharded_weights): its fp32 "
    "shards plus the rows of one tensor being read (at most the largest matrix / N, counted in fp32), the same on "
    "every rank; a folder with only *.bin weights makes rank 0 load a full fp32 copy (4 bytes x P) instead",
]


class PlanError(UserError, ValueError):
    """A model the planner cannot read, or settings it cannot use; the message says what to give instead."""


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict, where: str = "config") -> "Shape":
        try:
            heads = int(config["num_attention_heads"])
            return cls(hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
                       vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)))
        except KeyError as err:
            raise PlanError(f"{where}: no {err.args[0]!r}; the planner needs a Llama-style config.json (hidden_size, "
                            "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)") from None
        except (TypeError, ValueError) as err:
            raise PlanError(f"{where}: {err}") from None

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden  # + the two RMSNorm weights

    @property
    def root_params(self) -> int:
        """Embeddings, final norm and (untied) lm_head: the FSDP root group."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params


def resolve_model(model: str) -> tuple[str, Shape]:
    """(name, shape) from a local folder's config.json or a built-in shape (hub name or short name)."""
    path = Path(model)
    if path.is_dir() or path.name == "config.json":
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise PlanError(f"--model {model}: no config.json in that folder; give a Hugging Face model folder or "
                            f"one of {', '.join(KNOWN_SHAPES)}")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PlanError(f"{config_file}: not valid JSON ({err})") from None
        config = config.get("text_config", config)  # multimodal configs keep the LM's shape there
        return str(path), Shape.from_config(config, str(config_file))
    key = _normalise(model)
    for name, shape in KNOWN_SHAPES.items():
        short = name.split("/")[-1]
        base = _normalise(short.removesuffix("-Instruct"))
        if key in (_normalise(name), _normalise(short), base, base.removeprefix("llama")):
            return name, Shape.from_config(shape, name)
    raise PlanError(f"--model {model}: not a folder with a config.json and not a known shape; use a local "
                    f"folder or one of {', '.join(KNOWN_SHAPES)}")


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower().removeprefix("meta-llama/").removeprefix("huggingfacetb/"))


def activation_bytes(shape: Shape, tokens: int, precision: str, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one micro-batch of `tokens` tokens (see the module docstring)."""
    attn, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if precision == "fp32":
        per_layer = 4 * (4 * shape.hidden + 4 * attn + 2 * kv + 4 * shape.intermediate)
    else:  # bf16 tensors, except the RMSNorms' fp32 copy of their input
        per_layer = 2 * (4 * attn + 2 * kv + 4 * shape.intermediate) + 2 * (4 + 2) * shape.hidden
    width = 4 if precision == "fp32" else 2
    outside = 3.5 * shape.hidden * width
    if checkpointing:  # each layer's input kept; one layer recomputed at a time in backward
        return int(tokens * (shape.layers * shape.hidden * width + outside + per_layer))
    return int(tokens * (shape.layers * per_layer + outside))


def plan(shape: Shape, world_size: int, micro_batch: int = 1, seq_len: int = 2048, precision: str = "bf16",
         activation_checkpointing: bool = False, cpu_offload: bool = False, loss_chunk_size: int = 0,
         device: str = "cuda", grad_accum: int = 1, reduce_every_micro_batch: bool = False) -> dict:
    """Per-rank bytes of each part (see the module docstring) and the two moments one of which is the step's
    peak: `backward_start` (every activation kept, no gradient yet) and `backward_end` (every gradient, no
    activation, the root group's reduce-scatter). `device` is the larger of the two in device memory,
    `host` what CPU offload moves to host memory, `rank0_load` a rank's memory while it loads the weights."""
    if world_size < 1 or micro_batch < 1 or seq_len < 1 or grad_accum < 1 or loss_chunk_size < 0:
        raise PlanError("--world-size, --micro-batch, --seq-len and --grad-accum must be at least 1, "
                        "--loss-chunk-size at least 0")
    if precision not in ("bf16", "fp32"):
        raise PlanError(f"--precision {precision}: use bf16 or fp32")
    if device not in ("cuda", "cpu"):
        raise PlanError(f"--device {device}: use cuda or cpu")
    p, n = shape.params, world_size
    compute = 2 if precision == "bf16" else 4  # unsharded parameters and autograd's gradients
    reduce = 4  # the reduce-scatter runs in fp32 (MixedPrecisionPolicy reduce_dtype), its input a copy
    layer, root = shape.layer_params, shape.root_params
    tokens = micro_batch * seq_len
    in_flight = min(loss_chunk_size, tokens) if loss_chunk_size else tokens
    # gloo (CPU) copies the whole buffer once inside all_gather_into_tensor and reduce_scatter_tensor (measured:
    # +100 MiB while a 100 MiB buffer is reduce-scattered or gathered); NCCL works in place; one rank calls none.
    copy = reduce if device == "cpu" and n > 1 else 0
    parts = {
        "parameters": 4 * p / n,
        "gradients": 4 * p / n,
        "optimizer (AdamW)": 8 * p / n,
        "activations": activation_bytes(shape, tokens, precision, activation_checkpointing),
        "loss/logits": in_flight * shape.vocab * (12 if precision == "fp32" else 14),
        # backward's first layers: root group and two layers gathered (the last layer, kept from forward, and
        # the next one, prefetched), the lm_head's unsharded gradient, the computing layer's unsharded
        # gradients and their reduce-scatter input (+ gloo's copy of it)
        "FSDP working set, backward start": (compute * (root + 2 * layer) + compute * shape.vocab * shape.hidden
                                             + compute * layer + (reduce + copy) * layer),
        # backward's end: the root group's reduce-scatter (root parameters gathered, its unsharded gradients
        # and their reduce-scatter input, + gloo's copy); the decoder layers are done and resharded
        "FSDP working set, backward end": (compute + compute + reduce + copy) * root,
    }
    offloaded = ("parameters", "gradients", "optimizer (AdamW)") if cpu_offload else ()
    on_device = {k: (0 if k in offloaded else v) for k, v in parts.items()}
    # Gradients and activations are never all alive at once: backward frees each layer's activations as it
    # makes the layer's gradients (zero_grad(set_to_none) freed the last step's before the forward), so the
    # peak is at one end of backward, not the sum of every part.
    moments = {
        "backward start": (on_device["parameters"] + on_device["optimizer (AdamW)"] + parts["activations"]
                           + parts["loss/logits"] + parts["FSDP working set, backward start"]),
        "backward end": (on_device["parameters"] + on_device["gradients"] + on_device["optimizer (AdamW)"]
                         + parts["FSDP working set, backward end"]),
    }
    if grad_accum > 1:
        # A later micro-batch's backward starts with what the earlier ones left. By default FSDP2 skips the
        # reduce-scatter until the last micro-batch and keeps every layer's unsharded gradient, accumulated in the
        # reduce dtype (fp32): 4 x P on every rank. With fsdp.reduce_every_micro_batch each micro-batch
        # reduce-scatters, and what stays is the sharded gradients. Measured, 40M model, 2 CPU ranks, accumulation 2
        # over accumulation 1: +133 MiB per rank (4 x P = 139 MiB), and +65 MiB with reduce_every_micro_batch
        # (4 x P / N = 70 MiB).
        kept = on_device["gradients"] if reduce_every_micro_batch else 4 * p
        parts["kept between micro-batches"] = kept
        moments["backward start, accumulating"] = moments["backward start"] + kept
    # Loading (distributed.load_sharded_weights): every rank, rank 0 included, fills its shards from its own rows
    # of the files, reading one tensor at a time: 4P/N plus at most the largest matrix's rows (the embedding or
    # an MLP projection) / N, in fp32 at most. On CUDA the shards are GPU memory and the rows host memory.
    largest_rows = 4 * max(shape.vocab, shape.intermediate) * shape.hidden / n
    rank0_load = 4 * p / n + largest_rows
    full_copy_load = 4 * p  # the fallback for *.bin-only folders: rank 0's full fp32 copy (load_full_weights_from_rank0)
    return {"parts": parts, "moments": moments, "device": max(moments.values()),
            "peak_moment": max(moments, key=moments.get), "host": sum(parts[k] for k in offloaded),
            "rank0_load": rank0_load, "full_copy_load": full_copy_load, "params": p, "offloaded": list(offloaded)}


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '141 GiB', '24000MiB', a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not match:
        raise PlanError(f"{text!r} is not a memory size; write e.g. 80GiB, 80GB or 24000MiB")
    number, unit = float(match.group(1)), (match.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    return int(number * scale[unit])


def _gib(value: float) -> str:
    return f"{value / GiB:8.2f}"


def render(name: str, shape: Shape, args, settings: dict) -> str:
    variants = {}  # the settings asked for, and the same with and without offload and chunked loss
    for offload in (False, True):
        for chunk in (0, args.loss_chunk_size or 1024):
            asked = offload == args.cpu_offload and chunk == args.loss_chunk_size
            label = f"offload {'on' if offload else 'off'}, chunk {chunk or 'off'}{' (asked)' if asked else ''}"
            variants[label] = (offload, chunk)
    results = {label: plan(shape, cpu_offload=o, loss_chunk_size=c, **settings) for label, (o, c) in variants.items()}
    first = next(iter(results.values()))
    width = max(len(k) for k in results) + 1
    lines = [f"{name}: {first['params'] / 1e9:.3f} B parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"vocab {shape.vocab}, {'tied' if shape.tied else 'untied'} embeddings)",
             f"world size {args.world_size}, micro-batch {args.micro_batch} x {args.seq_len} tokens, {args.precision}, "
             f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, {args.device}", "",
             "GiB per rank".ljust(34) + "".join(label.rjust(width) for label in results)]
    for part in first["parts"]:
        cells = [("host" if part in r["offloaded"] else _gib(r["parts"][part]).strip()) for r in results.values()]
        lines.append(part.ljust(34) + "".join(c.rjust(width) for c in cells))
    for moment in first["moments"]:  # the peak is the larger of the two (gradients replace activations)
        lines.append(f"at {moment}".ljust(34) + "".join(_gib(r["moments"][moment]).strip().rjust(width)
                                                        for r in results.values()))
    overhead = args.runtime_overhead
    lines.append("runtime (given)".ljust(34) + "".join(_gib(overhead).strip().rjust(width) for _ in results))
    lines.append("device total (peak + runtime)".ljust(34) + "".join(_gib(r["device"] + overhead).strip().rjust(width)
                                                                   for r in results.values()))
    lines.append("host (offload)".ljust(34) + "".join(_gib(r["host"]).strip().rjust(width) for r in results.values()))
    where = "host memory" if args.device == "cuda" else "memory (on CPU, before any training memory exists)"
    lines.append(f"\nwhile loading, each rank holds {first['rank0_load'] / GiB:.2f} GiB (its shards and one tensor's rows; "
                 f"a folder with only *.bin weights: rank 0 needs a full fp32 copy, {first['full_copy_load'] / GiB:.2f} GiB "
                 f"of {where}).")
    if args.gpu_memory:
        limit = args.gpu_memory
        lines.append("")
        for label, r in results.items():
            total = r["device"] + overhead
            verdict = "fits" if total <= limit else "does NOT fit"
            lines.append(f"{label}: {total / GiB:.1f} GiB of {limit / GiB:.1f} GiB per device: {verdict}")
    lines.append("\nAssumptions:")
    lines += [f"  - {a}" for a in ASSUMPTIONS]
    return "\n".join(lines)


@command  # bad input -> one `error:` line, exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"a local HF folder or one of: {', '.join(KNOWN_SHAPES)}")
    parser.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) the model is sharded over")
    parser.add_argument("--gpu-memory", default=None, help="per device, e.g. 80GiB")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--reduce-every-micro-batch", action="store_true",
                        help="fsdp.reduce_every_micro_batch: no unsharded gradients kept between micro-batches")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--precision", default="bf16", help="bf16 (mixed precision) | fp32")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--chunked-loss", action="store_true", help="loss in chunks of --loss-chunk-size tokens")
    parser.add_argument("--loss-chunk-size", type=int, default=None, help="tokens per chunk (default 1024 with "
                        "--chunked-loss, the recipe's train.loss_chunk_size)")
    parser.add_argument("--runtime-overhead", default=None,
                        help="per process memory the runtime takes (default 1GiB on cuda, 0.47GiB on cpu)")
    parser.add_argument("--device", default="cuda", help="cuda | cpu (gloo's collective copies and the runtime overhead default)")
    args = parser.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise PlanError(f"--device {args.device}: use cuda or cpu")
    if args.loss_chunk_size is None:
        args.loss_chunk_size = 1024 if args.chunked_loss else 0
    # sizes parsed here, not by argparse: a bad one is one `error:` line like every other bad input
    args.gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    default_overhead = int((1.0 if args.device == "cuda" else 0.47) * GiB)
    args.runtime_overhead = parse_size(args.runtime_overhead) if args.runtime_overhead else default_overhead
    name, shape = resolve_model(args.model)
    settings = dict(world_size=args.world_size, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                    reduce_every_micro_batch=args.reduce_every_micro_batch,
                    seq_len=args.seq_len,
                    precision=args.precision, activation_checkpointing=args.activation_checkpointing,
                    device=args.device)
    plan(shape, **settings, loss_chunk_size=args.loss_chunk_size)  # bad numbers: one error line before any table
    print(render(name, shape, args, settings))
    return 0


if __name__ == "__main__":
    main()
