"""Training: distillation losses and the distillation trainer (on transformers Trainer)."""

from slmkit.train.losses import LOSSES, LossConfig, distill_loss, token_divergence

__all__ = ["LOSSES", "LossConfig", "distill_loss", "token_divergence"]
