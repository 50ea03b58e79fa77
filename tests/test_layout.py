"""The package's imports run one way, down the stage map the README's Architecture section draws.

Every `from asr.X import` and `import asr.X` (at module level or inside a function) is read from the source, so a
lazy import that reaches up the flow fails here as surely as a top-level one.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "asr"

# Lowest first. A module may import its own package and any package in a lower layer, never one above it.
LAYERS = [
    {"asr.errors"},
    {"asr.config"},
    {"asr.models"},
    {"asr.data"},
    {"asr.infer"},
    {"asr.label", "asr.bench"},
    {"asr.train"},
    {"asr.run_report", "asr.recipes"},
    {"asr.slurm", "asr.pipeline"},
    {"asr.cli"},
    {"asr.__main__"},
]


def unit_of(module: str) -> str:
    """The layered unit a module belongs to: its package under asr, or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(module: str) -> int:
    unit = unit_of(module)
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add its package to LAYERS")


def asr_imports(path: Path) -> list[str]:
    """Every asr module the file imports, lazily or not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asr"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("asr"))
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_never_reach_up_the_flow(path):
    here = module_name(path)
    upward = [m for m in asr_imports(path) if unit_of(m) != unit_of(here) and layer_of(m) >= layer_of(here)]
    assert not upward, f"{here} imports {upward}, which sit at or above its layer"


def test_training_reads_labelling_only_through_its_targets():
    """Training needs the pseudo-label folder's format, not the labelling stage (nor, through it, decoding)."""
    labelling = {m for path in (ROOT / "train").glob("*.py") for m in asr_imports(path) if m.startswith("asr.label")}
    assert labelling == {"asr.label.targets"}


def test_every_package_is_layered():
    units = {unit_of(module_name(p)) for p in SOURCES} - {"asr"}
    assert units == set().union(*LAYERS)


REPO = ROOT.parent
TEXT_FILES = [p for p in REPO.rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".toml", ".sh", ".sbatch"}
              and not {".git", ".venv", "runs"} & set(p.relative_to(REPO).parts) and "egg-info" not in str(p)
              and p != Path(__file__).resolve()]


def test_files_point_only_inside_the_repository():
    """A user has only the repository: no file sends them to notes beside it, or to a recipe that does not exist."""
    outside = [str(p.relative_to(REPO)) for p in TEXT_FILES if re.search(r"shared/reference|\.\./shared", p.read_text())]
    assert not outside
    named = {(str(p.relative_to(REPO)), m) for p in TEXT_FILES for m in re.findall(r"recipes/([\w.-]+\.yaml)", p.read_text())}
    missing = sorted((where, m) for where, m in named if not (REPO / "recipes" / m).is_file())
    assert not missing


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_architecture_names_every_package_and_module():
    section = _readme_section("Architecture")
    units = {unit_of(module_name(p)) for p in SOURCES} - {"asr", "asr.__main__", "asr.errors"}
    paths = {u: "asr/" + u.split(".")[1] + ("/" if (ROOT / u.split(".")[1]).is_dir() else ".py") for u in units}
    missing = sorted(p for p in paths.values() if f"`{p}" not in section)
    assert not missing, f"README's Architecture section does not place {missing}"
    named = set(re.findall(r"`asr/(\w+)/", section)) | set(re.findall(r"`asr/(\w+)\.py`", section))
    assert named <= {p.stem if p.is_file() else p.name for p in ROOT.iterdir()}, "README names a package that is gone"


def test_readme_recipe_costs_are_the_recipes_own():
    """One source of truth: `asr ls` and the README both show the recipe's `cost` key."""
    from asr.recipes import builtin_recipes
    from asr.config import load_recipe

    rows = dict(re.findall(r"^\| `([\w-]+)` \| .* \| ([^|]+) \|$", _readme_section("A short tour"), re.M))
    recipes = {name: load_recipe(path).cost for name, path in builtin_recipes().items()}
    assert {name: cost.strip() for name, cost in rows.items() if name in recipes} == recipes


def test_readme_names_only_tests_that_exist():
    """The reliability table points at the test behind each behaviour; a renamed test must not leave it dangling."""
    readme, tests = (REPO / "README.md").read_text(), REPO / "tests"
    defined = {m for p in tests.glob("test_*.py") for m in re.findall(r"^def (test_\w+)", p.read_text(), re.M)}
    named = set(re.findall(r"`(?:test_\w+::)?(test_\w+)`", readme)) | set(re.findall(r"::(test_\w+)`", readme))
    named -= {p.stem for p in tests.glob("test_*.py")}
    assert named and not named - defined, sorted(named - defined)
