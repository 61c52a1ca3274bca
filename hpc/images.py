"""Apptainer images: the recipes in ``recipes/apptainer``, building them, and who uses them.

An image is named after its recipe: ``recipes/apptainer/<name>.def`` builds
``<slurm.image_dir>/<name>.sif`` (a directory ``<name>/`` with ``--sandbox``), and a model
runs it with ``runtime: {kind: apptainer, image: <image_dir>/<name>.sif}``.

``plan_build`` is a pure function from a recipe and the site to the ``apptainer build``
argv and environment; ``run_build`` runs it, streaming Apptainer's output line by line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hpc.errors import ImageError
from hpc.site import Site
from hpc.spec import ModelsFile

# Sections every recipe must have; %environment and %post are optional.
REQUIRED_SECTIONS = ("labels", "help", "runscript", "test")
IMAGE_SUFFIX = ".sif"
RECIPE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def default_recipes_dir() -> Path:
    """``recipes/apptainer`` of the source tree this package was installed from."""
    return Path(__file__).resolve().parent.parent / "recipes" / "apptainer"


@dataclass(frozen=True)
class DefFile:
    """An Apptainer definition file: its header keywords and its ``%sections``."""

    header: dict[str, str]
    sections: dict[str, str]

    @property
    def labels(self) -> dict[str, str]:
        """``%labels`` as a dict: one ``key value`` pair per line."""
        labels: dict[str, str] = {}
        for line in self.sections.get("labels", "").splitlines():
            key, _, value = line.strip().partition(" ")
            if key and not key.startswith("#"):
                labels[key] = value.strip()
        return labels


def parse_def(text: str) -> DefFile:
    """Split a definition file into its header (``Bootstrap:``, ``From:``) and sections."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = re.match(r"^%([A-Za-z]+)\b", line)
        if match:
            current = sections.setdefault(match.group(1).lower(), [])
            continue
        if current is not None:
            current.append(line)
            continue
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            key, sep, value = stripped.partition(":")
            if sep:
                header[key.strip()] = value.strip()
    return DefFile(header, {name: "\n".join(body).strip() for name, body in sections.items()})


@dataclass(frozen=True)
class Recipe:
    """One ``.def`` file: its name (the image's name), where it is, and what it holds."""

    name: str
    path: Path
    base: str
    engine: str | None
    accelerator: str | None
    labels: dict[str, str] = field(repr=False)


