"""Step 5, push: publishing a checkpoint to the Hugging Face Hub (the card itself is upcycle.checkpoint.model_card)."""
