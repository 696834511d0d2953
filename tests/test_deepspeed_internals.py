"""megachat.deepspeed_internals is the one door to DeepSpeed's internals: no other module under megachat/, scripts/
or tools/ imports deepspeed.runtime (or deepspeed.comm.torch) or names a private DeepSpeed attribute; every
internal it relies on exists in the installed DeepSpeed (a failure names the one that moved); setup.py pins
deepspeed to the range they were tested on, and the installed version is inside it."""
import ast
import importlib
import inspect
import re
from pathlib import Path

import deepspeed
import pytest
from packaging.specifiers import SpecifierSet

from megachat import deepspeed_internals as dsi

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("megachat", "scripts", "tools") for p in (ROOT / d).rglob("*.py")
                 if p != ROOT / "megachat" / "deepspeed_internals.py")
PRIVATE_MODULE = re.compile(r"deepspeed\.(runtime|comm\.torch)(\.[\w.]*)?")


def private_uses(path: Path) -> list[str]:
    """Where `path` imports a private DeepSpeed module or names a private DeepSpeed attribute."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                   [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [f"line {node.lineno}: imports {m}" for m in modules if m.startswith(dsi.PRIVATE_MODULES)]
        if isinstance(node, ast.Attribute) and node.attr in dsi.PRIVATE_NAMES:
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in dsi.PRIVATE_NAMES or PRIVATE_MODULE.fullmatch(node.value)):
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_no_other_module_reaches_into_deepspeed():
    assert len(SOURCES) > 40
    bad = {str(p.relative_to(ROOT)): uses for p in SOURCES if (uses := private_uses(p))}
    assert not bad, f"move these into megachat/deepspeed_internals.py: {bad}"


def test_the_check_sees_a_private_use(tmp_path):
    sneaky = tmp_path / "x.py"
    sneaky.write_text("from deepspeed.runtime.utils import partition_balanced\n"
                      "def f(o, p):\n    return o.single_partition_of_fp32_groups, getattr(p, 'ds_tensor')\n")
    assert len(private_uses(sneaky)) == 3


@pytest.mark.parametrize("where,name", dsi.INTERNALS, ids=[f"{w}.{n}" for w, n in dsi.INTERNALS])
def test_every_internal_exists_in_the_installed_deepspeed(where, name):
    module_name, _, cls_name = where.partition(":")
    module = importlib.import_module(module_name)
    owner = getattr(module, cls_name) if cls_name else module
    source = inspect.getsource(owner)
    present = hasattr(owner, name) or re.search(rf"\.{name}\b(\s*:[^=\n]+)?\s*=[^=]", source)
    assert present, (f"DeepSpeed {deepspeed.__version__}: {where} no longer has {name}, which "
                     f"megachat/deepspeed_internals.py relies on (tested with deepspeed{dsi.TESTED_VERSIONS}); "
                     f"find where it moved and update that module")


def test_setup_pins_deepspeed_to_the_tested_range():
    setup = (ROOT / "setup.py").read_text()
    assert f'"deepspeed{dsi.TESTED_VERSIONS}"' in setup
    assert deepspeed.__version__.split("+")[0] in SpecifierSet(dsi.TESTED_VERSIONS)


def test_an_unknown_optimizer_wrapper_is_refused_rather_than_given_a_wrong_gradient_norm():
    class NewWrapper:  # what a later DeepSpeed might wrap the client optimizer in
        optimizer = None
    with pytest.raises(RuntimeError, match="NewWrapper.*reduced_gradients cannot find"):
        dsi.reduced_gradients(NewWrapper())
