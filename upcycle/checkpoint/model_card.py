"""The model card (README.md) of every checkpoint upcycle writes, built with huggingface_hub's ModelCard.

One function, `build_model_card`, reads what the checkpoint folder says about itself (config.json, upcycle.json,
the shard headers through `inspect_checkpoint`, plots/) and returns a ModelCard: the metadata the Hub indexes
(library, task, tags, base model and its relation, license) and a body that says what was done, the experts by
type, the budget, eval results, plots, how to load it and the exact commands. `convert` (and any later step
that writes a checkpoint) calls `write_model_card`; `upcycle push` rebuilds the card right before uploading.
"""

import json
import re
from pathlib import Path

import yaml
from huggingface_hub.repocard_data import ModelCardData  # light: not huggingface_hub's Hub client

from .inspect import CheckpointSummary, inspect_checkpoint
from .provenance import LOCAL_FOLDER, path_name, read_provenance, without_private_paths
from .source_id import is_repo_id

CARD_FILE = "README.md"
PLOTS_DIR = "plots"
BASE_TAGS = ["moe", "moe++", "upcycle", "custom_code"]
LICENSE_FIELDS = ("license", "license_name", "license_link")
# A README.md's YAML front matter, as huggingface_hub's repocard finds it
FRONT_MATTER = re.compile(r"^\s*---[\r\n]+([\S\s]*?)[\r\n]+---(?:\r\n|\n|$)")
# The Hub knows four relations: adapter (only adapter weights, applied on top of the base), merge (several
# models combined), quantized (the base's weights at lower precision) and finetune. An upcycled checkpoint
# holds a full set of weights: the base's, plus new router rows, constant experts and gating residuals, later
# calibrated or trained. That is a finetune; a folder that holds only a PEFT adapter is an adapter.
FULL_WEIGHTS_RELATION = "finetune"
ADAPTER_RELATION = "adapter"
ADAPTER_FILE = "adapter_config.json"

EXPERT_ROLES = {
    "ffn": "the source's FFN experts, unchanged",
    "zero": "output zero: the token skips this slot's computation",
    "copy": "output the token's own hidden state",
    "constant": "output a trained vector v, mixed with the input by a learned ratio",
}
ZERO_SEMANTICS = {
    "drop_and_renormalize": "a selected Zero expert's weight is dropped and the other selected weights are "
                            "renormalised (as in the official MoE++ 7B)",
    "keep_weight": "a selected Zero expert keeps its routing weight, so the other selected experts are scaled down",
}
DENOMINATORS = {
    "ffn_only": "FFN experts' weights come from the source's softmax over FFN experts alone, zero-computation "
                "experts' from the softmax over every switched-on expert",
    "switched_on": "one softmax over the FFN experts and the switched-on zero-computation experts",
}


def looks_like_repo_id(source: str | None) -> bool:
    """True for "namespace/name" that is a Hub repo id and not a folder here (a local source)."""
    return bool(source) and is_repo_id(source) and not Path(source).exists()


