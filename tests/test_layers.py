"""The package's layers, read from the source's imports (every import, at module level or inside a
function): a module imports only from its own layer or below.

    0  errors, _io, progress, _native, cpu     plumbing (cpu: what this CPU runs)
    1  arch, naming, rope, tokenizer, profiles  what a model family and a device are
    2  base, adapters                           the two values (base model, adapter)
    3  converters                               file formats: readers and writers, the registry
    4  models, store, quality, runtime          the cache, the adapter store, the engines
    5  bundle, train                            a device bundle; training against one
    6  cloud, cli, the package's face           services and front ends
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("errors", "_io", "progress", "_native", "native", "cpu"),
    ("arch", "naming", "rope", "tokenizer", "profiles"),
    ("base", "adapters"),
    ("converters",),
    ("models", "store", "quality", "runtime"),
    ("bundle", "train"),
    ("cloud", "cli", "quickstart", "__main__", "__init__", "devices", "data"),
]


def _modules() -> dict[str, Path]:
    """edgelora's module names -> files (converters/ and devices/ install as edgelora.converters/.devices)."""
    out = {}
    for top, package in ((ROOT / "edgelora", "edgelora"), (ROOT / "converters", "edgelora.converters"),
                         (ROOT / "devices", "edgelora.devices")):
        for f in top.rglob("*.py"):
            parts = list(f.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__" and len(parts) > 1:
                parts = parts[:-1]
            out[".".join([package, *parts]) if parts != ["__init__"] else package + ".__init__"] = f
    return out


def _layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else "__init__"
    for level, names in enumerate(LAYERS):
        if first in names:
            return level
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py LAYERS")


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported edgelora module, line) for every import in the file."""
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module.removesuffix(".__init__")
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("edgelora")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("edgelora"):
                continue
            if node.module is None or target in ("edgelora",):  # `from . import x`: x are modules
                out += [(f"{target}.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((target, node.lineno))
    return out


def test_every_import_goes_to_the_same_layer_or_below():
    modules = _modules()
    violations = []
    for module, path in modules.items():
        own = _layer(module)
        for target, line in _imports(module, path):
            if target == "edgelora" or target == "edgelora.__version__":
                continue
            if _layer(target) > own:
                violations.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[own][0]}.. layer {own}) imports {target} "
                                  f"(layer {_layer(target)})")
    assert not violations, "imports that run back up:\n" + "\n".join(violations)


def test_the_core_imports_no_format_engine_trainer_or_service():
    core = {"edgelora.errors", "edgelora.naming", "edgelora.arch", "edgelora.adapters", "edgelora.base"}
    banned = ("edgelora.converters", "edgelora.runtime", "edgelora.train", "edgelora.cloud")
    modules = _modules()
    for module in core:
        for target, line in _imports(module, modules[module]):
            assert not target.startswith(banned), f"{module}:{line} imports {target}"
    for module, path in modules.items():
        if module.startswith("edgelora.converters"):
            for target, line in _imports(module, path):
                assert not target.startswith(("edgelora.runtime", "edgelora.train", "edgelora.cloud")), \
                    f"{module}:{line} imports {target}"
