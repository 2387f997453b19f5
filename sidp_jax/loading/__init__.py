"""Reading what users bring: Hugging Face checkpoints (safetensors, config generations), tokenizers
and chat templates, and orbax checkpoints of placed weights."""
