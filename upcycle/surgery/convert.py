"""`upcycle convert`: stream a source checkpoint into an MoE++ checkpoint that computes exactly what it did.

SOURCE is a local folder or a Hub repo id (fetched into the Hub cache, only the files needed). Every shape is
checked before a byte is written. Each source shard then becomes one output shard, renamed: reflinked,
hard-linked or copied byte for byte when its bytes do not change (no tensor decoded), rewritten one chunk at a
time when they do (`--dtype` casts, PyTorch .bin sources). The new MoE++ tensors go into a shard of their own
and the index maps every key. Peak memory: a 64 MB chunk and the new tensors (a few MB even for Mixtral-8x7B);
a .bin shard is memory mapped, one shard at a time. Neither torch nor transformers is imported unless a shard's
bytes change (`--dtype`, .bin sources): a plain conversion starts in a fraction of a second.
"""

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..checkpoint.dtypes import QUANTIZED, output_dtype, target_dtype
from ..checkpoint.hashing import COMPUTED, check_against_hub_cache, sources_sha256
from ..checkpoint.inspect import count_parameters
from ..checkpoint.linking import LINK_MODES, link_file
from ..checkpoint.model_card import write_model_card
from ..checkpoint.output_dir import atomic_output_dir, check_output_path, copy_in_kernel, copy_with_sha256
from ..checkpoint.provenance import conversion_record, write_provenance
from ..checkpoint.safetensors_header import DTYPE_BYTES, TensorInfo
from ..checkpoint.safetensors_writer import StreamingSafetensorsWriter
from ..checkpoint.source import INDEX_FILE, PICKLE, SourceCheckpoint, open_source
from ..checkpoint.source_id import resolve_source
from ..converters import family_for_config
from ..errors import UpcycleError
from ..modeling import MODELING_DIR, REMOTE_CODE_FILES
from ..modeling.moepp_fields import ZERO_COMPUTATION_DENOMINATORS, ZERO_COMPUTATION_SCORES, ZERO_EXPERT_SEMANTICS
from .moepp_config import moepp_config
from .new_tensors import NewTensor, new_tensor_specs
from .plan import ConversionPlan, ZeroComputationCounts, plan_conversion

PARALLEL_SHARDS = 2  # unchanged shards copied at once: 2 measured best on a 2-core machine (bench/RESULTS.md)


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
    zero_expert_semantics: str | None = None  # None: the family default (docs/families.md)
    # ffn_only: FFN weights keep the source's softmax (measured better); switched_on: one shared softmax
    zero_computation_denominator: str = "ffn_only"
    # relative: zero-computation scores raised by the token's best FFN score (measured better); absolute: rows alone
    zero_computation_scores: str = "relative"
    overwrite: bool = False
    link: str = "auto"  # unchanged shards: auto (reflink, else copy), reflink, hard or copy
    dtype: str | None = None  # bfloat16, float16 or float32: cast floating-point tensors; None keeps every dtype
    revision: str | None = None  # branch, tag or commit of a Hub repo id SOURCE
    # sha256 of every source shard in upcycle.json: free for Hub-cache sources and for rewritten shards, one read
    # of the shard otherwise (the only cost of link mode). False records only the free ones.
    source_sha256: bool = True

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


@dataclass(frozen=True)
class ShardResult:
    sha256: str  # of the source file, for provenance ("" until a linked or copied shard's source is hashed)
    sha256_from: str  # "computed", "hub-cache-blob-name" or hashing.NOT_COMPUTED
    written_by: str  # reflink, hard link, copy, cast to <dtype>, or .bin to safetensors


