"""The layer map, checked (the README's "Layers"; like vLLM's forbidden-imports check).

Every module of the source folders is parsed (ast, nothing imported) and each of its imports of ours must point
to a group its own group may import: top to bottom, composition -> trainer -> the services -> search -> clients
-> the bottom (the neutral base, the models base, the wire types, arith). Neither service imports the other,
and `assay.arith` imports nothing of ours. An import inside a function or under TYPE_CHECKING counts too: it
is a dependency all the same. A failure names the file, the line and the rule it breaks.

The map is data (GROUPS, MAY_IMPORT) so that it reads like the README's; a module belongs to the first group
that names it (a name covers the module and everything under it, `name$` the module alone; `*` matches any part).
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# Which modules make up each group, first match wins: the specific names come before the folders that hold them.
GROUPS: dict[str, tuple[str, ...]] = {
    # 1. composition: wires the pieces together, may import anything
    "composition": (
        "assay.cli",
        "assay.__main__",
        "assay.main_job",
        "assay.services",
        "assay.evaluate",
        "assay.eval_config",
        "assay.build",
        "assay.tiny_chat",
        "assay.cli_options",
        "assay.server_cli",
        "assay.version",
        "assay.trainer.offline_cli",
        "assay.data_cli",
        "assay.*.cli",
        "assay.trainer.online_cli",
        "assay.*.__main__",
        "assay.deploy",  # the Ray Serve application: wires the services into Ray
        "bench",
    ),
    # 6. the bottom: wire types, the neutral base, the models base, the embedded world
    "rm_server wire types": ("assay.rm_server.protocol", "assay.rm_server.grpc_convert"),
    # (policy_server's grpc_convert is the server's edge alone: no client speaks the policy's gRPC yet)
    "policy_server wire types": ("assay.policy_server.protocol",),
    "proto": ("assay.proto",),
    "base": ("assay.base",),
    "models base": ("assay.checkpoints", "assay.generation", "assay.scoring", "assay.chat", "assay.model_sizes"),
    "data": ("assay.data",),
    "arith": ("assay.arith",),
    "answers": ("assay.answers",),
    # 2.-5. the pieces
    "trainer": ("assay.trainer",),
    "rm_server": ("assay.rm_server",),
    "policy_server": ("assay.policy_server",),
    "search.local": ("assay.search.local",),
    "search.remote": ("assay.search.remote",),
    "search": ("assay.search",),
    "clients": ("assay.clients",),
    "assay": ("assay$",),  # the package itself: a docstring
}

WIRE = {"rm_server wire types", "policy_server wire types", "proto"}
EVERY_GROUP = set(GROUPS)

# What each group may import besides itself.
MAY_IMPORT: dict[str, set[str]] = {
    "composition": EVERY_GROUP,
    "trainer": {"clients", "models base", "data", "arith", "answers"} | WIRE,
    "rm_server": {"base", "models base", "data", "clients", "arith", "answers", "rm_server wire types", "proto"},
    "policy_server": {
        "base",
        "models base",
        "search",
        "search.local",
        "search.remote",
        "clients",
        "arith",
        "answers",
        "policy_server wire types",
        "proto",
        "data",
    },
    "search": {"answers"},
    "search.local": {"search", "models base"},
    "search.remote": {"search", "clients"},
    "clients": WIRE,
    "rm_server wire types": {"proto"},
    "policy_server wire types": {"proto", "answers"},  # /v1/search's `answer` is an assay.answers.Extract
    "proto": set(),
    "base": set(),
    "models base": {"arith", "data"},
    "data": set(),
    "arith": set(),
    "answers": set(),
    "assay": set(),
}


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file, relative to the repository root
    line: int
    target: str  # the module imported (for `from a import b`: `a.b` where that is a module, else `a`)


def package_dir() -> dict[str, str]:
    """pyproject.toml's package-dir: `assay.rm_server` -> `rm_server` (the one place the mapping is written)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def source_modules() -> dict[str, Path]:
    """Every module of the source folders by its import name (`assay.rm_server.serving`), and bench's scripts."""
    folders = {name: ROOT / folder for name, folder in package_dir().items()} | {"bench": ROOT / "bench"}
    modules = {}
    for name, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((name, *parts))] = path
    return modules


