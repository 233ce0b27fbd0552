"""The project's import graph: every module imports on its own, and no two modules import each other (directly
or through others), counting imports inside functions too: a cycle hidden in a function is still a cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "pipeline", "launch")


def project_modules() -> dict[str, Path]:
    modules = {"plait": ROOT / "plait.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__main__":  # runs the CLI when imported
                continue
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, modules: dict[str, Path], type_checking: bool = False) -> set[str]:
    """Project modules `name` imports (module level or inside functions; under TYPE_CHECKING too when
    `type_checking`: an annotation-only import still ties the two modules together)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if _type_checking_only(node) and not type_checking:
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` imports a and a.b too; names are not modules
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import g\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\nimport a\n")
    mods = {m: tmp_path / f"{m}.py" for m in "abc"}
    graph = {m: imports_of(m, p, mods) for m, p in mods.items()}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_the_project_modules():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["data_prep.shards.writer"] >= {"data_prep.shards.layout", "data_prep.shards.manifest"}  # the parser sees imports
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_cycles_counting_type_checking_imports():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules, type_checking=True) for name, path in modules.items()}
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# Which package may import which (counting TYPE_CHECKING and function-level imports). The dataset format stands
# alone; the model library knows nothing of training, checkpoints, the app config, data, evaluation or the on-disk
# model forms; the training side reads the format and nothing else of prep (the demo, which runs both halves, is
# the one exception); prep reaches the training side only to score with a model (curate) and for the option
# system every command shares.
FORBIDDEN = {
    "data_prep.shards": ("data_prep", "pipeline", "launch", "plait"),
    "pipeline.models": ("pipeline.config", "pipeline.train", "pipeline.artifacts", "pipeline.eval", "pipeline.data",
                        "pipeline.demo", "data_prep"),
    "pipeline.losses": ("pipeline.config", "pipeline.train", "pipeline.artifacts", "pipeline.eval", "pipeline.data",
                        "pipeline.demo", "data_prep"),
    "pipeline.data": ("pipeline.train.loop", "pipeline.artifacts", "pipeline.eval", "pipeline.demo"),
    "pipeline.train": ("pipeline.artifacts.export", "pipeline.artifacts.hf", "pipeline.artifacts.model_card",
                       "pipeline.demo"),
}
# Outside the format, pipeline imports no data_prep module; outside curate, data_prep imports only the shared
# option system (pipeline/options.py, pipeline/flags.py).
ALLOWED_ACROSS = {
    "pipeline": ("data_prep.shards",),
    "data_prep": ("pipeline.options", "pipeline.flags"),
    "data_prep.curate": ("pipeline.options", "pipeline.flags", "pipeline.models", "pipeline.artifacts",
                         "pipeline.data.transforms"),
}
APP = ("plait", "pipeline.demo")  # the front doors: they may import either half
# Edges that break a rule above today, each to be removed (not added to).
KNOWN: set[tuple[str, str]] = set()


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_layering():
    modules = project_modules()
    broken = []
    for name, path in modules.items():
        for package, banned in FORBIDDEN.items():
            if name != package and not name.startswith(package + "."):
                continue
            for target in imports_of(name, path, modules, type_checking=True):
                if not _within(target, package) and any(_within(target, b) for b in banned) and (
                        (name, target) not in KNOWN):
                    broken.append(f"{name} -> {target}")
        if name in APP:
            continue
        half = name.split(".")[0]
        other = {"pipeline": "data_prep", "data_prep": "pipeline"}.get(half)
        if other is None:
            continue
        rules = max((p for p in ALLOWED_ACROSS if _within(name, p)), key=len)
        for target in imports_of(name, path, modules, type_checking=True):
            if _within(target, other) and not any(_within(target, a) for a in ALLOWED_ACROSS[rules]) and (
                    (name, target) not in KNOWN):
                broken.append(f"{name} -> {target}")
    assert not broken, "layering broken: " + ", ".join(sorted(broken))


def test_the_dataset_format_imports_no_torch():
    script = ("import sys\n"
              "import data_prep.shards.members, data_prep.shards.layout, data_prep.shards.tarwalk\n"
              "import data_prep.shards.tarseek\n"
              "print(' '.join(m for m in ('torch', 'webdataset', 'open_clip') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"the format package imported {proc.stdout.strip()}"


def test_every_module_imports_on_its_own():
    # One interpreter, the project's modules dropped from sys.modules before each import: a module that only
    # imports when another one happened to be imported first fails here.
    names = sorted(project_modules())
    script = (
        "import importlib, sys, traceback\n"
        f"names, prefixes = {names!r}, {('plait',) + PACKAGES!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in prefixes]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_prep_starts_without_torch():
    # `plait prep shard`, its worker processes and `prep filter` decode and copy images: importing torch there
    # (through the training config, webdataset, or the score command's parser) cost every prep run ~5 s of
    # start-up before the first row.
    script = ("import sys\n"
              "import data_prep.cli, data_prep.curate.filter, data_prep.job.pool, data_prep.job.run\n"
              "import data_prep.media.video, data_prep.job.worker, data_prep.maintenance.verify\n"
              "import data_prep.maintenance.index, data_prep.maintenance.merge, data_prep.maintenance.repair\n"
              "data_prep.cli.build_parser()\n"
              "print(' '.join(m for m in ('torch', 'open_clip', 'accelerate') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"prep imported {proc.stdout.strip()}"


def test_no_module_outside_the_dataset_format_opens_a_tar():
    # The format's own walk and seek (data_prep/shards) decide what a member and a sample are; a second reader
    # (tarfile, webdataset's tar stages or writers) would bring its own rules back.
    readers = {"tarfile", "webdataset.tariterators", "webdataset.writer"}
    attributes = {"WebDataset", "tarfile_samples", "tarfile_to_samples", "tar_file_expander", "TarWriter",
                  "ShardWriter"}
    found = []
    for name, path in project_modules().items():
        if name == "data_prep.shards" or name.startswith("data_prep.shards."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [f"{name}: import {a.name}" for a in node.names if a.name in readers]
            elif isinstance(node, ast.ImportFrom) and node.module in readers | {"webdataset"}:
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if node.module in readers or a.name in attributes]
            elif isinstance(node, ast.Attribute) and node.attr in attributes:
                found.append(f"{name}: .{node.attr}")
    assert not found, "tar readers outside data_prep/shards: " + "; ".join(found)
