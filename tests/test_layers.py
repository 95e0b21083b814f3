"""Imports between veil's layers go one way only: down the stack of docs/ARCHITECTURE.md.

Every module under ``veil/`` is parsed with ``ast`` (no import runs, so lazy imports
inside functions count as much as top-level ones) and every ``import veil...`` /
``from ..x import y`` it contains is resolved to the layer it names. A module may import
its own unit, or a unit of a lower layer; never a unit of its own layer or above. Dynamic
imports count when the literal start of their name says where they go
(``import_module(f"veil.service.{mode}")``); the others load a package's own submodules
(``f"{__name__}.{...}"`` in ``deploy/__init__`` and ``service/__init__``, and the SDK's
mode clients, named in a table in ``sdk/client.py``).
"""
import ast
from pathlib import Path

import pytest

VEIL = Path(__file__).resolve().parents[1] / "veil"

# unit (the first name under veil/) -> layer; a higher layer may import a lower one
LAYERS = {
    "errors": 0, "_version": 0,                # nothing of ours
    "_files": 1, "_proc": 1, "wire": 1,        # helpers on top of errors only
    "modes": 1,
    "ir": 2,                                   # the graph, its op registry, interpreter
    "frontend": 3, "compiler": 3,              # PyTorch/ONNX -> ir; ir -> lowered ir
    "text": 3,                                 # MiniLM wrapper, client tokenizer, text data
    "backends": 4,                             # he | mpc | tee kernels and processes
    "deploy": 5,                               # roles, bundles, export folder, launchers
    "advice": 5,                               # which modes suit a compiled model, priced
    "model": 6, "finetune": 6,                 # the verbs: compile, run, export, finetune
    "search": 7,                               # encrypted search over an embedding index
    "service": 8,                              # the HTTP service over deploy
    "sdk": 9,                                  # its client (shares service's protocol)
    "commands": 10,                            # what the CLI's verbs do
    "compare": 11,                             # veil compare, on the public verbs
    "cli": 12, "__main__": 13,                 # the command line
}
# Imports allowed against the layering, each with its reason.
EXCEPTIONS = {
    # the package's facade: `import veil` offers the top-level verbs and, lazily, the
    # roles and the SDK; nothing below imports the facade by name (checked below)
    ("veil", "*"): "the public facade (veil/__init__.py) re-exports every layer's API",
}
# Sub-units of one layer that must not import each other.
SIBLINGS = {"backends": ("he", "mpc", "tee")}


