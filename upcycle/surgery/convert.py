"""`upcycle convert`: stream a source checkpoint into an MoE++ checkpoint that computes exactly what it did.

Every source shard is copied byte for byte (no tensor is decoded: the source's tensors keep names, bytes and
layout); the new MoE++ tensors go into a shard of their own and the index maps every key. Peak memory: the new
tensors only (a few MB even for Mixtral-8x7B).
"""

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save_file

from ..checkpoint.output_dir import atomic_output_dir, check_output_path, copy_with_sha256
from ..checkpoint.source import INDEX_FILE, open_source
from ..converters import family_for_config
from ..errors import UpcycleError
from ..model_card import write_model_card
from ..modeling import MODELING_DIR, REMOTE_CODE_FILES
from ..modeling.configuration_upcycle_moepp import ZERO_EXPERT_SEMANTICS
from ..provenance import conversion_record, write_provenance
from .moepp_config import moepp_config
from ..checkpoint.safetensors_header import DTYPE_BYTES
from .new_tensors import count_parameters, new_tensors
from .plan import ConversionPlan, ZeroComputationCounts, plan_conversion



def output_shard_names(source_shards: list[str]) -> tuple[dict[str, str], str]:
    """Source shard -> output name, and the new shard's name: `model-0000i-of-0000n.safetensors`, new last.

    Renaming never touches bytes; it keeps a single-file source's `model.safetensors` out of the output, since
    transformers would load that file alone and ignore the index.
    """
    total = len(source_shards) + 1
    names = {shard: f"model-{i:05d}-of-{total:05d}.safetensors" for i, shard in enumerate(source_shards, 1)}
    return names, f"model-{total:05d}-of-{total:05d}.safetensors"


@dataclass
class ConvertOptions:
    """Every option of `upcycle convert` (None counts: the paper's default split)."""

    n_zero: int | None = None
    n_copy: int | None = None
    n_constant: int | None = None
    gating_residual: bool = True
    zero_expert_semantics: str = "drop_and_renormalize"
    overwrite: bool = False

    def counts(self, n_ffn: int) -> ZeroComputationCounts:
        default = ZeroComputationCounts.paper_default(n_ffn)
        return ZeroComputationCounts(
            zero=default.zero if self.n_zero is None else self.n_zero,
            copy=default.copy if self.n_copy is None else self.n_copy,
            constant=default.constant if self.n_constant is None else self.n_constant,
        )


@dataclass
class ConversionReport:
    output: Path
    plan: ConversionPlan
    source_tensors: int
    added_tensors: int
    added_parameters: int
    source_parameters: int


def convert(source_path: Path, output: Path, options: ConvertOptions, command: str = "") -> ConversionReport:
    """Validate everything, then write the MoE++ checkpoint atomically; the source is only read."""
    source_path, output = Path(source_path), Path(output)
    if options.zero_expert_semantics not in ZERO_EXPERT_SEMANTICS:
        raise UpcycleError(f"zero-expert semantics must be one of {', '.join(ZERO_EXPERT_SEMANTICS)}")
    source = open_source(source_path)
    spec = family_for_config(source.config)
    plan = plan_conversion(source, spec, options.counts(spec.n_experts(source.config)))
    check_output_path(output, options.overwrite, protected=(source_path,))
    added = new_tensors(plan, options.gating_residual)
    clashes = sorted(set(added) & set(source.tensors))
    if clashes:
        raise UpcycleError(f"the source already has tensor {clashes[0]}; is it already converted?")
    config = moepp_config(source.config, plan, options.gating_residual, options.zero_expert_semantics)

    with atomic_output_dir(output, options.overwrite) as partial:
        shard_names, new_shard = output_shard_names(source.shard_files)
        hashes = {
            shard: copy_with_sha256(source.path / shard, partial / shard_names[shard]) for shard in source.shard_files
        }
        save_file(added, str(partial / new_shard), metadata={"format": "pt"})
        weight_map = {name: shard_names[shard] for name, shard in source.weight_map.items()}
        weight_map |= {name: new_shard for name in added}
        total_size = sum(info.numel * DTYPE_BYTES[info.dtype] for info in source.tensors.values()) + sum(
            tensor.numel() * tensor.element_size() for tensor in added.values()
        )  # tensor bytes, headers excluded (transformers' convention)
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(MODELING_DIR / name, partial / name)
        for name in source.extra_files():
            shutil.copyfile(source.path / name, partial / name)
        resolved = asdict(options) | {"n_zero": plan.counts.zero, "n_copy": plan.counts.copy,
                                      "n_constant": plan.counts.constant}
        record = conversion_record(str(source_path), hashes, resolved, command)
        write_provenance(partial, record)
        write_model_card(partial, output.name, config, record)

    return ConversionReport(
        output=output.resolve(),
        plan=plan,
        source_tensors=len(source.tensors),
        added_tensors=len(added),
        added_parameters=count_parameters({name: tensor.numel() for name, tensor in added.items()}),
        source_parameters=count_parameters({name: info.numel for name, info in source.tensors.items()}),
    )
