"""Malformed model inputs for the bad-file harness (issue 17): GGUF files, safetensors files and
config.json files, each made from a sound tiny model by one targeted damage.

``make_all(good_dir, good_gguf, root)`` -> {case name: path to give as MODEL}. GGUF damage is
placed with a small walker over the file's layout (header, key/value pairs, tensor infos,
aligned data: ggml's gguf.md), so each case hits the field it names.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
BIG = 2**62


def _walk(buf: bytes) -> dict:
    """Offsets of a GGUF file's fields: kv[i] = (key_off, type_off, value_off, key), tensors[i] = {...}."""
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)

    def skip_value(t: int, p: int) -> int:
        if t == 8:
            (n,) = struct.unpack_from("<Q", buf, p)
            return p + 8 + n
        if t == 9:
            et, n = struct.unpack_from("<IQ", buf, p)
            p += 12
            for _ in range(n):
                p = skip_value(et, p)
            return p
        return p + _SCALAR[t]

    kv = []
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8: pos + 8 + klen].decode()
        t_off = pos + 8 + klen
        (t,) = struct.unpack_from("<I", buf, t_off)
        kv.append((pos, t_off, t_off + 4, key, t))
        pos = skip_value(t, t_off + 4)
    tensors = []
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", buf, pos)
        nd_off = pos + 8 + nlen
        (nd,) = struct.unpack_from("<I", buf, nd_off)
        dims_off = nd_off + 4
        type_off = dims_off + 8 * nd
        tensors.append({"ndims": nd_off, "dims": dims_off, "type": type_off, "offset": type_off + 4})
        pos = type_off + 12
    return {"kv": kv, "tensors": tensors, "end_of_infos": pos}