def _module_name(path: Path) -> tuple[str, bool]:
    """``veil.deploy.local`` for ``veil/deploy/local.py``; whether it is a package."""
    parts = path.relative_to(VEIL.parent).with_suffix("").parts
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def imported(module: str, is_pkg: bool, source: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every veil import in ``source``."""
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names
                    if a.name == "veil" or a.name.startswith("veil.")]
        elif isinstance(node, ast.Call) and _callee(node) in ("import_module", "__import__") \
                and node.args:
            # import_module("veil.x...") or f"veil.x.{...}": the literal head names the unit
            arg = node.args[0]
            head = arg.value if isinstance(arg, ast.Constant) else (
                arg.values[0].value if isinstance(arg, ast.JoinedStr) and arg.values
                and isinstance(arg.values[0], ast.Constant) else "")
            if isinstance(head, str) and head.startswith("veil.") and head.count(".") >= 2:
                out.append((node.lineno, head.rstrip(".")))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - (node.level - 1)])
                source_module = f"{base}.{node.module}" if node.module else base
            elif node.module == "veil" or (node.module or "").startswith("veil."):
                source_module = node.module
            else:
                continue
            # from PKG import name: the submodule PKG.name when there is one, else PKG
            out += [(node.lineno, f"{source_module}.{a.name}"
                     if _is_module(f"{source_module}.{a.name}") else source_module)
                    for a in node.names]
    return out


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def _is_module(name: str) -> bool:
    path = VEIL.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "veil"


def violations(module: str, is_pkg: bool, source: str) -> list[str]:
    """What ``source`` (the text of ``module``) imports against the layering."""
    here = _unit(module)
    if (here, "*") in EXCEPTIONS:
        return []
    if here not in LAYERS:
        return [f"{module}: unit {here!r} has no layer in tests/test_layers.py: add it"]
    out = []
    for line, target in imported(module, is_pkg, source):
        there = _unit(target)
        where = f"{module}:{line} imports {target}"
        if there == "veil":
            out.append(f"{where}: the facade; import the module that defines the name")
        elif there == here:
            sub = SIBLINGS.get(here, ())
            a = module.split(".")[2] if len(module.split(".")) > 2 else ""
            b = target.split(".")[2] if len(target.split(".")) > 2 else ""
            if a in sub and b in sub and a != b and (here, f"{a}->{b}") not in EXCEPTIONS:
                out.append(f"{where}: {here}.{a} and {here}.{b} are siblings")
        elif (here, there) in EXCEPTIONS:
            continue
        elif there not in LAYERS:
            out.append(f"{where}: unit {there!r} has no layer")
        elif LAYERS[there] >= LAYERS[here]:
            out.append(f"{where}: {here} (layer {LAYERS[here]}) may import only layers "
                       f"below it, not {there} (layer {LAYERS[there]})")
    return out


def _modules():
    return sorted(VEIL.rglob("*.py"))


def test_every_import_goes_down_the_stack():
    found = []
    for path in _modules():
        module, is_pkg = _module_name(path)
        found += violations(module, is_pkg, path.read_text())
    assert not found, "\n".join(found)


def test_the_scan_sees_the_whole_package():
    modules = [_module_name(p)[0] for p in _modules()]
    assert len(modules) > 60
    assert {"veil.deploy.export", "veil.model", "veil.ir.ops", "veil.modes"} <= set(modules)
    # and it resolves relative imports: deploy/export.py imports the bundle and modes
    src = (VEIL / "deploy" / "export.py").read_text()
    targets = {t for _, t in imported("veil.deploy.export", False, src)}
    assert {"veil.deploy.bundle", "veil.modes", "veil.errors"} <= targets


@pytest.mark.parametrize("module,is_pkg,source,expect", [
    # the import this test was written against: deploy/export.py reaching up to the model
    ("veil.deploy.export", False, "def f():\n    from ..model import compile\n", "model"),
    ("veil.ir.fake", False, "from veil.compiler import passes\n", "compiler"),
    ("veil.ir", True, "from ..backends import sockets\n", "backends"),
    ("veil.frontend.fake", False, "import veil.deploy.client\n", "deploy"),
    ("veil.compiler.fake", False, "from ..frontend import to_graph\n", "frontend"),
    ("veil.backends.mpc.fake", False, "from ..tee import seal\n", "siblings"),
    ("veil.service.fake", False, "from .. import commands\n", "commands"),
    ("veil.deploy.fake", False, "from veil import compile\n", "facade"),
    ("veil.deploy.fake", False,
     "import importlib\nimportlib.import_module(f'veil.service.{m}')\n", "service"),
    ("veil.newthing", False, "import os\n", "no layer"),
])
def test_an_upward_import_is_reported(module, is_pkg, source, expect):
    found = violations(module, is_pkg, source)
    assert len(found) == 1 and expect in found[0], found


@pytest.mark.parametrize("module,source", [
    ("veil.deploy.fake", "from ..backends.mpc.service import save_model\n"),
    ("veil.model", "from .deploy.local import start\n"),
    ("veil.backends.mpc.fake", "from .. import sockets\nfrom . import tickets\n"),
    ("veil.cli", "from . import commands\n"),
])
def test_a_downward_import_passes(module, source):
    assert violations(module, False, source) == []
