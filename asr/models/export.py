"""Export a Hugging Face Whisper model to CTranslate2 with ctranslate2's own converter.

The exported directory is self-describing: next to model.bin and ctranslate2's config.json it holds the
tokenizer, the feature-extractor settings and the generation config (prompt tokens, end-of-text, suppressed
tokens), so an engine can run it without the source model. Exports are written under a temporary name and
renamed into place, so a crash never leaves a half-written model behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from asr.errors import AsrError
from asr.models.registry import cache_dir, resolve_model

EXPORT_STAMP = "asr-export.json"
REQUIRED_FILES = ("tokenizer.json", "preprocessor_config.json", "generation_config.json")
OPTIONAL_FILES = ("tokenizer_config.json",)


def _key_files(model_dir: Path) -> list[Path]:
    """The files whose change means the export is stale: the weights (a re-trained checkpoint) and the configs."""
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    return weights + [model_dir / f for f in ("config.json", "generation_config.json") if (model_dir / f).is_file()]


def ct2_cache_dir(model_ref: str) -> Path:
    """Where an on-the-fly export of `model_ref` lives: keyed on the resolved model and its files' mtime/size."""
    resolved = resolve_model(model_ref)
    path = Path(resolved)
    if path.is_dir():
        path = path.resolve()
        weights = [f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in _key_files(path)]
        source = str(path)
    else:  # a hub id: keyed on the id alone (delete the cache entry to pick up a newer hub revision)
        weights, source = [], resolved
    name = re.sub(r"[^\w.-]+", "_", path.parent.name + "-" + path.name if path.name == "final" else path.name)
    source_key = hashlib.sha256(source.encode()).hexdigest()[:10]
    weights_key = hashlib.sha256("\n".join(weights).encode()).hexdigest()[:12]
    return cache_dir() / "ct2" / f"{name}-{source_key}" / weights_key


def _copy_files(model_dir: str) -> list[str]:
    """Files the converter copies next to model.bin; the required ones must exist in a local directory."""
    path = Path(model_dir)
    if not path.is_dir():
        return list(REQUIRED_FILES)  # hub id: the converter fetches them and fails clearly if one is missing
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise AsrError(f"{model_dir}: missing {', '.join(missing)}; re-save the model with its processor "
                       "and generation config (save_pretrained + save_processor)")
    return list(REQUIRED_FILES) + [f for f in OPTIONAL_FILES if (path / f).is_file()]


def export_ct2(model_ref: str, out: Path, quantization: str | None = None) -> Path:
    """Convert `model_ref` to a CTranslate2 directory at `out` (atomic); `quantization` e.g. int8, float16."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    out = Path(out)
    if quantization is not None and quantization not in ACCEPTED_MODEL_TYPES:
        raise AsrError(f"quantization '{quantization}' is not supported by ctranslate2 {ctranslate2.__version__}; "
                       f"choose one of {', '.join(ACCEPTED_MODEL_TYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AsrError(f"{out}: already exists; remove it or choose another --out")
    model_dir = resolve_model(model_ref)
    copy_files = _copy_files(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        TransformersConverter(model_dir, copy_files=copy_files).convert(str(tmp), quantization=quantization,
                                                                        force=True)
    except (OSError, ValueError, RuntimeError, NotImplementedError, KeyError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AsrError(f"{model_ref}: CTranslate2 export failed ({reason}); check that {model_dir} is a complete "
                       "Whisper model (config.json, weights, tokenizer)") from None
    stamp = {"source": model_dir, "model_ref": model_ref, "quantization": quantization,
             "ctranslate2": ctranslate2.__version__}
    (tmp / EXPORT_STAMP).write_text(json.dumps(stamp, indent=2))
    try:
        if out.is_dir():
            out.rmdir()  # an empty directory the caller made
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / "model.bin").is_file():  # a concurrent export of the same model finished first
            return out
        raise AsrError(f"{out}: cannot move the export into place; check the directory is writable") from None
    return out


def export_cached(model_ref: str) -> Path:
    """The cached CTranslate2 export of `model_ref`, exporting once (stale exports of the same model are removed)."""
    target = ct2_cache_dir(model_ref)
    if (target / "model.bin").is_file():
        return target
    print(f"exporting {model_ref} to CTranslate2 (once) -> {target}", file=sys.stderr)
    export_ct2(model_ref, target)
    for stale in target.parent.iterdir():
        if stale != target and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)
    return target