def names(module: str, name: str) -> bool:
    if name.endswith("$"):
        return module == name[:-1]
    return module == name or module.startswith(name + ".") or fnmatch.fnmatchcase(module, name)


def group_of(module: str) -> str | None:
    return next((group for group, covered in GROUPS.items() if any(names(module, n) for n in covered)), None)


def imports(path: Path, known: set[str]) -> list[Import]:
    """Every import in one file, relative ones as written (level dots kept), absolute ones resolved to modules."""
    found: dict[Import, None] = {}  # once each: `from a import b, c` is one import of `a`
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {Import(path, node.lineno, alias.name): None for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found[Import(path, node.lineno, sub if sub in known else base)] = None
    return list(found)


def crossings(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """Each import of ours that the map does not allow, as `file:line: rule`."""
    known = set(modules)
    problems = []
    for module, path in sorted(modules.items()):
        source = group_of(module)
        for imp in imports(path, known):
            where = f"{path.relative_to(root)}:{imp.line}"
            if imp.target.startswith("."):
                problems.append(f"{where}: relative import {imp.target!r}: imports of ours say `assay.`")
                continue
            if imp.target.split(".")[0] != "assay":
                continue  # not ours (old top-level names: test_no_import_uses_an_old_top_level_name)
            target = group_of(imp.target)
            if source is None or target is None or target == source or target in MAY_IMPORT[source]:
                continue  # modules on no group fail test_every_module_is_on_the_map
            allowed = ", ".join(sorted(MAY_IMPORT[source])) or "nothing of ours"
            problems.append(
                f"{where}: {module} ({source}) imports {imp.target} ({target}); {source} may import "
                f"only its own modules and: {allowed}"
            )
    return problems


def test_every_module_is_on_the_map() -> None:
    missing = [f"{path.relative_to(ROOT)} ({m})" for m, path in sorted(source_modules().items()) if group_of(m) is None]
    assert not missing, "modules on no layer: name them in tests/test_layers.py GROUPS:\n" + "\n".join(missing)


def test_imports_follow_the_layer_map() -> None:
    problems = crossings(source_modules())
    assert not problems, f"{len(problems)} imports cross the layer map:\n" + "\n".join(problems)


def test_no_import_uses_an_old_top_level_name() -> None:
    """Installed, Assay owns one import name: `import rm_server` would find nothing (or someone else's `proto`)."""
    old = {folder for name, folder in package_dir().items() if name != "assay"}  # rm_server, clients, proto, ...
    files = [*source_modules().values(), *ROOT.glob("tests/**/*.py"), *ROOT.glob("tools/*.py")]
    problems = [
        f"{imp.path.relative_to(ROOT)}:{imp.line}: imports {imp.target}; installed it is assay.{imp.target}"
        for path in sorted(set(files))
        for imp in imports(path, set())
        if imp.target.split(".")[0] in old
    ]
    assert not problems, "\n".join(problems)


def test_the_check_names_the_file_line_and_rule(tmp_path: Path) -> None:
    """The checker itself: crossings (search importing a service, arith the trainer) are found, allowed imports not."""
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "base.py").write_text("import assay.search.tracker\n\nfrom assay.rm_server import serving\n")
    (tmp_path / "search" / "remote.py").write_text("from assay.clients import RewardClient\n")
    (tmp_path / "rm_server").mkdir()
    (tmp_path / "rm_server" / "serving.py").write_text("")
    (tmp_path / "arith").mkdir()
    (tmp_path / "arith" / "world.py").write_text("def f():\n    from assay.trainer import sft\n")
    modules = {
        "assay.search.base": tmp_path / "search/base.py",
        "assay.search.remote": tmp_path / "search/remote.py",
        "assay.rm_server.serving": tmp_path / "rm_server/serving.py",
        "assay.arith.world": tmp_path / "arith/world.py",
    }
    assert crossings(modules, root=tmp_path) == [
        "arith/world.py:2: assay.arith.world (arith) imports assay.trainer (trainer); arith may import only its own "
        "modules and: nothing of ours",
        "search/base.py:3: assay.search.base (search) imports assay.rm_server.serving (rm_server); search may import "
        "only its own modules and: answers",
    ]
