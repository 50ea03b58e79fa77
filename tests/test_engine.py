"""The engine's set-up where a CPU run cannot see it fail: every collective runs on the run's device (NCCL has no
CPU tensors, so a GPU run would stop at the first CPU one)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from asr.errors import AsrError
from asr.train.engine import Dist, use_bf16

ROOT = Path(__file__).resolve().parents[1] / "asr"
# torch.distributed's collectives that take tensors (barrier and the *_object ones place their own)
TENSOR_COLLECTIVES = {"all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv"}


def on(device: str) -> Dist:
    return Dist(rank=0, world=1, local_rank=0, device=torch.device(device))


def test_a_collective_handed_a_tensor_off_the_run_device_fails_clearly(monkeypatch):
    """A GPU run handing NCCL a CPU tensor: refused with a line naming the fix (the meta device stands in for
    the GPU, so the check runs here without one)."""
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("the off-device tensor reached the backend"))
    with pytest.raises(AsrError) as err:
        on("meta").all_reduce(torch.tensor([1.0]))
    assert str(err.value) == ("asr/train/engine.py: a collective was handed a tensor on cpu but the run's device is "
                              "meta; pass numbers to Dist.all_reduce, or a tensor on meta")


def test_numbers_are_reduced_on_the_run_device(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op: seen.append((tensor.device, tensor.shape, op)))
    on("meta").all_reduce([1.0, 2.0], op=dist.ReduceOp.MIN)
    assert seen == [(torch.device("meta"), (2,), dist.ReduceOp.MIN)]


def _dotted(node: ast.AST) -> str:
    return f"{_dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "")


@pytest.mark.skipif(torch.cuda.is_available() or not Path("/proc/cpuinfo").is_file(), reason="a CPU run on Linux")
def test_bf16_auto_on_the_cpu_follows_the_cpus_own_bf16_flags():
    """'auto' reads torch's private CPU probes; /proc/cpuinfo's flags say independently whether this CPU computes
    bf16 natively (a CPU without them would emulate it, slower than fp32)."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert use_bf16("auto") == bool({"avx512_bf16", "amx_bf16"} & set(flags))
    assert use_bf16(False) is False and use_bf16(True) is True


def test_every_tensor_collective_goes_through_dist_all_reduce():
    """The one place that puts tensors on the run's device is the only caller of torch.distributed's tensor
    collectives (read from the source, as tests/test_layout.py reads imports)."""
    calls = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        helper = {id(n) for f in ast.walk(tree) if isinstance(f, ast.ClassDef) and f.name == "Dist"
                  for m in f.body if isinstance(m, ast.FunctionDef) and m.name == "all_reduce" for n in ast.walk(m)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in TENSOR_COLLECTIVES \
                    and _dotted(node.func.value) in ("dist", "torch.distributed", "deepspeed.comm") \
                    and id(node) not in helper:
                calls.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not calls, f"tensor collectives outside Dist.all_reduce: {calls}"
