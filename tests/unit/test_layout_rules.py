"""DESIGN.md's rules on where things live, checked over the source: `image/` has no cloud in
it (no `handlers`, no `google.cloud`), and environment variables are read only in
`handlers/settings.py` (CLI options take their defaults from the settings, not `envvar=`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _imported(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_image_imports_no_cloud_code():
    found = [(name, module) for name, tree in _modules("image") for module in _imported(tree)
             if module.split(".")[0] == "handlers" or module.startswith("google.cloud")]
    assert found == []


def _reads_environment(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            yield f"os.{node.attr}"
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(alias.name in ("environ", "getenv", "environb") for alias in node.names):
            yield "from os import"
        elif isinstance(node, ast.keyword) and node.arg in ("envvar", "auto_envvar_prefix"):
            yield f"click {node.arg}="


def test_only_the_settings_module_reads_the_environment():
    found = [(name, read) for package in ("handlers", "image") for name, tree in _modules(package)
             if name != "handlers/settings.py" for read in _reads_environment(tree)]
    assert found == []
    # The rule's check finds what it looks for.
    assert list(_reads_environment(ast.parse("import os\nos.environ.get('X')\n@click.option(envvar='Y')\ndef f(): pass")))
