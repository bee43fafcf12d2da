"""Conversion speed and memory on a synthetic Mixtral-shaped bf16 checkpoint (issue 3, "Speed and memory").

    python bench/convert.py                      # 2 and 4 GB, 4 and 8 shards, in a temp dir under /tmp
    python bench/convert.py --sizes-gb 2 --repeat 3 --workdir /path/on/the/filesystem/to/test

For each size, in the same run and on the same filesystem: `cp -r` of the source folder against
`upcycle convert --link copy` (ratio must be <= 1.3), the peak RSS of that convert process against the
interpreter's baseline (`python -c 'import upcycle'`) + the largest shard + 300 MB, and the link modes (hard, and
reflink where the filesystem has it; from a plain folder and from a Hub-cache layout whose blobs are named by
their sha256) against the command's start-up time (`upcycle --help`; must be within about 1 s). cp and copy mode
are timed twice: warm (every source page in the page cache, as just written) and cold (the source's pages
evicted with posix_fadvise(DONTNEED) first, so both read from the disk: the case of a real checkpoint larger
than the page cache). Every timed command starts after `sync` (no dirty pages pending), and the measurements
interleave, `--repeat` times, so that drift in the machine's load hits all of them. Everything written is
removed at the end, also on Ctrl-C or SIGTERM.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

UPCYCLE = [shutil.which("upcycle") or "upcycle"]
# Mixtral's architecture, narrowed so that a few GB hold several layers: 8 experts, top-2, GQA, per-expert keys.
CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 1024,
    "intermediate_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "tie_word_embeddings": False, "dtype": "bfloat16",
}
RSS_MARGIN_BYTES = 300 * 1024 * 1024
COPY_RATIO_LIMIT = 1.3
LINK_OVER_STARTUP_LIMIT_S = 1.0


def layer_tensors(layer: int) -> dict[str, tuple[int, ...]]:
    d, i, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    prefix = f"model.layers.{layer}."
    shapes = {
        prefix + "input_layernorm.weight": (d,), prefix + "post_attention_layernorm.weight": (d,),
        prefix + "self_attn.q_proj.weight": (d, d), prefix + "self_attn.k_proj.weight": (kv, d),
        prefix + "self_attn.v_proj.weight": (kv, d), prefix + "self_attn.o_proj.weight": (d, d),
        prefix + "block_sparse_moe.gate.weight": (CONFIG["num_local_experts"], d),
    }
    for expert in range(CONFIG["num_local_experts"]):
        expert_prefix = f"{prefix}block_sparse_moe.experts.{expert}."
        shapes |= {expert_prefix + "w1.weight": (i, d), expert_prefix + "w3.weight": (i, d),
                   expert_prefix + "w2.weight": (d, i)}
    return shapes


def bytes_of(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(2 * torch.Size(shape).numel() for shape in shapes.values())


def build_source(folder: Path, target_bytes: int, n_shards: int) -> dict:
    """A Mixtral-shaped bf16 checkpoint of about `target_bytes` in `n_shards` shards, written with safetensors."""
    d, vocab = CONFIG["hidden_size"], CONFIG["vocab_size"]
    outer = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "model.norm.weight": (d,)}
    n_layers = max(n_shards, round((target_bytes - bytes_of(outer)) / bytes_of(layer_tensors(0))))
    config = CONFIG | {"num_hidden_layers": n_layers}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    groups = [list(range(n_layers))[shard::n_shards] for shard in range(n_shards)]
    weight_map = {}
    for shard, layers in enumerate(groups, 1):
        shapes = {}
        for layer in sorted(layers):
            shapes |= layer_tensors(layer)
        if shard == 1:
            shapes |= {"model.embed_tokens.weight": outer["model.embed_tokens.weight"]}
        if shard == n_shards:
            shapes |= {"lm_head.weight": outer["lm_head.weight"], "model.norm.weight": outer["model.norm.weight"]}
        name = f"model-{shard:05d}-of-{n_shards:05d}.safetensors"
        tensors = {key: torch.full(shape, 0.01, dtype=torch.bfloat16) for key, shape in shapes.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        weight_map |= {key: name for key in shapes}
    total = bytes_of(outer) + n_layers * bytes_of(layer_tensors(0))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return config


def build_hub_cache_view(source: Path, cache_root: Path) -> Path:
    """The same files as a Hub cache snapshot: blobs named by sha256 (hard links: no extra disk), symlinks to them."""
    repo = cache_root / "models--bench--synthetic-mixtral"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        digest = hashlib.sha256()
        with open(path, "rb") as reader:
            while chunk := reader.read(16 << 20):
                digest.update(chunk)
        blob = blobs / digest.hexdigest()
        if not blob.exists():
            os.link(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def timed(command: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system, from /usr/bin/time -v) of a command."""
    wrapped = ["/usr/bin/time", "-v", *command]
    start = time.perf_counter()
    done = subprocess.run(wrapped, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(command)}\n{done.stdout}\n{done.stderr}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    cpu = sum(float(value) for value in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", done.stderr))
    return seconds, rss_kb * 1024, cpu


def evict_from_page_cache(folder: Path) -> None:
    """Drop the folder's clean pages from the page cache (no root needed): the next read comes from the disk."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", default="2,4", help="checkpoint sizes in GB (1e9 bytes), comma separated")
    parser.add_argument("--shard-gb", type=float, default=0.55, help="about this many GB per shard (>= 4 shards)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best counts")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    sizes = [float(size) for size in args.sizes_gb.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    needed = 3.2 * max(sizes) * 1e9  # source, cp's copy, convert's output
    print(subprocess.run(["df", "-h", str(args.workdir)], capture_output=True, text=True, check=True).stdout.strip())
    if free_bytes(args.workdir) < needed + 5e9:
        raise SystemExit(f"not enough free disk in {args.workdir}: need {needed / 1e9:.1f} GB + 5 GB spare")

    root = Path(tempfile.mkdtemp(prefix="upcycle-bench-", dir=args.workdir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up
    rows = []
    try:
        baseline_rss = max(timed([sys.executable, "-c", "import upcycle"])[1] for _ in range(2))
        print(f"baseline RSS (python -c 'import upcycle'): {baseline_rss / 2**20:.0f} MiB")
        for size in sizes:
            n_shards = max(4, round(size / args.shard_gb))
            source = root / f"source-{size:g}GB"
            config = build_source(source, int(size * 1e9), n_shards)
            hub_view = build_hub_cache_view(source, root / f"hub-cache-{size:g}GB")
            shard_sizes = [path.stat().st_size for path in source.glob("*.safetensors")]
            total, largest = sum(shard_sizes), max(shard_sizes)
            print(f"\n{total / 1e9:.2f} GB, {n_shards} shards (largest {largest / 1e9:.2f} GB), "
                  f"{config['num_hidden_layers']} layers")
            link_runs = [("hard", source, "hard, folder", []),
                         ("hard", source, "hard, folder, --no-source-sha256", ["--no-source-sha256"]),
                         ("hard", hub_view, "hard, Hub cache", []), ("auto", hub_view, "auto, Hub cache", [])]
            copy_keys = ("cp", "copy", "copy, --no-source-sha256", "cp cold", "copy cold",
                         "copy cold, --no-source-sha256")
            runs: dict[str, list[float]] = {key: [] for key in ("startup", *copy_keys)}
            cpu: dict[str, list[float]] = {key: [] for key in ("startup", *copy_keys)}
            copy_rss = []
            for _ in range(args.repeat):  # interleaved: drift in machine load hits every measurement
                seconds, _, cpu_seconds = timed([*UPCYCLE, "--help"])
                runs["startup"].append(seconds)
                cpu["startup"].append(cpu_seconds)
                for cache in ("", " cold"):
                    os.sync()  # every timed write starts with no dirty pages pending
                    if cache:
                        evict_from_page_cache(source)
                    seconds, _, cpu_seconds = timed(["cp", "-r", str(source), str(root / "cp-copy")])
                    runs["cp" + cache].append(seconds)
                    cpu["cp" + cache].append(cpu_seconds)
                    shutil.rmtree(root / "cp-copy")
                    os.sync()
                    for extra in ([], ["--no-source-sha256"]):
                        os.sync()
                        if cache:
                            evict_from_page_cache(source)
                        seconds, rss, cpu_seconds = timed([*UPCYCLE, "convert", str(source), str(root / "out"),
                                                           "--link", "copy", *extra])
                        key = "copy" + cache + "".join(", " + flag for flag in extra)
                        runs[key].append(seconds)
                        cpu[key].append(cpu_seconds)
                        copy_rss.append(rss)
                        shutil.rmtree(root / "out")
                for mode, folder, label, extra in link_runs:
                    os.sync()
                    seconds, _, cpu_seconds = timed([*UPCYCLE, "convert", str(folder), str(root / "out"),
                                                     "--link", mode, *extra])
                    written_by = json.loads((root / "out" / "upcycle.json").read_text())["source_files"]
                    shutil.rmtree(root / "out")
                    kinds = "/".join(sorted({entry["written_by"] for entry in written_by.values()}))
                    runs.setdefault(f"{label} ({kinds})", []).append(seconds)
                    cpu.setdefault(f"{label} ({kinds})", []).append(cpu_seconds)
            budget = baseline_rss + largest + RSS_MARGIN_BYTES
            variants = {cache + flag: cache for cache in ("", " cold") for flag in ("", ", --no-source-sha256")}
            ratios = {variant: [copy / cp for copy, cp in zip(runs["copy" + variant], runs["cp" + cache])]
                      for variant, cache in variants.items()}
            best = {variant: min(runs["copy" + variant]) / min(runs["cp" + cache])
                    for variant, cache in variants.items()}
            row = {"size_gb": total / 1e9, "shards": n_shards, "largest_shard_gb": largest / 1e9, "seconds": runs,
                   "cpu_seconds": cpu, "copy_over_cp": ratios[""], "copy_over_cp_best": best[""],
                   "copy_over_cp_cold": ratios[" cold"], "copy_over_cp_cold_best": best[" cold"],
                   "copy_over_cp_variants": ratios, "copy_over_cp_variants_best": best,
                   "copy_rss_mib": max(copy_rss) / 2**20, "rss_budget_mib": budget / 2**20}
            rows.append(row)

            def show(values: list[float]) -> str:
                return ", ".join(f"{value:.2f}" for value in values)

            print("  wall seconds per run (CPU seconds, user + system, in brackets)")
            print(f"  upcycle --help (start-up):  {show(runs['startup'])} ({show(cpu['startup'])})")
            for cache, label in (("", "warm"), (" cold", "cold")):
                print(f"  cp -r, {label}: {show(runs['cp' + cache])} ({show(cpu['cp' + cache])})")
                for variant in (cache, cache + ", --no-source-sha256"):
                    print(f"  convert --link copy{variant.replace(' cold', '')}, {label}: {show(runs['copy' + variant])} "
                          f"({show(cpu['copy' + variant])}); copy / cp per run: {show(ratios[variant])}, "
                          f"best / best {best[variant]:.2f} (limit {COPY_RATIO_LIMIT})")
            print(f"  peak RSS, convert copy:     {row['copy_rss_mib']:.0f} MiB (limit {row['rss_budget_mib']:.0f} "
                  f"= baseline {baseline_rss / 2**20:.0f} + largest shard {largest / 2**20:.0f} + 300)")
            for label, values in runs.items():
                if label in ("startup", *copy_keys):
                    continue
                over = [value - startup for value, startup in zip(values, runs["startup"])]
                best = min(values) - min(runs["startup"])
                print(f"  convert --link {label}: {show(values)} ({show(cpu[label])}); minus start-up per run: "
                      f"{show(over)}, best - best {best:+.2f} (limit {LINK_OVER_STARTUP_LIMIT_S:.1f})")
            shutil.rmtree(source)
            shutil.rmtree(root / f"hub-cache-{size:g}GB")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nresults (JSON):")
    print(json.dumps({"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                      "python": sys.version.split()[0], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
