"""The repository modules a module imports, transitively (what a DVC stage running it depends on)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pruneflow", "stages", "flows")


def module_file(name: str) -> Path | None:
    base = REPO / name.replace(".", "/")
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    return None


def direct_imports(path: Path, package: str) -> set[str]:
    """Repository modules named by every import statement of `path` (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and module_file(name) is not None:
                out.add(name)
    return out


def transitive_files(module: str) -> set[Path]:
    """Files of `module` and of every repository module it imports, transitively (packages' __init__ too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts)) if module_file(".".join(parts[:k]))]
        path = module_file(name)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        todo += sorted(direct_imports(path, package) - seen)
    return {module_file(n).relative_to(REPO) for n in seen}


if __name__ == "__main__":  # print each stage's code dependencies, for dvc.yaml
    import sys

    for stage in sys.argv[1:]:
        files = sorted(str(p) for p in transitive_files(f"stages.{stage}") if p.name != "__init__.py" or p.parent.name != "stages")
        print(stage, files)
