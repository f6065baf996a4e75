"""Training: distillation losses and trainer, supervised fine-tuning, preference optimisation, adapters
(on transformers / TRL / PEFT).

Import the heavier submodules directly (``slmkit.train.distill``, ``slmkit.train.sft``,
``slmkit.train.dpo``, ``slmkit.train.adapters``).
"""

from slmkit.train.losses import LOSSES, LossConfig, distill_loss, token_divergence

__all__ = ["LOSSES", "LossConfig", "distill_loss", "token_divergence"]