def write_shard(source: SourceCheckpoint, shard: str, destination: Path, options: ConvertOptions) -> ShardResult:
    """One source shard -> one output shard: linked or copied when its bytes stay, rewritten when they change."""
    source_file, target = source.path / shard, target_dtype(options.dtype)
    if source.weight_format == PICKLE:
        from ..checkpoint.shard_rewrite import rewrite_pickle_shard  # torch: imported only to decode or cast

        digest = rewrite_pickle_shard(source_file, destination, target)
        check_against_hub_cache(source_file, digest)
        return ShardResult(digest, COMPUTED, ".bin to safetensors" + (f", cast to {options.dtype}" * bool(target)))
    names = [name for name, file in source.weight_map.items() if file == shard]
    if any(output_dtype(source.tensors[name].dtype, target) != source.tensors[name].dtype for name in names):
        from ..checkpoint.shard_rewrite import rewrite_safetensors_shard

        digest = rewrite_safetensors_shard(source_file, destination, target)
        check_against_hub_cache(source_file, digest)
        return ShardResult(digest, COMPUTED, f"cast to {options.dtype}")
    linked = link_file(source_file, destination, options.link)
    if linked is not None:
        return ShardResult("", "", linked)  # hashed afterwards, all linked shards in parallel
    if not options.source_sha256:
        copy_in_kernel(source_file, destination)
        return ShardResult("", "", "copy")
    digest = copy_with_sha256(source_file, destination)
    check_against_hub_cache(source_file, digest)
    return ShardResult(digest, COMPUTED, "copy")


def write_shards(source: SourceCheckpoint, destinations: dict[str, Path],
                 options: ConvertOptions) -> dict[str, ShardResult]:
    """`write_shard` for every shard. Shards whose bytes stay are copied or linked PARALLEL_SHARDS at a time (with
    hashing, sha256 is the bottleneck: one core per shard; kernel copies without hashing were measured no slower
    two at a time); shards that are rewritten go one at a time, so that at most one decoded shard is in memory."""
    rewriting = source.weight_format == PICKLE or options.dtype is not None
    workers = 1 if rewriting else max(1, min(len(source.shard_files), os.cpu_count() or 1, PARALLEL_SHARDS))
    failed = threading.Event()  # after any failure (or Ctrl-C) no further shard starts

    def write_unless_failed(shard: str) -> ShardResult | None:
        if failed.is_set():
            return None
        try:
            return write_shard(source, shard, destinations[shard], options)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(workers)
    try:
        futures = {shard: pool.submit(write_unless_failed, shard) for shard in source.shard_files}
        return {shard: future.result() for shard, future in futures.items()}
    finally:  # on an error or Ctrl-C the shards under way finish, then the caller removes the output
        failed.set()
        pool.shutdown(wait=True, cancel_futures=True)


def hash_unread_sources(source: SourceCheckpoint, shards: dict[str, ShardResult],
                        compute: bool) -> dict[str, ShardResult]:
    """Fill in the sha256 of the shards that were not read (linked, or copied without hashing): from the Hub
    cache's blob names, or by reading them (`compute`), else marked NOT_COMPUTED."""
    pending = [shard for shard, result in shards.items() if not result.sha256]
    hashes = sources_sha256([source.path / shard for shard in pending], compute)
    return shards | {shard: replace(shards[shard], sha256=digest, sha256_from=sha256_from)
                     for shard, (digest, sha256_from) in zip(pending, hashes)}


def write_new_tensors(added: dict[str, NewTensor], path: Path) -> None:
    """The new MoE++ tensors as one safetensors file, written from their byte patterns (no torch)."""
    layout = {name: TensorInfo(spec.dtype, spec.shape) for name, spec in sorted(added.items())}
    with StreamingSafetensorsWriter(path, layout, {"format": "pt"}) as writer:
        for name in layout:
            if added[name].numel:  # the writer skips empty tensors (a count of 0)
                writer.write(name, added[name].to_bytes())


def _check_options(options: ConvertOptions) -> str | None:
    """Refuse bad option values before any I/O; returns the target safetensors dtype (None: keep)."""
    if options.zero_expert_semantics not in (None, *ZERO_EXPERT_SEMANTICS):
        raise UpcycleError(f"zero-expert semantics must be one of {', '.join(ZERO_EXPERT_SEMANTICS)}")
    if options.zero_computation_denominator not in ZERO_COMPUTATION_DENOMINATORS:
        raise UpcycleError(f"the denominator must be one of {', '.join(ZERO_COMPUTATION_DENOMINATORS)}")
    if options.zero_computation_scores not in ZERO_COMPUTATION_SCORES:
        raise UpcycleError(f"the zero-computation scores must be one of {', '.join(ZERO_COMPUTATION_SCORES)}")
    if options.link not in LINK_MODES:
        raise UpcycleError(f"--link must be one of {', '.join(LINK_MODES)}, got {options.link!r}")
    return target_dtype(options.dtype)