def load_recipe(path: Path) -> Recipe:
    """Read one recipe; ImageError if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    parsed = parse_def(text)
    labels = parsed.labels
    return Recipe(
        name=path.stem,
        path=path,
        base=parsed.header.get("From", ""),
        engine=labels.get("org.modeltainer.engine"),
        accelerator=labels.get("org.modeltainer.accelerator"),
        labels=labels,
    )


def list_recipes(recipes_dir: Path) -> list[Recipe]:
    """Every ``*.def`` in ``recipes_dir``, sorted by name (none if the directory is missing)."""
    if not recipes_dir.is_dir():
        return []
    return [load_recipe(p) for p in sorted(recipes_dir.glob("*.def"))]


def find_recipe(recipes_dir: Path, name: str) -> Recipe:
    """The recipe called ``name`` (a name, not a path); ImageError listing the known ones."""
    recipes = list_recipes(recipes_dir)
    for recipe in recipes:
        if recipe.name == name:
            return recipe
    known = ", ".join(r.name for r in recipes) or "none"
    raise ImageError(
        f"no recipe {name!r} in {recipes_dir}",
        hint=f"recipes: {known} (`mt image list` shows them)",
    )


def image_path(image_dir: Path, recipe_name: str, *, sandbox: bool = False) -> Path:
    """Where the image of ``recipe_name`` lives: ``<image_dir>/<name>.sif`` (or ``<name>/``)."""
    return image_dir / (recipe_name if sandbox else recipe_name + IMAGE_SUFFIX)


def image_name(image: str) -> str:
    """The recipe name an image path refers to: ``/x/vllm-cuda.sif`` -> ``vllm-cuda``."""
    base = Path(image.rstrip("/")).name
    return base[: -len(IMAGE_SUFFIX)] if base.endswith(IMAGE_SUFFIX) else base


# ---------------------------------------------------------------- fakeroot


def subuid_has(user: str, uid: int, subuid_text: str) -> bool:
    """Does ``/etc/subuid`` (its text) map subordinate ids for ``user`` (by name or uid)?"""
    for line in subuid_text.splitlines():
        owner = line.split(":", 1)[0].strip()
        if owner and owner in (user, str(uid)):
            return True
    return False


def fakeroot_needed(*, uid: int, user: str, subuid_text: str | None, force: bool | None) -> bool:
    """Whether to pass ``--fakeroot``: never for root; else ``force`` if given; else only if
    ``/etc/subuid`` maps the user, and ImageError with a hint when it does not."""
    if uid == 0:
        return False
    if force is not None:
        return force
    if subuid_text is not None and subuid_has(user, uid, subuid_text):
        return True
    raise ImageError(
        f"fakeroot is not set up for {user}: /etc/subuid has no entry for them, and "
        "building an image without root needs it",
        hint="ask your admin to run `apptainer config fakeroot --add "
        f"{user}`; or try `--fakeroot` (Apptainer 1.1+ falls back to a root-mapped user "
        "namespace when the node allows one); or build where you are root and copy the .sif",
    )


# ---------------------------------------------------------------- building


@dataclass(frozen=True)
class BuildPlan:
    """One ``apptainer build``: the command, what it adds to the environment, its output."""

    recipe: Recipe
    target: Path
    argv: list[str]
    env: dict[str, str]
    sandbox: bool

    def to_dict(self) -> dict[str, object]:
        """JSON-ready data."""
        return {
            "recipe": self.recipe.name,
            "definition": str(self.recipe.path),
            "target": str(self.target),
            "argv": self.argv,
            "env": self.env,
            "sandbox": self.sandbox,
        }


def plan_build(
    recipe: Recipe,
    site: Site,
    *,
    fakeroot: bool,
    sandbox: bool = False,
    force: bool = False,
    output: Path | None = None,
) -> BuildPlan:
    """The ``apptainer build`` argv (flags sorted) and environment for ``recipe`` on ``site``.

    The cache and temporary directories come from site.yaml (``slurm.apptainer_cachedir``,
    ``slurm.apptainer_tmpdir``): a vLLM image unpacks to tens of GB, more than a home
    directory quota or a node's /tmp holds, so sites point them at scratch.
    """
    slurm = site.config.slurm
    if output is not None:
        target = output
    elif slurm.image_dir is not None:
        target = image_path(slurm.image_dir, recipe.name, sandbox=sandbox)
    else:
        raise ImageError(
            "no image directory: site.yaml has no slurm.image_dir",
            hint="set slurm.image_dir in site.yaml (a directory the compute nodes see), "
            "or pass --output PATH",
        )
    flags = sorted(
        flag
        for flag, wanted in (("--fakeroot", fakeroot), ("--force", force), ("--sandbox", sandbox))
        if wanted
    )
    env = {}
    if slurm.apptainer_cachedir is not None:
        env["APPTAINER_CACHEDIR"] = str(slurm.apptainer_cachedir)
    if slurm.apptainer_tmpdir is not None:
        env["APPTAINER_TMPDIR"] = str(slurm.apptainer_tmpdir)
    argv = ["apptainer", "build", *flags, str(target), str(recipe.path)]
    return BuildPlan(recipe=recipe, target=target, argv=argv, env=env, sandbox=sandbox)


_APPTAINER_MISSING_HINT = (
    "load it (`module load apptainer`; list it in site.yaml slurm.modules) or ask your "
    "admin; building needs Apptainer on this machine (`mt doctor` checks it)"
)


def find_apptainer(environ: Mapping[str, str] | None = None) -> str:
    """The ``apptainer`` on ``environ``'s PATH (default os.environ); ImageError if none."""
    env = os.environ if environ is None else environ
    executable = shutil.which("apptainer", path=env.get("PATH", ""))
    if executable is None:
        raise ImageError(
            "apptainer is not installed here (not found on PATH)", hint=_APPTAINER_MISSING_HINT
        )
    return executable


