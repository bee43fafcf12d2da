"""The MoE++ paper's routing findings, each stated with the numbers measured here and whether it holds.

Each finding is {"claim", "holds": True / False / None (cannot be told from this run), "evidence"}: the
thresholds below are this project's reading of the paper's wording, stated in the evidence so a reader can judge.
"""

from statistics import mean, pstdev

MIN_CORRELATION = 0.1  # mean adjacent-layer correlation (every pair positive) to call it a correlation
MIN_KIND_TOKENS = 50  # kinds with fewer tokens are left out of the verb / word-piece comparison
TASKS_DIFFER = 0.05  # FFN experts per token between the most and least hungry rows, to call tasks different
SAME_MEAN = 0.1  # |mean on - mean off| / std off below this: the mean did not move
SAME_RANGE = 0.1  # |range on - range off| / range off below this: the range did not move


def layer_spread(rows: list[dict]) -> list[float] | None:
    """Per MoE layer, the standard deviation of FFN experts per token across rows; None with fewer than two rows."""
    if len(rows) < 2:
        return None
    columns = zip(*(row["ffn_experts_per_token_per_layer"] for row in rows))
    return [pstdev(column) for column in columns]


def _fmt(values) -> str:
    return ", ".join("n/a" if value is None else f"{value:.3f}" for value in values)


def adjacent_finding(result: dict) -> dict:
    values = result["adjacent_layer_correlation"]["ffn_experts_per_token"]
    known = [value for value in values if value is not None]
    holds = (mean(known) >= MIN_CORRELATION and min(known) > 0) if known else None
    note = (f" (mean {mean(known):.3f}; at least {MIN_CORRELATION} with every pair positive counts as correlated)"
            if known else " (no variation: every token uses the same number of FFN experts)")
    return {"claim": "FFN expert load per token correlates between adjacent MoE layers", "holds": holds,
            "evidence": f"per-token Pearson correlation of FFN experts per token, adjacent layer pairs: {_fmt(values)}"
                        + note}


def spread_finding(result: dict) -> dict:
    spread = result.get("layer_spread_across_rows")
    claim = "shallow and last MoE layers vary most across tasks"
    if spread is None or len(spread) < 3:
        return {"claim": claim, "holds": None,
                "evidence": "needs at least two rows (--tasks) and three MoE layers"}
    middle = mean(spread[1:-1])
    return {"claim": claim, "holds": spread[0] > middle and spread[-1] > middle,
            "evidence": f"std of FFN experts per token across rows, per layer: {_fmt(spread)} (first and last "
                        f"against the middle layers' mean {middle:.3f})"}


def tasks_finding(result: dict) -> dict:
    rows = result["rows"]
    claim = "tasks differ in FFN experts per token"
    if len(rows) < 2:
        return {"claim": claim, "holds": None, "evidence": "one row only: pass --tasks"}
    values = [row["ffn_experts_per_token"] for row in rows]
    gap = max(values) - min(values)
    return {"claim": claim, "holds": gap > TASKS_DIFFER,
            "evidence": "FFN experts per token: " + ", ".join(f"{row['name']} {row['ffn_experts_per_token']:.3f}"
                                                              for row in rows)
                        + f" (largest gap {gap:.3f}; above {TASKS_DIFFER} counts as different)"}


def zero_finding(result: dict) -> dict:
    shares = result["rows"][-1]["zero_computation_share"]  # the data row
    claim = "the Zero expert is the most used zero-computation expert"
    if not any(shares.values()):
        return {"claim": claim, "holds": None, "evidence": "no slot went to a zero-computation expert"}
    only = [kind for kind, share in shares.items() if share > 0]
    note = (f" (only {only[0]} took slots: calibration switches types on in priority order, so this says more "
            "about the calibration than about the routers)" if len(only) == 1 else "")
    return {"claim": claim, "holds": shares["zero"] >= max(shares["copy"], shares["constant"]),
            "evidence": "share of routing slots: " + ", ".join(f"{kind} {share:.3f}" for kind, share in shares.items())
                        + note}


def token_kind_finding(result: dict) -> dict:
    kinds = {kind: row for kind, row in result["token_kinds"]["kinds"].items() if row["tokens"] >= MIN_KIND_TOKENS}
    claim = "verbs use the most FFN experts and word pieces the fewest"
    evidence = "FFN experts per token: " + ", ".join(f"{kind} {row['ffn_experts_per_token']:.3f} ({row['tokens']})"
                                                     for kind, row in kinds.items())
    if "verb" not in kinds or "word piece" not in kinds:
        return {"claim": claim, "holds": None,
                "evidence": evidence + " (needs verbs and word pieces: install HanTa for parts of speech)"}
    ranked = sorted(kinds, key=lambda kind: kinds[kind]["ffn_experts_per_token"])
    return {"claim": claim, "holds": ranked[-1] == "verb" and ranked[0] == "word piece",
            "evidence": evidence + f" (kinds with at least {MIN_KIND_TOKENS} tokens)"}


def residual_finding(result: dict) -> dict:
    claim = "the gating residual lowers routing-score variance without moving their mean or range"
    if not result["routing_scores"]["gating_residual_nonzero"]:
        return {"claim": claim, "holds": None,
                "evidence": "every gating-residual weight of this checkpoint is zero (converted or calibrated, not "
                            "trained): on and off are the same model"}
    verdicts, parts = [], []
    for kind, layers in result["routing_scores"]["per_layer"].items():
        for row in layers[1:]:  # the first MoE layer has no residual
            on, off = row["on"], row["off"]
            spread = off["variance"] ** 0.5
            same_mean = kind == "probabilities" or abs(on["mean"] - off["mean"]) <= SAME_MEAN * max(spread, 1e-12)
            same_range = abs(on["range"] - off["range"]) <= SAME_RANGE * max(off["range"], 1e-12)
            verdicts.append(on["variance"] < off["variance"] and same_mean and same_range)
            parts.append(f"{kind} layer {row['layer']}: variance {on['variance']:.4g} vs {off['variance']:.4g}, "
                         f"mean {on['mean']:.4g} vs {off['mean']:.4g}, range {on['range']:.4g} vs {off['range']:.4g}")
    return {"claim": claim, "holds": all(verdicts) if verdicts else None,
            "evidence": "on vs off: " + "; ".join(parts) + f" (mean within {SAME_MEAN} std, range within "
                        f"{SAME_RANGE:.0%})"}


def paper_findings(result: dict) -> list[dict]:
    return [adjacent_finding(result), spread_finding(result), tasks_finding(result), zero_finding(result),
            token_kind_finding(result), residual_finding(result)]