def _set_config_dtype(config: dict, dtype_name: str) -> None:
    """The config's dtype says what the weights are: transformers 5 writes `dtype`, older configs `torch_dtype`."""
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
    for key in keys:
        config[key] = dtype_name


def convert(source_path: Path | str, output: Path, options: ConvertOptions, command: str = "") -> ConversionReport:
    """Validate everything, then write the MoE++ checkpoint atomically; the source is only read."""
    output = Path(output)
    target = _check_options(options)
    resolved_source = resolve_source(source_path, options.revision)
    source = open_source(resolved_source.path)
    spec = family_for_config(source.config)
    plan = plan_conversion(source, spec, options.counts(spec.n_experts(source.config)))
    check_output_path(output, options.overwrite, protected=(resolved_source.path,))
    if target is not None:
        quantized = sorted(name for name, info in source.tensors.items() if info.dtype in QUANTIZED)
        if quantized:
            raise UpcycleError(
                f"--dtype cannot convert quantized tensors such as {quantized[0]} (FP8 with block scales); "
                "leave --dtype out to keep them as they are"
            )
    # the new tensors are 0 and -inf: exact in every target dtype
    added = new_tensor_specs(plan, options.gating_residual, dtype=target)
    clashes = sorted(set(added) & set(source.tensors))
    if clashes:
        raise UpcycleError(f"the source already has tensor {clashes[0]}; is it already converted?")
    config = moepp_config(source.config, plan, options.gating_residual, options.zero_expert_semantics,
                          options.zero_computation_denominator, options.zero_computation_scores)
    if options.dtype is not None:
        _set_config_dtype(config, options.dtype)

    with atomic_output_dir(output, options.overwrite) as partial:
        shard_names, new_shard = output_shard_names(source.shard_files)
        shards = write_shards(source, {shard: partial / name for shard, name in shard_names.items()}, options)
        shards = hash_unread_sources(source, shards, compute=options.source_sha256)
        write_new_tensors(added, partial / new_shard)
        weight_map = {name: shard_names[shard] for name, shard in source.weight_map.items()}
        weight_map |= {name: new_shard for name in added}
        total_size = sum(
            info.numel * DTYPE_BYTES[output_dtype(info.dtype, target)] for info in source.tensors.values()
        ) + sum(spec.numel * DTYPE_BYTES[spec.dtype] for spec in added.values())
        # tensor bytes, headers excluded (transformers' convention)
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(MODELING_DIR / name, partial / name)
        for name in source.extra_files():
            shutil.copyfile(source.path / name, partial / name)
        resolved = asdict(options) | {"zero_expert_semantics": config["zero_expert_semantics"],
                                      "n_zero": plan.counts.zero, "n_copy": plan.counts.copy,
                                      "n_constant": plan.counts.constant}
        record = conversion_record(str(source_path),
                                   {shard: result.sha256 or None for shard, result in shards.items()},
                                   resolved, command)
        record["source_files"] = {
            shard: {"output_file": shard_names[shard], "written_by": result.written_by,
                    "sha256_from": result.sha256_from}
            for shard, result in shards.items()
        }
        if resolved_source.repo_id is not None:
            record["source_commit"] = resolved_source.commit
        write_provenance(partial, record)
        write_model_card(partial, name=output.name, base_model=resolved_source.repo_id,
                         source_dir=resolved_source.path)

    return ConversionReport(
        output=output.resolve(),
        plan=plan,
        source_tensors=len(source.tensors),
        added_tensors=len(added),
        added_parameters=count_parameters({name: spec.numel for name, spec in added.items()}),
        source_parameters=count_parameters({name: info.numel for name, info in source.tensors.items()}),
    )
