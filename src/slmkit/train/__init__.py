"""Training: supervised fine-tuning, preference optimisation, adapters (on transformers / TRL / PEFT).

Import the submodules directly (``slmkit.train.sft``, ``slmkit.train.dpo``, ``slmkit.train.adapters``);
importing this package loads nothing heavy.
"""
