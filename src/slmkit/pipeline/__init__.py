"""Build pipeline: a recipe of ordered stages, run in a cached, resumable run directory.

>>> from slmkit.pipeline import load_recipe, build
>>> result = build(load_recipe("recipe.yaml"), "runs/mine")   # or packaged_recipe("default")
>>> result.report                                              # runs/mine/report.html

A stage kind is a frozen config dataclass plus a thin run function over its
area's library function, registered in :data:`STAGES`.
"""

from slmkit.pipeline.recipe import Recipe, RecipeError, StageSpec, load_recipe, packaged_recipe, packaged_recipes, parse_text
from slmkit.pipeline.stages import STAGES, Context, StageKind, StageResult, stage
from slmkit.pipeline.runner import BuildResult, build
from slmkit.pipeline.state import plan, stage_key
from slmkit.pipeline.report import collect, write_report

__all__ = [
    "STAGES",
    "BuildResult",
    "Context",
    "Recipe",
    "RecipeError",
    "StageKind",
    "StageResult",
    "StageSpec",
    "build",
    "collect",
    "load_recipe",
    "packaged_recipe",
    "packaged_recipes",
    "parse_text",
    "plan",
    "stage",
    "stage_key",
    "write_report",
]
