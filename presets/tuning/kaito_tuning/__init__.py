"""KAITO fine-tuning program: trains a LoRA/QLoRA adapter from ``training_config.yaml`` (see README.md)."""