def _put(buf: bytes, off: int, fmt: str, value) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def gguf_cases(good: Path) -> dict[str, bytes]:
    buf = good.read_bytes()
    w = _walk(buf)
    kv = {k[3]: k for k in w["kv"]}
    arch = kv["general.architecture"]
    tokens = kv["tokenizer.ggml.tokens"]
    t0 = w["tensors"][0]
    return {
        "gguf_empty": b"",
        "gguf_magic_only": b"GGUF",
        "gguf_bad_magic": b"GGUX" + buf[4:],
        "gguf_version_0": _put(buf, 4, "<I", 0),
        "gguf_version_999": _put(buf, 4, "<I", 999),
        "gguf_tensor_count_huge": _put(buf, 8, "<Q", 2**63 - 1),
        "gguf_tensor_count_plus_1000": _put(buf, 8, "<Q", len(w["tensors"]) + 1000),
        "gguf_kv_count_huge": _put(buf, 16, "<Q", BIG),
        "gguf_kv_count_plus_1000": _put(buf, 16, "<Q", len(w["kv"]) + 1000),
        "gguf_key_length_huge": _put(buf, w["kv"][0][0], "<Q", BIG),
        "gguf_value_type_99": _put(buf, w["kv"][0][1], "<I", 99),
        "gguf_string_length_huge": _put(buf, arch[2], "<Q", BIG),
        "gguf_array_length_huge": _put(buf, tokens[2] + 4, "<Q", BIG),
        "gguf_arch_not_utf8": _put(buf, arch[2] + 8, "<B", 0xFF),
        "gguf_arch_unknown": _put(buf, arch[2] + 8, "<4s", b"zzzz"),
        "gguf_tensor_ndims_1000": _put(buf, t0["ndims"], "<I", 1000),
        "gguf_tensor_dim_huge": _put(buf, t0["dims"], "<Q", BIG),
        "gguf_tensor_type_999": _put(buf, t0["type"], "<I", 999),
        "gguf_tensor_offset_huge": _put(buf, t0["offset"], "<Q", BIG),
        "gguf_tensor_offset_misaligned": _put(buf, t0["offset"], "<Q", struct.unpack_from("<Q", buf, t0["offset"])[0] + 1),
        "gguf_cut_in_header": buf[:20],
        "gguf_cut_in_metadata": buf[: (w["kv"][len(w["kv"]) // 2][0])],
        "gguf_cut_after_infos": buf[: w["end_of_infos"]],
        "gguf_cut_half": buf[: len(buf) // 2],
        "gguf_cut_last_bytes": buf[:-10],
    }


def _st_parts(path: Path) -> tuple[dict, bytes]:
    buf = path.read_bytes()
    (n,) = struct.unpack_from("<Q", buf, 0)
    return json.loads(buf[8: 8 + n]), buf[8 + n:]


def _st(header, data: bytes, raw_header: bytes | None = None) -> bytes:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def safetensors_cases(good: Path) -> dict[str, bytes]:
    buf = good.read_bytes()
    header, data = _st_parts(good)
    names = [k for k in header if k != "__metadata__"]
    first = names[0]

    def patched(**change) -> dict:
        h = json.loads(json.dumps(header))
        h[first].update(change)
        return h

    shape = header[first]["shape"]
    a, b = header[first]["data_offsets"]
    return {
        "st_empty": b"",
        "st_seven_bytes": buf[:7],
        "st_header_len_past_end": struct.pack("<Q", len(buf) * 2) + buf[8:],
        "st_header_len_huge": struct.pack("<Q", 2**63) + buf[8:],
        "st_header_len_zero": struct.pack("<Q", 0) + buf[8:],
        "st_header_not_json": _st(None, data, b"{this is not json" + b" " * 20),
        "st_header_list": _st([1, 2, 3], data),
        "st_header_not_utf8": _st(None, data, b'{"a\xff": 1}'),
        "st_header_deep": _st(None, data, b"[" * 100_000 + b"]" * 100_000),
        "st_dtype_unknown": _st(patched(dtype="X9"), data),
        "st_dtype_wrong_size": _st(patched(dtype="F64"), data),
        "st_shape_bigger_than_data": _st(patched(shape=[s * 2 for s in shape]), data),
        "st_shape_huge": _st(patched(shape=[2**40, 2**20]), data),
        "st_offsets_past_end": _st(patched(data_offsets=[a, len(data) + 4096]), data),
        "st_offsets_reversed": _st(patched(data_offsets=[b, a]), data),
        "st_cut_half": buf[: len(buf) // 2],
        "st_cut_last_bytes": buf[:-10],
        "st_no_tensors": _st({"__metadata__": {"format": "pt"}}, b""),
        # same bytes, another shape: consistent for safetensors, wrong for the model
        "st_wrong_shape_for_model": _st(patched(shape=[shape[0] // 2, shape[1] * 2] if len(shape) == 2 else shape), data),
    }


def config_cases(good: Path) -> dict[str, bytes]:
    cfg = json.loads(good.read_text())

    def c(**change) -> bytes:
        return json.dumps({**cfg, **change}).encode()

    def raw(key: str, text: str) -> bytes:
        return json.dumps({**cfg, key: 0}).replace(f'"{key}": 0', f'"{key}": {text}').encode()

    return {
        "cfg_not_json": b"{not json",
        "cfg_not_utf8": b'{"model_type": "llama\xff"}',
        "cfg_list": b"[1, 2]",
        "cfg_empty": b"",
        "cfg_deep": b"[" * 100_000 + b"]" * 100_000,
        "cfg_model_type_unknown": c(model_type="no-such-arch"),
        "cfg_no_model_type": json.dumps({k: v for k, v in cfg.items() if k != "model_type"}).encode(),
        "cfg_hidden_text": c(hidden_size="64"),
        "cfg_hidden_negative": c(hidden_size=-64),
        "cfg_heads_not_dividing": c(num_attention_heads=7),
        "cfg_vocab_huge": c(vocab_size=10**12),
        "cfg_layers_huge": c(num_hidden_layers=10**8),
        "cfg_hidden_huge": c(hidden_size=2**30),
        "cfg_intermediate_huge": c(intermediate_size=10**12),
        "cfg_int_5000_digits": raw("vocab_size", "1" + "0" * 5000),
        "cfg_hidden_nan": raw("hidden_size", "NaN"),
    }


def make_all(good_dir: Path, good_gguf: Path, root: Path) -> dict[str, Path]:
    """Every case as a MODEL path under ``root``: a .gguf file, or a copy of ``good_dir`` with one file damaged."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, data in gguf_cases(good_gguf).items():
        p = root / f"{name}.gguf"
        p.write_bytes(data)
        out[name] = p
    for kind, cases in (("model.safetensors", safetensors_cases(good_dir / "model.safetensors")),
                        ("config.json", config_cases(good_dir / "config.json"))):
        for name, data in cases.items():
            d = root / name
            shutil.copytree(good_dir, d)
            (d / kind).write_bytes(data)
            out[name] = d
    return out
