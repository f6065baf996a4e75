"""Where a model runs: ``--device auto|cpu|cuda|cuda:N`` and the dtype that suits it.

``auto`` is the current CUDA device when torch sees one, else the CPU. On a GPU the default
compute dtype is bf16 (half the memory of fp32, and tensor-core speed; fp16 on GPUs without
bf16); on a CPU it stays fp32 unless asked (``auto`` there means bf16 only on CPUs with
native bf16, see :func:`slmkit.models.load.cpu_has_bf16`).
"""

from __future__ import annotations

import re

import torch

from slmkit.errors import ConfigError

CHOICES = "auto | cpu | cuda | cuda:N"


def resolve_device(spec: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """The :class:`torch.device` for ``spec``; a device that is not there raises :class:`ConfigError` naming ``flag``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise ConfigError(f"{flag} {spec}: not a device", f"use one of: {CHOICES}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"{flag} {spec}: CUDA is not available here ({why}, torch {torch.__version__})",
                          f"use {flag} cpu (or auto), or install torch's CUDA build (README: PyTorch: CPU or CUDA)")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {spec}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0 ...)",
                          "pick one of them, or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def default_dtype(device: torch.device) -> str:
    """``bf16`` on a GPU that has it (``fp16`` on one that does not), ``fp32`` on the CPU."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """``dtype`` as given, or the device's default when None; ``auto`` on a GPU is its default too."""
    if dtype is None or (dtype.lower() == "auto" and device.type == "cuda"):
        return default_dtype(device)
    return dtype


def training_device_check(device: torch.device, flag: str = "--device") -> None:
    """Trainer-based training runs on the first visible GPU (all of them under ``accelerate launch``):
    a specific other GPU is chosen with CUDA_VISIBLE_DEVICES, which this says."""
    if device.type == "cuda" and (device.index or 0) != 0:
        raise ConfigError(f"{flag} {device}: training runs on the first visible GPU",
                          f"run with CUDA_VISIBLE_DEVICES={device.index} and {flag} cuda")
