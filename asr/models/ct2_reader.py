"""Read CTranslate2 `model.bin` files (binary versions 1-6) into numpy arrays, without ctranslate2 itself.

Format (little-endian, no padding), from ctranslate2/specs/model_spec.py `ModelSpec._serialize`:
u32 version; [v>=2: str spec_name, u32 revision]; u32 n_vars; per var: str name, u8 rank, u32 dims[rank],
[v>=4: u8 dtype, u32 nbytes | v<4: u8 item_size, u32 n_elements], data; [v>=3: u32 n_aliases, (str, str)*].
str = u16 length including NUL, bytes, NUL.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from asr.errors import AsrError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_LEGACY_ITEM = {4: np.float32, 2: np.int16, 1: np.int8}


@dataclass
class Ct2Model:
    """Variables of a CTranslate2 model with aliases resolved (an alias shares its target's array)."""

    version: int
    spec_name: str
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


class _ConcatReader(io.RawIOBase):
    """Reads several files as one stream: split packages are plain byte ranges of one model.bin."""

    def __init__(self, paths: Sequence[Path]):
        self._files = [open(p, "rb") for p in paths]
        self._i = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self._i < len(self._files):
            n = self._files[self._i].readinto(buf)
            if n:
                return n
            self._i += 1
        return 0

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"truncated while reading {what}")
    return data


def _u(f: BinaryIO, fmt: str, what: str) -> int:
    return struct.unpack("<" + fmt, _exact(f, struct.calcsize(fmt), what))[0]


def _str(f: BinaryIO, what: str) -> str:
    n = _u(f, "H", what)
    return _exact(f, n, what)[:-1].decode("utf-8")


def _bf16_to_f32(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    u16 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
    return u16.view(np.float32).reshape(shape)


def read_ct2(parts: Path | Sequence[Path]) -> Ct2Model:
    """Parse model.bin (or its byte-split parts, in order) into arrays; raises AsrError if truncated."""
    paths = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    for p in paths:
        if not p.is_file():
            raise AsrError(f"{p}: CTranslate2 model file not found; reinstall the package that ships it")
    stream = io.BufferedReader(_ConcatReader(paths), buffer_size=1 << 20)
    name = "<header>"
    try:
        version = _u(stream, "I", "version")
        if not 1 <= version <= 6:
            raise AsrError(f"{paths[0]}: unsupported CTranslate2 binary version {version} (expected 1-6)")
        spec_name = ""
        if version >= 2:
            spec_name = _str(stream, "spec name")
            _u(stream, "I", "spec revision")
        model = Ct2Model(version=version, spec_name=spec_name)
        for _ in range(_u(stream, "I", "variable count")):
            name = _str(stream, "variable name")
            rank = _u(stream, "B", name)
            shape = tuple(_u(stream, "I", name) for _ in range(rank))
            if version >= 4:
                dtype = _DTYPES[_u(stream, "B", name)]
                nbytes = _u(stream, "I", name)
            else:
                dtype = _LEGACY_ITEM[_u(stream, "B", name)]
                nbytes = _u(stream, "I", name) * np.dtype(dtype).itemsize
            raw = _exact(stream, nbytes, name)
            if dtype == "bfloat16":
                model.variables[name] = _bf16_to_f32(raw, shape)
            else:
                model.variables[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        if version >= 3:
            for _ in range(_u(stream, "I", "alias count")):
                alias, target = _str(stream, "alias"), _str(stream, "alias target")
                model.aliases[alias] = target
                for suffix in ("", "_scale"):  # the C++ loader also aliases the quantization scale
                    if target + suffix in model.variables:
                        model.variables[alias + suffix] = model.variables[target + suffix]
    except EOFError as exc:
        raise AsrError(f"{paths[-1]}: CTranslate2 model is truncated at '{name}' ({exc}); "
                       "re-download the package parts") from None
    finally:
        stream.close()
    return model


def dequantize(model: Ct2Model, name: str) -> np.ndarray:
    """Return variable `name` as float32, undoing int8/int16 quantization (weight / scale, per row)."""
    w = model.variables[name]
    if w.dtype in (np.int8, np.int16):
        scale = model.variables.get(name + "_scale")
        if scale is None:
            raise AsrError(f"CTranslate2 variable {name} is quantized but has no scale")
        s = np.asarray(scale, dtype=np.float32)
        flat = w.reshape(w.shape[0], -1).astype(np.float32)
        return (flat / (s.reshape(-1, 1) if s.ndim else s)).reshape(w.shape)
    return w.astype(np.float32)
