#!/usr/bin/python3
"""Minimal, self-contained reader/writer for the safetensors file format.

File layout (all integers little-endian):

    [8 bytes]  N = length of the JSON header in bytes (unsigned 64-bit)
    [N bytes]  UTF-8 JSON object:
                 {"<name>": {"dtype": "F32", "shape": [2, 3],
                             "data_offsets": [begin, end]},
                  ...,
                  "__metadata__": {"<str>": "<str>", ...}}   (optional)
               padded with trailing spaces so that the data starts 8-byte
               aligned.
    [rest]     raw tensor bytes, row-major, little-endian; data_offsets are
               relative to the start of this byte buffer.

Only torch and the standard library are used.  Supported dtypes:
F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL.

    save_file({"w": tensor}, "model.safetensors", metadata={"k": "v"})
    tensors = load_file("model.safetensors")
    tensors, metadata = load_file_with_metadata("model.safetensors")

Run ``safetensors_io.py --self-test`` for a round-trip check.
"""

import ctypes
import json
import struct
import sys

import torch

__all__ = ["save_file", "load_file", "load_file_with_metadata",
           "save_bytes", "load_bytes"]

# safetensors dtype tag <-> torch dtype.
_TAG_TO_DTYPE = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_TO_TAG = {v: k for k, v in _TAG_TO_DTYPE.items()}

# For reinterpreting raw bytes: a dtype of the same width that numpy-free
# torch.frombuffer handles everywhere (bfloat16 goes through int16).
_VIEW_AS = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}

_METADATA_KEY = "__metadata__"
_MAX_HEADER = 100 * 1024 * 1024  # same sanity limit as the upstream format


def _check_little_endian():
    if sys.byteorder != "little":
        raise RuntimeError("safetensors_io supports little-endian hosts only")


def _tensor_bytes(t):
    """Raw little-endian bytes of a tensor (contiguous CPU copy)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    if t.numel() == 0:
        return b""
    # Copy the contiguous storage bytes directly (no numpy needed).
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def save_bytes(tensors, metadata=None):
    """Serialise a dict name -> torch.Tensor into safetensors bytes."""
    _check_little_endian()
    if not isinstance(tensors, dict):
        raise TypeError("tensors must be a dict of name -> torch.Tensor")
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: not a torch.Tensor ({type(t)})")
        if t.dtype not in _DTYPE_TO_TAG:
            raise TypeError(f"{name}: unsupported dtype {t.dtype}")
        data = _tensor_bytes(t)
        header[name] = {
            "dtype": _DTYPE_TO_TAG[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("metadata must map str -> str")
        header[_METADATA_KEY] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)  # 8-byte alignment of the data section
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def save_file(tensors, path, metadata=None):
    """Write a dict name -> torch.Tensor to ``path`` in safetensors format."""
    blob = save_bytes(tensors, metadata)
    with open(path, "wb") as f:
        f.write(blob)


def load_bytes(blob):
    """Parse safetensors bytes; returns (dict name -> Tensor, metadata)."""
    _check_little_endian()
    if len(blob) < 8:
        raise ValueError("safetensors: file too short")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise ValueError(f"safetensors: bad header length {n}")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"safetensors: bad JSON header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors: header is not a JSON object")
    metadata = header.pop(_METADATA_KEY, None) or {}
    data = memoryview(blob)[8 + n:]
    out = {}
    for name, info in header.items():
        try:
            dtype = _TAG_TO_DTYPE[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"safetensors: bad entry for {name!r}: "
                             f"{info!r}") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise ValueError(f"safetensors: {name}: negative dim")
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(data) or \
                end - begin != numel * itemsize:
            raise ValueError(f"safetensors: {name}: offsets {begin}..{end} "
                             f"do not fit shape {shape} {info['dtype']}")
        view_dtype = _VIEW_AS.get(dtype, dtype)
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            # bytearray copy -> writable, owned memory (no warnings).
            buf = bytearray(data[begin:end])
            t = torch.frombuffer(buf, dtype=view_dtype).reshape(shape)
            if view_dtype != dtype:
                t = t.view(dtype)
        out[name] = t
    return out, metadata


def load_file_with_metadata(path):
    """Read ``path``; returns (dict name -> Tensor, metadata dict)."""
    with open(path, "rb") as f:
        blob = f.read()
    return load_bytes(blob)


def load_file(path):
    """Read ``path``; returns dict name -> torch.Tensor (on CPU)."""
    return load_file_with_metadata(path)[0]


def _self_test():
    g = torch.Generator().manual_seed(0)
    ref = {
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "f32": torch.randn(4, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 5, generator=g).bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (3, 3), generator=g),
        "i32": torch.randint(-2**30, 2**30, (6,), generator=g,
                             dtype=torch.int32),
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(0, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "noncontig": torch.randn(4, 6, generator=g).t(),
    }
    blob = save_bytes(ref, metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0, "header not padded to 8 bytes"
    got, meta = load_bytes(blob)
    assert meta == {"format": "pt"}, meta
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        assert got[k].shape == ref[k].shape, k
        assert torch.equal(got[k], ref[k]), k
    # Known byte layout for one tiny tensor (checks endianness and header).
    blob = save_bytes({"a": torch.tensor([1.0, -2.0])})
    hdr = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    hdr += b" " * ((-len(hdr)) % 8)
    expect = struct.pack("<Q", len(hdr)) + hdr + struct.pack("<2f", 1, -2)
    assert blob == expect, (blob, expect)
    # BF16 bytes are the upper halves of the fp32 bit patterns.
    blob = save_bytes({"b": torch.tensor([1.0], dtype=torch.bfloat16)})
    assert blob[-2:] == struct.pack("<H", 0x3F80), blob[-2:]
    # Corrupt files are rejected.
    for bad in (b"", b"\x01" + b"\x00" * 7, blob[:-1]):
        try:
            load_bytes(bad)
        except ValueError:
            pass
        else:
            raise AssertionError("corrupt file accepted")
    print("safetensors_io self-test: OK")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        _self_test()
    else:
        print(__doc__)
        sys.exit(2)
