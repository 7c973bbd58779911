"""fedlora: federated fine-tuning of LoRA adapters (FLoRA-NA and baselines)."""

__version__ = "0.1.0"
