"""The one generic conversion: plan it from a family spec, then write the MoE++ checkpoint."""
