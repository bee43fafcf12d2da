"""Write the trained model as an MoE++ checkpoint in `upcycle convert`'s format, with its provenance and card.

Same files as convert: safetensors shards + index, config.json (the input's, with the training's tau and beta),
the remote-code files, the tokenizer and generation files, upcycle.json (the input's history plus a "train" step)
and the model card. Tensors are saved under the in-memory names (`model.layers.{l}.mlp.experts.gate_up_proj`
fused, MoE++ tensors under `.mlp.` as convert names them) in the input's dtype; LoRA adapters are merged first.
"""

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.model_card import write_model_card
from ..checkpoint.output_dir import atomic_output_dir
from ..checkpoint.provenance import read_provenance, write_provenance
from ..checkpoint.source import TOKENIZER_AND_GENERATION_FILES
from ..modeling import MODELING_DIR, REMOTE_CODE_FILES
from .trainable import merge_for_save

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CARD_FILE = "README.md"


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the input checkpoint was stored in (float32 when it does not say)."""
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)


def train_step_record(command: str, options: dict, trainable: dict, metrics: dict, controller_state: dict | None,
                      world_size: int) -> dict:
    """The "train" step appended to upcycle.json's history."""
    return {
        "step": "train",
        "command": command,
        "options": options,
        "trainable": trainable,
        "world_size": world_size,
        "measured_ffn_experts_per_token": metrics["ffn_experts_per_token"],
        "metrics": metrics,
        "selection_bias": controller_state,
    }


def write_trained_checkpoint(model: nn.Module, state_dict: dict[str, torch.Tensor] | None, input_dir: Path,
                             output: Path, overwrite: bool, train_record: dict,
                             config_updates: dict) -> Path:
    """Save `model` (the unwrapped, possibly LoRA-wrapped model; `state_dict` the full one, or None) atomically."""
    input_dir = Path(input_dir)
    config = json.loads((input_dir / "config.json").read_text()) | config_updates
    model = merge_for_save(model)
    if state_dict is None or any("lora_" in name for name in state_dict):
        state_dict = model.state_dict()
    dtype = checkpoint_dtype(config)
    state_dict = {name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
                  for name, tensor in state_dict.items()}
    with atomic_output_dir(Path(output), overwrite) as partial:
        model.save_pretrained(partial, state_dict=state_dict, save_original_format=False)
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in REMOTE_CODE_FILES:  # the package's model code, as convert copies it
            if (MODELING_DIR / name).is_file():
                shutil.copyfile(MODELING_DIR / name, partial / name)
        for name in (*TOKENIZER_AND_GENERATION_FILES, CARD_FILE):
            if (input_dir / name).is_file():
                shutil.copyfile(input_dir / name, partial / name)
        record = read_provenance(input_dir) or {"tool": "upcycle", "source": str(input_dir), "history": []}
        record.setdefault("history", []).append(train_record)
        write_provenance(partial, record)
        write_card(partial, Path(output).name)
    return Path(output).resolve()


def write_card(folder: Path, name: str) -> None:
    """The model card, built by upcycle.model_card from the folder's files (the input's card gives metadata)."""
    write_model_card(folder, name=name)
