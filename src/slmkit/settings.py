"""slmkit's environment variables: the one module of the library that reads them (the CLI reads its own,
``SLMKIT_LOG``, ``SLMKIT_DEBUG`` and ``SLMKIT_PROGRESS``, at the edge).

Each setting is read when it is asked for, so a test or a caller that changes ``os.environ`` is seen at once;
``tests/test_architecture.py`` checks that no other library module reads ``os.environ``.

=========================  ==========================================================  =================================
variable                   meaning                                                     read by
=========================  ==========================================================  =================================
``SLMKIT_CACHE``           slmkit's cache (kernels, unpacked packaged models); else     runtime.kernelcache, models.zoo
                           ``$XDG_CACHE_HOME/slmkit``, else ``~/.cache/slmkit``
``SLMKIT_KERNEL``          force a CPU kernel variant (avx512, avx2, neon, portable;    runtime.q4kernel
                           ``auto`` or unset: from the CPU's flags)
``SLMKIT_Q4_KERNEL``       ``0`` turns slmkit's C kernels off (torch's kernels run)     runtime.q4kernel
``CC``                     the C compiler for the kernels (else cc, gcc, g++)          runtime.kernelcache
``SLMKIT_LLAMA_CPP``       a llama.cpp ``bin/`` directory to use                       export.llamacpp
``SLMKIT_LLAMA_CPP_HOME``  where scripts/build_llamacpp.sh builds llama.cpp            export.llamacpp
``HF_HUB_OFFLINE``         the Hugging Face hub is offline (for the error message)     models.load
``SLMKIT_DATA``            the shared evaluation data folder                           data.paths
=========================  ==========================================================  =================================
"""

from __future__ import annotations

import os
from pathlib import Path

KERNEL = "SLMKIT_KERNEL"
DATA = "SLMKIT_DATA"


def cache_root() -> Path:
    """``$SLMKIT_CACHE``, else ``$XDG_CACHE_HOME/slmkit``, else ``~/.cache/slmkit`` (an empty variable counts as unset)."""
    root = os.environ.get("SLMKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "slmkit")
    return Path(root)


def kernel_variant() -> str:
    """``$SLMKIT_KERNEL`` stripped and lower-cased ("" when unset)."""
    return os.environ.get(KERNEL, "").strip().lower()


def q4_kernel_enabled() -> bool:
    """False when ``SLMKIT_Q4_KERNEL=0``."""
    return os.environ.get("SLMKIT_Q4_KERNEL", "1") != "0"


def c_compiler() -> str | None:
    """``$CC`` when set and not empty."""
    return os.environ.get("CC") or None


def llama_cpp_bin() -> Path | None:
    """``$SLMKIT_LLAMA_CPP`` (a llama.cpp ``bin/`` directory) when set and not empty."""
    env = os.environ.get("SLMKIT_LLAMA_CPP")
    return Path(env) if env else None


def llama_cpp_home() -> Path | None:
    """``$SLMKIT_LLAMA_CPP_HOME`` when set and not empty."""
    env = os.environ.get("SLMKIT_LLAMA_CPP_HOME")
    return Path(env) if env else None


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` says the hub is offline (anything but unset, "", "0" or "false")."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def data_dir() -> Path | None:
    """``$SLMKIT_DATA`` when set and not empty."""
    env = os.environ.get(DATA)
    return Path(env) if env else None
