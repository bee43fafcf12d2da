"""Step 4, eval: perplexity, KL and paired ratios, routing statistics, training-free baselines, plots."""
