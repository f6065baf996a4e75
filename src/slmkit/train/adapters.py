"""Several LoRA adapters over one base model, one chosen per request (per-user / per-tenant adapters).

The base weights are held once; each adapter adds only its low-rank
matrices. :class:`AdapterSet` loads adapter directories written by
``slmkit sft --lora`` (or any PEFT LoRA directory), checks that each was
trained on this base model, and activates one by name with PEFT's
``set_adapter`` for the duration of a request::

    adapters = AdapterSet.from_spec("default", {"alice": "out/alice", "bob": "out/bob"})
    with adapters.use("alice") as backend:        # an HFBackend with alice's adapter active
        backend.generate([[{"role": "user", "content": "hi"}]], GenParams())
    adapters.generate("bob", prompts, params)     # the same in one call; None = the bare base model

``use`` holds a lock, so concurrent requests are served one at a time (the
active adapter is model-wide state).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from slmkit.artefact import MANIFEST
from slmkit.errors import ConfigError, SlmkitError, UnsupportedModelError

log = logging.getLogger(__name__)

_ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class AdapterMismatchError(UnsupportedModelError):
    """An adapter was trained on a different base model than the one it is loaded onto."""


def base_fingerprint(model) -> dict:
    """Architecture facts plus a strided sample of the input embeddings: identifies a base model.

    The sample (64 values) is compared with a tolerance, so the same base loaded
    in fp32 or bf16 matches while a different checkpoint of the same
    architecture does not.
    """
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach()  # (V, D)
    rows = emb[:: max(1, emb.shape[0] // 8)][:8, :8].float()
    return {"arch": {k: getattr(cfg, k, None) for k in _ARCH_KEYS}, "embedding_sample": [round(float(v), 6) for v in rows.flatten()]}


def same_base(a: dict, b: dict) -> bool:
    if a.get("arch") != b.get("arch"):
        return False
    x = torch.tensor(a.get("embedding_sample", []))
    y = torch.tensor(b.get("embedding_sample", []))
    return x.shape == y.shape and bool(torch.allclose(x, y, rtol=2e-2, atol=1e-3))


def adapter_base(path: str | Path) -> dict | None:
    """The ``base_model`` record (name, fingerprint) an slmkit adapter directory carries, if any."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text()).get("base_model")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


class AdapterSet:
    """One base model and named LoRA adapters; :meth:`use` activates one per request."""

    def __init__(self, model, tokenizer, name: str | None = None):
        self.base = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "name_or_path", "") or "base")
        self.peft = None  # PeftModel once the first adapter is loaded
        self._fingerprint = base_fingerprint(model)
        self._lock = threading.RLock()

    @classmethod
    def from_spec(cls, spec: str, adapters: dict[str, str] | None = None, dtype: str = "fp32") -> AdapterSet:
        from slmkit.models import load

        model, tok = load(spec, dtype=dtype)
        out = cls(model, tok, name=spec)
        for name, path in (adapters or {}).items():
            out.add(name, path)
        return out

    def names(self) -> list[str]:
        """Names of the loaded adapters (``None`` in :meth:`use` selects the bare base model)."""
        return sorted(self.peft.peft_config) if self.peft is not None else []

    def add(self, name: str, path: str | Path) -> None:
        """Load the adapter directory ``path`` under ``name``.

        Raises :class:`AdapterMismatchError` when it was trained on another base model.
        """
        from peft import PeftModel

        path = Path(path)
        if not _NAME.match(name or ""):
            raise ConfigError(f"adapter name {name!r} is not valid", "use 1-64 letters, digits, '_', '-' or '.'")
        if name in self.names():
            raise ConfigError(f"an adapter named {name!r} is already loaded", "remove it first or pick another name")
        if not (path / "adapter_config.json").is_file():
            raise SlmkitError(
                f"{path} is not an adapter directory (no adapter_config.json)",
                "pass a directory written by `slmkit sft --lora` without --merge",
            )
        rec = adapter_base(path)
        if rec is not None and rec.get("fingerprint") and not same_base(rec["fingerprint"], self._fingerprint):
            raise AdapterMismatchError(
                f"adapter {name!r} ({path}) was trained on base model {rec.get('name')!r}, "
                f"which is not the loaded base {self.name!r}",
                "load the adapter onto the model it was trained from",
            )
        with self._lock:
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
                else:
                    self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as err:
                raise AdapterMismatchError(
                    f"adapter {name!r} ({path}) does not fit base model {self.name!r}: {str(err).splitlines()[0][:200]}",
                    "load the adapter onto the model it was trained from",
                ) from None
            self.peft.eval()
        log.info("loaded adapter %s from %s", name, path)

    def remove(self, name: str) -> None:
        with self._lock:
            self._check(name)
            if len(self.names()) == 1:
                self.peft = None
                self.base = self._unwrapped()
            else:
                self.peft.delete_adapter(name)

    def _unwrapped(self):
        return self.peft.unload() if self.peft is not None else self.base

    def _check(self, name: str) -> None:
        if name not in self.names():
            near = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            raise ConfigError(
                f"unknown adapter {name!r}; loaded: {', '.join(self.names()) or 'none'}",
                f"did you mean {', '.join(near)}?" if near else None,
            )

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator:
        """An :class:`~slmkit.backends.HFBackend` with ``adapter`` active (``None``: the base model alone).

        Holds the set's lock until the block ends.
        """
        from slmkit.backends import HFBackend

        with self._lock:
            if adapter is None:
                if self.peft is None:
                    yield HFBackend(self.base, self.tokenizer, name=self.name)
                else:
                    with self.peft.disable_adapter():
                        yield HFBackend(self.peft, self.tokenizer, name=self.name)
                return
            self._check(adapter)
            self.peft.set_adapter(adapter)
            yield HFBackend(self.peft, self.tokenizer, name=f"{self.name}:{adapter}")

    def generate(self, adapter: str | None, prompts: Sequence, params):
        """``backend.generate(prompts, params)`` with ``adapter`` active."""
        with self.use(adapter) as backend:
            return backend.generate(prompts, params)


def merged_models(base_model, tokenizer, adapters: dict[str, str], base_name: str = "base") -> dict:
    """LoRA adapters by name, each merged into its own copy of ``base_model`` (``W + s B A``, Hu et al. 2021):
    plain transformers models that run at the speed of the base (``slmkit serve MODEL --adapter NAME=DIR``
    serves each on the fast path).

    Loading and checking go through :class:`AdapterSet` (it validates names and refuses an adapter trained on
    another base model). Memory grows by one set of weights per adapter; ``base_model`` is not modified.
    """
    import copy

    aset = AdapterSet(copy.deepcopy(base_model), tokenizer, name=base_name)
    for name, path in adapters.items():
        aset.add(name, path)
    out = {}
    for name in adapters:
        with aset.use(name) as backend:  # the PEFT model with this adapter active
            out[name] = copy.deepcopy(backend.model).merge_and_unload(adapter_names=[name]).eval()
    return out
