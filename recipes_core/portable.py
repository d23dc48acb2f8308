"""Make a saved Hugging Face folder load the same way in transformers 4.x and 5.x.

transformers 5 writes two things transformers 4.x (4.57, still used by much of the serving ecosystem)
cannot read the same way:
  tokenizer_config.json  "tokenizer_class": "TokenizersBackend", a class 4.x does not have: its
                         AutoTokenizer fails. PreTrainedTokenizerFast is the same fast tokenizer (the
                         tokenizer.json, as is) under the name both versions know.
  config.json            the rotary settings only as "rope_parameters"; 4.x ignores that key and reads
                         "rope_theta" and "rope_scaling", so it would silently use rope_theta 10000 (Llama 3
                         uses 500000, with llama3 scaling): wrong logits, no error. Both keys are added;
                         5.x reads "rope_theta" and "rope_scaling" as the same settings.
It also drops the two load-time flags 5.x saves into tokenizer_config.json ("is_local",
"local_files_only"): they describe the machine that saved the folder, not the tokenizer.

The chat template (chat_template.jinja) and generation_config.json (eos_token_id as a list) are read by
4.57 as written. tests/test_portable.py loads a converted folder in a transformers 4.57 environment
(`make tf4`) and compares tokens, chat template ids, generation config and logits with the 5.x load.
"""

from __future__ import annotations

import json
from pathlib import Path

# Tokenizer classes transformers 5 saves that 4.x lacks -> the 4.x name of the same tokenizer.
TOKENIZER_CLASS_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}
LOAD_TIME_KEYS = ("is_local", "local_files_only")


def _rewrite_json(path: Path, change) -> bool:
    """Apply change(dict) -> bool to a JSON file; write it back (same layout as transformers) if it changed."""
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    if not change(data):
        return False
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def _portable_tokenizer_config(config: dict) -> bool:
    changed = False
    name = config.get("tokenizer_class")
    if name in TOKENIZER_CLASS_4X:
        config["tokenizer_class"] = TOKENIZER_CLASS_4X[name]
        changed = True
    for key in LOAD_TIME_KEYS:
        if key in config:
            del config[key]
            changed = True
    return changed


def _portable_model_config(config: dict) -> bool:
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return False  # no rotary settings, or nested per layer type (no 4.x equivalent to write)
    legacy = {"rope_theta": rope["rope_theta"]}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    # 4.x: rope_scaling None means plain RoPE; a dict names the scaling type and its factors.
    legacy["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if all(config.get(k) == v for k, v in legacy.items()) and all(k in config for k in legacy):
        return False
    config.update(legacy)
    return True


def make_portable(folder: str | Path) -> list[str]:
    """Rewrite a saved folder's tokenizer_config.json and config.json in place so transformers 4.x loads
    them as 5.x does (see the module docstring). Returns the names of the files it changed."""
    folder = Path(folder)
    changed = []
    if _rewrite_json(folder / "tokenizer_config.json", _portable_tokenizer_config):
        changed.append("tokenizer_config.json")
    if _rewrite_json(folder / "config.json", _portable_model_config):
        changed.append("config.json")
    return changed
