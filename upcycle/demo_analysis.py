"""The demo's routing analyses: `upcycle analyze`'s (upcycle.evaluation.analyses) on the trained MoE++ at one budget.

The lowest budget is analysed, where the trained routers send tokens to zero-computation experts the most. On the
first `analysis_blocks` held-out blocks, with the source as the reference for router confidence and the demo's
downstream task as a second heatmap row (its routing was recorded while the task ran, so nothing runs twice). Writes
analysis.json and analyze's PNG plots into the demo output's analysis/ folder; paths in them are relative to the
demo output, which is renamed into place at the end.
Measured on 2 CPU cores: about 2 s for 32 blocks with the source and the part-of-speech tagger, plus the plots.
"""

from pathlib import Path

import torch

from .evaluation.analyses import RESULTS_FILE, analyze_model, task_row, write_analysis
from .evaluation.parts_of_speech import load_tagger

ANALYSIS_FOLDER = "analysis"


def write_demo_analysis(demo_folder: Path, checkpoint: str, model, source_model, blocks: torch.Tensor, tokenizer,
                        task_result=None) -> dict:
    """Analyse `model` (the MoE++ checkpoint saved at demo_folder/checkpoint) on held-out blocks (n, S), write
    demo_folder/analysis/; returns what results.json lists: the budget's files and the paper's findings."""
    result = {"checkpoint": checkpoint, "data": "data/heldout.txt (the demo's held-out blocks)",
              "source": "the embedded demo model", "tasks": [task_result.name] if task_result is not None else [],
              "blocks": blocks.shape[0], "block_size": blocks.shape[1]}
    result |= analyze_model(model, blocks, tokenizer, source_model, tagger=load_tagger(), data_name="held-out text")
    if task_result is not None:
        result["rows"] = [task_row(task_result)] + result["rows"]
    write_analysis(result, Path(demo_folder) / ANALYSIS_FOLDER, ANALYSIS_FOLDER)
    return {"checkpoint": checkpoint, "blocks": result["blocks"], "tokens": result["tokens"],
            "files": [f"{ANALYSIS_FOLDER}/{RESULTS_FILE}", *result["plots"]],
            "findings": [{"claim": finding["claim"], "holds": finding["holds"]} for finding in result["findings"]]}


def analyse_lowest_budget(demo_folder: Path, budgets: list[dict], source_model, blocks: torch.Tensor, tokenizer,
                          progress) -> dict:
    """The analyses of the trained MoE++ at the lowest of the demo's budgets (each budget carries its trained model
    and task result under "_trained"); returns results.json's "analysis" entry and reports it on a progress line."""
    lowest = min(budgets, key=lambda budget: budget["target"])
    trained = lowest["_trained"]
    analysis = {"target": lowest["target"]} | write_demo_analysis(
        demo_folder, trained["name"], trained["model"], source_model, blocks, tokenizer, trained["task_result"])
    holding = sum(finding["holds"] is True for finding in analysis["findings"])
    progress(f"budget {lowest['target']:g}: routing analyses of the trained MoE++ on {analysis['tokens']:,} held-out "
             f"tokens: {holding} of {len(analysis['findings'])} of the paper's findings hold ({ANALYSIS_FOLDER}/)")
    return analysis
