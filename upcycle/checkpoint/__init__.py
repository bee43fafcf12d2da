"""Reading source checkpoints (headers only, never whole models) and writing outputs atomically."""
