"""The package's shape: the hub server and `import adapterkit` stay torch-free, no private name crosses
a module, process-wide settings are the CLI's alone (the layer contract itself runs in .ci/run)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import source_lines

SRC = Path(__file__).parents[1] / "src" / "adapterkit"


@pytest.mark.parametrize("module", ["adapterkit", "adapterkit.hub.server", "adapterkit.hub"])
def test_imports_without_the_model_stack(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_parses_without_the_model_stack():
    code = (
        "import sys; from adapterkit.apps import cli; cli.parser().parse_args(['train', '--task', 'chat']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # every command used to pay ~6 s of torch import before doing anything


def test_the_cli_knows_every_training_task():
    from adapterkit.runs import TASK_NAMES
    from adapterkit.training.tasks import TASKS

    assert set(TASK_NAMES) == set(TASKS)


def test_the_public_api_loads_on_first_use():
    import adapterkit as ak

    assert callable(ak.add_adapter) and callable(ak.load_adapter) and "combine_adapters" in dir(ak)
    with pytest.raises(AttributeError, match="no attribute 'merge_adapters'"):
        ak.merge_adapters  # noqa: B018 (renamed: combine_adapters)


def private_uses(path: Path) -> list[str]:
    """``module._name`` of an imported adapterkit module, or ``from adapterkit... import _name``."""
    tree = ast.parse(path.read_text())
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapterkit"):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("_")]
            aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name.startswith("adapterkit")}
    for node in ast.walk(tree):
        named = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        if named and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    uses = {str(p.relative_to(SRC)): private_uses(p) for p in SRC.rglob("*.py")}
    assert {k: v for k, v in uses.items() if v} == {}


def test_process_wide_settings_only_in_the_cli():
    pattern = r"set_verbosity|os\.environ\[|os\.environ\.setdefault|torch\.set_num_threads"
    assert source_lines(pattern, lambda p: "apps" in p.parts) == []  # apps/ and apps/cli/
