"""`mt image build` and `mt image list`: Apptainer images from ModelTainer's recipes."""

from __future__ import annotations

import getpass
import os
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hpc import images as lib
from hpc.cli.context import CliContext
from hpc.cli.output import print_json, stderr, stdout

image_app = typer.Typer(
    help="Apptainer images: build them from recipes, list them and the models using them.",
    no_args_is_help=True,
)

RecipesOpt = Annotated[
    Path | None,
    typer.Option("--recipes", help="Directory of .def recipes (default: recipes/apptainer)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

_SUBUID = Path("/etc/subuid")


def _subuid_text() -> str | None:
    try:
        return _SUBUID.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


@image_app.command("build")
def build(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="Recipe name, e.g. vllm-cuda (see mt image list).")],
    sandbox: Annotated[
        bool, typer.Option("--sandbox", help="Build a writable directory instead of a .sif.")
    ] = False,
    fakeroot: Annotated[
        bool | None,
        typer.Option(
            "--fakeroot/--no-fakeroot",
            help="Force --fakeroot on or off (default: on when /etc/subuid maps you; "
            "never as root).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing image.")] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Image path (default: <slurm.image_dir>/<recipe>.sif)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the apptainer command; run nothing.")
    ] = False,
    recipes: RecipesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build an image with `apptainer build`, showing Apptainer's progress as it goes."""
    cli: CliContext = ctx.obj
    found = lib.find_recipe(recipes or lib.default_recipes_dir(), recipe)
    use_fakeroot = lib.fakeroot_needed(
        uid=os.getuid(), user=getpass.getuser(), subuid_text=_subuid_text(), force=fakeroot
    )
    plan = lib.plan_build(
        found, cli.site(), fakeroot=use_fakeroot, sandbox=sandbox, force=force, output=output
    )
    command = " ".join(
        [*(f"{k}={shlex.quote(v)}" for k, v in plan.env.items()), shlex.join(plan.argv)]
    )
    if dry_run:
        if as_json:
            print_json(plan.to_dict())
        else:
            stdout().print(escape(command), soft_wrap=True)
        return
    lib.find_apptainer()  # fail before announcing a build that cannot start
    err = stderr()
    err.print(f"building {escape(str(plan.target))} from {escape(str(found.path))}")
    err.print(f"$ {escape(command)}", soft_wrap=True)
    lib.run_build(plan, on_line=lambda line: err.print(escape(line), soft_wrap=True))
    if as_json:
        print_json({**plan.to_dict(), "built": True})
    else:
        stdout().print(f"built {escape(str(plan.target))}")


@image_app.command("list")
def list_(
    ctx: typer.Context,
    recipes: RecipesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The recipes, the site's images (slurm.image_dir) and which models use each."""
    cli: CliContext = ctx.obj
    site = cli.site()
    image_dir = site.config.slurm.image_dir
    recipes_dir = recipes or lib.default_recipes_dir()
    found = lib.list_recipes(recipes_dir)
    models = cli.models() if cli.models_path().is_file() else None
    rows = lib.list_images(found, image_dir, models)
    if as_json:
        print_json(
            {
                "image_dir": str(image_dir) if image_dir is not None else None,
                "recipes_dir": str(recipes_dir),
                "recipes": [
                    {
                        "name": r.name,
                        "path": str(r.path),
                        "base": r.base,
                        "engine": r.engine,
                        "accelerator": r.accelerator,
                    }
                    for r in found
                ],
                "images": [row.to_dict() for row in rows],
            }
        )
        return
    by_name = {r.name: r for r in found}
    table = Table(title=f"images in {image_dir}" if image_dir else "images (no slurm.image_dir)")
    for column in ("image", "recipe", "base", "built", "size", "models"):
        table.add_column(column)
    for row in rows:
        recipe = by_name.get(row.recipe or "")
        table.add_row(
            escape(row.path or row.name),
            escape(row.recipe or "-"),
            escape(recipe.base if recipe else "-"),
            "yes" if row.built else "no",
            f"{row.size_bytes / 2**30:.1f} GiB" if row.size_bytes else "-",
            escape(", ".join(row.models) or "-"),
        )
    stdout().print(table)
    if image_dir is None:
        stderr().print("set slurm.image_dir in site.yaml to see the site's built images")