def read_card_metadata(readme: Path) -> dict:
    """The YAML front matter of a README.md as a dict ({} when absent or unreadable), as ModelCard.load reads it."""
    if not readme.is_file():
        return {}
    try:
        match = FRONT_MATTER.match(readme.read_text(encoding="utf-8"))
        metadata = yaml.safe_load(match.group(1)) if match else {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _license_fields(*readmes: Path) -> dict:
    """license (with license_name / license_link for "other") from the first README that declares one."""
    for readme in readmes:
        metadata = read_card_metadata(readme)
        if metadata.get("license"):
            return {key: metadata[key] for key in LICENSE_FIELDS if metadata.get(key)}
    return {}


def _source_dirs(provenance: dict, source_dir: Path | None) -> list[Path]:
    candidates = [source_dir] if source_dir is not None else []
    source = provenance.get("source")
    if isinstance(source, str) and provenance.get("source_kind") != LOCAL_FOLDER and Path(source).is_dir():
        candidates.append(Path(source))
    return candidates


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _flat_metrics(metrics: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a/b": 1}; lists and None are left out (a table cell holds one value)."""
    flat: dict[str, object] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat_metrics(value, f"{name}/")
        elif isinstance(value, (int, float, str)):
            flat[name] = value
    return flat


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    cells = [[cell.replace("|", "\\|").replace("\n", " ") for cell in row] for row in [header, *rows]]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(lines)


def _what_was_done(config: dict, summary: CheckpointSummary, provenance: dict, base_model: str | None) -> str:
    origin = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else _local_origin(provenance)
    if provenance.get("source_commit"):
        origin += f" at commit `{provenance['source_commit']}`"
    steps = [step.get("step", "?") for step in provenance.get("history", [])]
    residual = (" Consecutive MoE layers are linked by a gating residual (the router adds a learned map of the "
                "previous layer's router logits, zero at conversion).") if config.get("gating_residual") else ""
    semantics = config.get("zero_expert_semantics", "drop_and_renormalize")
    denominator = config.get("zero_computation_denominator", "switched_on")
    return (
        f"An MoE++ model made by upcycle from {origin} ({summary.family}), through: "
        f"{', '.join(steps) or 'convert'}.\n\n"
        f"Each of the {summary.moe_layers} MoE layers keeps the source's FFN experts and router (top-"
        f"{summary.experts_per_token}) and gains zero-computation experts, which cost no FFN compute when a token "
        f"picks them. A per-expert selection bias (a saved buffer, the budget knob) decides how often they win: "
        f"right after `upcycle convert` every bias is -inf, so the model computes what the source did; calibration "
        f"or training raises them to lower the number of FFN experts per token.{residual} Zero-expert semantics "
        f"`{semantics}`: {ZERO_SEMANTICS.get(semantics, 'see config.json')}. Denominator `{denominator}`: "
        f"{DENOMINATORS.get(denominator, 'see config.json')}. Zero-computation scores "
        f"`{config.get('zero_computation_scores', 'absolute')}`: "
        f"{SCORES.get(config.get('zero_computation_scores', 'absolute'), 'see config.json')}.{_control(config)}"
    )


SCORES = {
    "relative": "a zero-computation expert's selection score is its router output plus the token's best FFN score",
    "absolute": "a zero-computation expert's selection score is its router output alone",
}


def _control(config: dict) -> str:
    """A trained control's routing rule, in one sentence (none for an MoE++ model)."""
    rule = config.get("routing_rule")
    if rule is None:
        return ""
    return (f"\n\n**This checkpoint is a trained control, not an MoE++ model**: it routes as its source with FFN "
            f"slots dropped by the rule `{rule}` (knob {config.get('routing_rule_knob', 0.0):.4g}), and was trained "
            "with the same recipe as the MoE++ model it is compared with (`upcycle train --routing-rule`).")


def _local_origin(provenance: dict) -> str:
    """A source that is no Hub repo: its folder name and the sha256 of its config (never its path)."""
    name = path_name(str(provenance.get("source") or "?"))
    digest = provenance.get("source_config_sha256")
    if digest:
        return f"the local folder `{name}` (its config.json has sha256 `{digest[:16]}`)"
    return f"`{name}`"


def _experts_section(summary: CheckpointSummary) -> str:
    rows = [[kind, str(count), EXPERT_ROLES.get(kind, "")] for kind, count in summary.experts.items()]
    return _markdown_table(["expert type", "per MoE layer", "what it does"], rows)


def _budget_section(summary: CheckpointSummary) -> str:
    budget = summary.ffn_experts_per_token
    lines = [f"- parameters: {summary.parameters_total:,} total, {summary.parameters_added:,} added by MoE++"]
    if budget is None:
        lines.insert(0, "- mean FFN experts per token: depends on the data at the saved selection biases "
                        "(`upcycle eval` measures it)")
    else:
        lines.insert(0, f"- mean FFN experts per token: {budget:.2f} (the source uses {summary.experts_per_token})")
        lines.append(f"- active parameters per token: {summary.parameters_active_per_token:,}")
    return "\n".join(lines)


def _eval_section(history: list[dict]) -> str | None:
    rows = [(step.get("step", "?"), _flat_metrics(step["metrics"])) for step in history
            if isinstance(step.get("metrics"), dict) and step["metrics"]]
    if not rows:
        return None
    columns = list(dict.fromkeys(name for _, metrics in rows for name in metrics))
    table = [[step, *(_fmt(metrics[name]) if name in metrics else "" for name in columns)] for step, metrics in rows]
    return _markdown_table(["step", *columns], table)


def _plots_section(checkpoint: Path) -> str | None:
    plots = sorted((checkpoint / PLOTS_DIR).rglob("*.png")) if (checkpoint / PLOTS_DIR).is_dir() else []
    if not plots:
        return None
    links = []
    for plot in plots:
        relative = plot.relative_to(checkpoint).as_posix()
        title = re.sub(r"[_-]+", " ", plot.stem)
        links.append(f"![{title}]({relative})")
    return "\n\n".join(links)


def _load_section(model_id: str, has_tokenizer: bool) -> str:
    tokenizer = (f'\ntokenizer = AutoTokenizer.from_pretrained("{model_id}")' if has_tokenizer else "")
    imports = "AutoModelForCausalLM, AutoTokenizer" if has_tokenizer else "AutoModelForCausalLM"
    return (
        "The MoE++ layer ships with the weights as remote code (`modeling_upcycle_moepp.py` and the files beside "
        "it); read it, then load with `trust_remote_code=True`:\n\n"
        f"```python\nfrom transformers import {imports}\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}", trust_remote_code=True){tokenizer}\n```\n\n'
        "`model(..., output_router_logits=True)` also returns `routing_statistics` (FFN experts per token and the "
        "share of each zero-computation expert type, per MoE layer)."
    )


def _commands_section(provenance: dict) -> str:
    lines = []
    for step in provenance.get("history", []):
        command = step.get("command") or (
            f"# {step.get('step', '?')} called from Python with options "
            f"{json.dumps(step.get('options', {}), sort_keys=True)}"
        )
        lines.append(command)
    version = provenance.get("tool_version", "?")
    return (f"upcycle {version}; every option is in `upcycle.json`.\n\n```bash\n" + "\n".join(lines) + "\n```")


def _card_data(checkpoint: Path, summary: CheckpointSummary, base_model: str | None, license_fields: dict,
               ) -> ModelCardData:
    relation = ADAPTER_RELATION if (checkpoint / ADAPTER_FILE).is_file() else FULL_WEIGHTS_RELATION
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*BASE_TAGS, summary.family],
        base_model=base_model,
        base_model_relation=relation if base_model else None,
        **license_fields,
    )


def build_model_card(checkpoint_dir: Path, *, name: str | None = None, base_model: str | None = None,
                     source_dir: Path | None = None):
    """`model_card_text` as huggingface_hub's ModelCard (imported here: it brings the Hub client along)."""
    from huggingface_hub import ModelCard

    return ModelCard(model_card_text(checkpoint_dir, name=name, base_model=base_model, source_dir=source_dir))


def model_card_text(checkpoint_dir: Path, *, name: str | None = None, base_model: str | None = None,
                    source_dir: Path | None = None) -> str:
    """The card of an upcycle checkpoint folder (config.json + upcycle.json + shards), fresh from its files.

    name: the Hub repo id (or the folder's name) shown in the title and the loading snippet.
    base_model: the source's Hub id; by default the previous card's, else the provenance source when it looks
    like a repo id. source_dir: the source folder, whose README.md front matter gives the license.
    """
    checkpoint = Path(checkpoint_dir)
    summary = inspect_checkpoint(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    provenance = without_private_paths(read_provenance(checkpoint) or {})  # also for checkpoints of old versions
    previous = read_card_metadata(checkpoint / CARD_FILE)
    source = provenance.get("source")
    base_model = base_model or previous.get("base_model") or (source if looks_like_repo_id(source) else None)
    license_fields = _license_fields(*(folder / CARD_FILE for folder in _source_dirs(provenance, source_dir)))
    license_fields = license_fields or {key: previous[key] for key in LICENSE_FIELDS if previous.get(key)}
    model_id = name or checkpoint.name
    has_tokenizer = any((checkpoint / file).is_file() for file in ("tokenizer.json", "tokenizer.model"))

    sections = [
        f"# {model_id}", _what_was_done(config, summary, provenance, base_model),
        "## Experts per MoE layer", _experts_section(summary),
        "## Budget", _budget_section(summary),
    ]
    if (evaluation := _eval_section(provenance.get("history", []))) is not None:
        sections += ["## Evaluation", evaluation]
    if (plots := _plots_section(checkpoint)) is not None:
        sections += ["## Plots", plots]
    sections += ["## Load it", _load_section(model_id, has_tokenizer), "## How it was made",
                 _commands_section(provenance)]
    data = _card_data(checkpoint, summary, base_model, license_fields)
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def write_model_card(folder: Path, *, name: str | None = None, base_model: str | None = None,
                     source_dir: Path | None = None) -> str:
    """Build the card of `folder` and save it as its README.md (called last, once every other file is there).

    Returns the text; it is a fixed point of ModelCard's parser (ModelCard.load of the file writes it back byte
    for byte), and writing it needs no import of the Hub client."""
    text = model_card_text(folder, name=name, base_model=base_model, source_dir=source_dir)
    with open(Path(folder) / CARD_FILE, "w", newline="", encoding="utf-8") as handle:  # as ModelCard.save does
        handle.write(text)
    return text