def run_build(
    plan: BuildPlan,
    *,
    on_line: Callable[[str], None],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Run ``plan``, handing each line Apptainer prints to ``on_line`` as it comes.

    Creates the cache, temporary and output directories first (0700 for the first two).
    ImageError when Apptainer is not on PATH, the target exists (without ``--force``), or
    the build fails; a failure that mentions fakeroot or user namespaces says so.
    """
    env = dict(os.environ if environ is None else environ)
    executable = find_apptainer(env)
    if (plan.target.exists() or plan.target.is_symlink()) and "--force" not in plan.argv:
        raise ImageError(f"{plan.target} already exists", hint="pass --force to replace it")
    try:
        for name in ("APPTAINER_CACHEDIR", "APPTAINER_TMPDIR"):
            if name in plan.env:
                Path(plan.env[name]).mkdir(mode=0o700, parents=True, exist_ok=True)
        plan.target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(
            f"cannot create {exc.filename}: {exc.strerror or exc}",
            hint="check slurm.image_dir, slurm.apptainer_cachedir and slurm.apptainer_tmpdir "
            "in site.yaml",
        ) from exc
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        [executable, *plan.argv[1:]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in the order Apptainer wrote it
        text=True,
        errors="replace",
        env={**env, **plan.env},
    ) as proc:
        for raw in proc.stdout or ():  # always a pipe: stdout=PIPE above
            line = raw.rstrip("\n")
            tail.append(line)
            on_line(line)
        returncode = proc.wait()
    if returncode != 0:
        raise ImageError(
            f"apptainer build exited {returncode} for {plan.recipe.name}",
            hint=_failure_hint(tail),
        )


def _failure_hint(tail: Iterable[str]) -> str:
    text = "\n".join(tail).lower()
    if "fakeroot" in text or "user namespace" in text or "subuid" in text:
        return (
            "fakeroot is not allowed for you on this machine: ask your admin to run "
            "`apptainer config fakeroot --add $USER`, or build where you are root and copy "
            "the .sif"
        )
    if "no space left" in text:
        return (
            "out of disk space: point slurm.apptainer_cachedir and slurm.apptainer_tmpdir "
            "in site.yaml at scratch"
        )
    return "read Apptainer's output above; `mt image build --dry-run` prints the command to rerun"


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class ImageRow:
    """One image: its name, path, the recipe it comes from, whether it is built, its users."""

    name: str
    path: str | None
    recipe: str | None
    built: bool
    size_bytes: int | None
    models: list[str]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready data."""
        return {
            "name": self.name,
            "path": self.path,
            "recipe": self.recipe,
            "built": self.built,
            "size_bytes": self.size_bytes,
            "models": self.models,
        }


def _size(path: Path) -> int | None:
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return None
    return None


def list_images(
    recipes: list[Recipe], image_dir: Path | None, models: ModelsFile | None
) -> list[ImageRow]:
    """Each recipe's image, every other image in ``image_dir``, and every image a model
    names; with the models that use each (matched by path, else by recipe name)."""
    users: dict[str, list[str]] = {}  # image path as written in models.yaml -> models
    for spec in models.models if models is not None else ():
        if spec.runtime.kind == "apptainer" and spec.runtime.image:
            users.setdefault(spec.runtime.image, []).append(spec.name)

    rows: list[ImageRow] = []
    claimed: set[str] = set()

    def add(name: str, path: Path | None, recipe: str | None, *, by_recipe: bool) -> None:
        # A model uses this image if it names this path, or (for a recipe's own image)
        # any path to an image of that recipe: nodes may see image_dir under another name.
        mine = [
            image
            for image in users
            if (path is not None and Path(image) == path)
            or (by_recipe and image_name(image) == recipe)
        ]
        claimed.update(mine)
        built = path is not None and path.exists()
        rows.append(
            ImageRow(
                name=name,
                path=str(path) if path is not None else None,
                recipe=recipe,
                built=built,
                size_bytes=_size(path) if path is not None and built else None,
                models=sorted(model for image in mine for model in users[image]),
            )
        )

    known = {r.name for r in recipes}
    for recipe in recipes:
        path = image_path(image_dir, recipe.name) if image_dir is not None else None
        add(recipe.name, path, recipe.name, by_recipe=True)
    if image_dir is not None and image_dir.is_dir():
        for entry in sorted(image_dir.iterdir()):
            name = image_name(entry.name)
            if entry.suffix == IMAGE_SUFFIX and name not in known:
                add(name, entry, None, by_recipe=False)
            elif entry.is_dir() and name in known:
                add(name, entry, name, by_recipe=False)  # a sandbox built from a recipe
    for image in sorted(set(users) - claimed):
        add(image_name(image), Path(image), None, by_recipe=False)
    return rows
