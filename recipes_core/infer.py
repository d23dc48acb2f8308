"""Generate from a Hugging Face folder or straight from a training checkpoint.

    python -m recipes_core.infer MODEL --prompt "Give the first item of the list." [--prompt ...]
    python -m recipes_core.infer MODEL --prompts-file prompts.txt --batch-size 8 --mode completion

MODEL is a Hugging Face folder (config.json), a peft adapter folder, a checkpoint step folder, or a run
folder with `latest`.
Every choice that made older recipes "only repeat the prompt" is fixed here:
  - chat mode renders messages with the tokenizer's own chat template (an error when there is none);
  - generation stops on every end id (eos, end of turn, the generation config's list);
  - only the new tokens are decoded, never the prompt;
  - batches are left-padded, so every row's new tokens start right after its own prompt.
"""

from __future__ import annotations

from recipes_core.errors import UsageError, UserError, command

import argparse
import shlex
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, TextStreamer

from recipes_core.checkpoint import load_model_from_checkpoint
from recipes_core.data import DataFormatError, read_text
from recipes_core.models import check_model_folder
from recipes_core.tokens import generation_config, load_tokenizer

MODES = ("chat", "completion")


class NoChatTemplateError(UserError, ValueError):
    pass


def infer_command(model: str | Path, prompt: str) -> str:
    """The shell command that runs `prompt` through this module, quoted so that a POSIX shell (bash, zsh,
    sh) passes it through byte for byte: a newline in the prompt stays a real newline (inside single
    quotes, so the printed command spans lines). A `\\n` typed inside double quotes would reach the model as
    a backslash and an n, which it never saw in training; --prompt never rewrites it, because a literal
    backslash-n is also a valid thing to ask about (code, escapes)."""
    return shlex.join(["python", "-m", "recipes_core.infer", str(model), "--prompt", prompt])


def load_for_inference(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hugging Face folder, a peft adapter folder (merged on load), or a
    checkpoint (rebuilt in memory, nothing written)."""
    path = Path(path)
    if (path / "config.json").is_file():
        check_model_folder(path)  # a damaged config.json or safetensors header: one line, not a traceback
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval(), load_tokenizer(path)
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype).merge_and_unload()
        return model.eval(), load_tokenizer(path)
    model, params, _ = load_model_from_checkpoint(path)
    if params.get("lora"):
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(params["tokenizer"])
    model.generation_config = generation_config(tokenizer, (params.get("model_source") or {}).get("hf_dir"))
    return model.to(dtype).eval(), tokenizer


def render_prompts(tokenizer, prompts: list, mode: str = "chat", system: str | None = None) -> list[str]:
    """The exact text the model sees. Chat: each prompt (a user message, or a list of messages ending
    with a user turn) through the chat template, with the assistant header that asks for an answer.
    Completion: the prompt text as is."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    if mode == "completion":
        return [prompt if isinstance(prompt, str) else prompt[-1]["content"] for prompt in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            f"the tokenizer ({tokenizer.name_or_path}) has no chat template, so a chat request cannot be "
            "formatted the way the model was trained: this is a base model or a folder saved without its "
            "template. Use mode='completion' (--mode completion) with the prompt format it was trained on "
            "(e.g. the Alpaca prompt), or load the instruct model / the tokenizer that has the template.")
    rendered = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def generation_settings(model, tokenizer, max_new_tokens: int, do_sample: bool, temperature: float,
                        top_p: float) -> GenerationConfig:
    """The model's generation config with the stop ids set to every end id (tokens.generation_config) and
    explicit decoding."""
    config = generation_config(tokenizer, model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.do_sample = do_sample
    if do_sample:
        config.temperature, config.top_p = temperature, top_p
    else:
        config.temperature = config.top_p = config.top_k = None
    return config


@torch.no_grad()
def generate(model, tokenizer, prompts: list, mode: str = "chat", max_new_tokens: int = 64,
             batch_size: int = 8, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
             system: str | None = None, stream: bool = False, seed: int | None = None) -> list[str]:
    """One answer per prompt (a string, or in chat mode a list of messages): the decoded new tokens
    only, special tokens skipped. stream=True prints tokens as they come (batch size 1)."""
    texts = render_prompts(tokenizer, prompts, mode, system)
    settings = generation_settings(model, tokenizer, max_new_tokens, do_sample, temperature, top_p)
    if seed is not None:
        torch.manual_seed(seed)
    # Chat templates already start with bos; completion prompts get it from the tokenizer.
    add_special_tokens = mode == "completion"
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        step = 1 if stream else batch_size
        for start in range(0, len(texts), step):
            batch = tokenizer(texts[start:start + step], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(model.device)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
            output = model.generate(**batch, generation_config=settings, streamer=streamer)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return [answer.strip() for answer in answers]


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line (blank lines skipped), or a .jsonl whose rows have 'prompt' or 'instruction'."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompts-file {path}: no such file")
    lines = [(row, line) for row, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]
    if path.suffix != ".jsonl":
        return [line for _, line in lines]
    import json

    prompts = []
    for row, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: row {row}: invalid JSON ({err.msg} at column {err.colno}); each line "
                                  "must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}: row {row}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get("prompt") or record.get("instruction")
        if not prompt or not isinstance(prompt, str):
            raise DataFormatError(f"{path}: row {row} has neither 'prompt' nor 'instruction' (a string)")
        prompts.append(prompt + (f"\n{record['input']}" if record.get("input") else ""))
    return prompts


@command  # bad input -> one `error:` line, exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.infer", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Hugging Face folder, checkpoint step folder, or run folder")
    parser.add_argument("--prompt", action="append", default=[],
                        help="repeatable; taken as given: for a line break put a real one inside the quotes "
                             "(or $'...\\n...' in bash), a typed \\n stays a backslash and an n")
    parser.add_argument("--prompts-file", help="one prompt a line, or .jsonl with 'prompt'/'instruction'")
    parser.add_argument("--mode", choices=MODES, default="chat")
    parser.add_argument("--system", help="system message (chat mode)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-stream", action="store_true", help="print answers at the end, not token by token")
    args = parser.parse_args(argv)
    for option in ("batch_size", "max_new_tokens"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    prompts = args.prompt + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        parser.error("give --prompt TEXT or --prompts-file FILE")
    model, tokenizer = load_for_inference(args.model)
    stream = not args.no_stream and len(prompts) == 1
    if stream:
        print(f">>> {prompts[0]}")
    answers = generate(model, tokenizer, prompts, args.mode, args.max_new_tokens, args.batch_size,
                       args.sample, args.temperature, args.top_p, args.system, stream, args.seed)
    if not stream:
        for prompt, answer in zip(prompts, answers):
            print(f">>> {prompt}\n{answer}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
