"""Built-in recipes: find, list, copy and validate them (the YAML files in the project's recipes/ folder)."""
from __future__ import annotations

import shutil
from pathlib import Path

from asr.config import Recipe, load_recipe
from asr.errors import AsrError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """Name -> path of every shipped recipe."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: an existing path, or the name of a built-in recipe."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipes = builtin_recipes()
    if name_or_path in recipes:
        return recipes[name_or_path]
    raise AsrError(f"{name_or_path}: no such recipe file or built-in recipe; built-in: {', '.join(recipes)} "
                   "(see `asr ls`)")


def describe(path: Path) -> str:
    """The recipe's one-line description and what a run costs."""
    recipe = load_recipe(path)
    return f"{recipe.description} ({recipe.cost})" if recipe.cost else recipe.description


def copy_recipe(name: str, dest: Path) -> Path:
    """Copy a built-in recipe to `dest` (a file or a directory) for editing; never overwrites."""
    source = recipe_path(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise AsrError(f"{target} already exists; choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def validate(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load and type-check a recipe with overrides; raises AsrError naming the bad key."""
    return load_recipe(recipe_path(name_or_path), overrides)
