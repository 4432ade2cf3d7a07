"""The import rule of the README's Layout section: scripts on top, modules below, no module imports a
script, and a script uses another script only to run that script's own job."""

import ast
import re

from conftest import ROOT

# The script -> script imports that run the other script's job (and borrow no helper).
ALLOWED = {("train", "prepare"), ("bench", "train"), ("bench", "prepare")}


def layout() -> dict[str, str]:
    """{module name: "module" | "script"} from the README's layout table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- layout:start -->\n(.*?)<!-- layout:end -->", text, re.DOTALL).group(1)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.strip()]
    return {file.removesuffix(".py"): kind for file, kind, _ in rows}


def imports(name: str) -> set[str]:
    """The project files that `name`.py imports, at the top or inside functions."""
    tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_every_file_is_in_the_layout_table():
    kinds = layout()
    files = {p.stem for p in ROOT.glob("*.py")}
    assert files == set(kinds), f"in the README's layout table but not a file, or the other way round: " \
                                f"{sorted(files ^ set(kinds))}"
    assert set(kinds.values()) == {"module", "script"}


def test_modules_never_import_scripts_and_scripts_borrow_no_helpers():
    kinds = layout()
    wrong = []
    for name, kind in kinds.items():
        for other in imports(name) & set(kinds):
            if kinds[other] == "script" and (kind == "module" or (name, other) not in ALLOWED):
                wrong.append(f"{name}.py ({kind}) imports {other}.py (script)")
    assert not wrong, "\n".join(wrong)


def test_the_rule_would_catch_a_module_importing_a_script(monkeypatch):
    """The check itself can fail: a module that imports train.py is reported."""
    real = imports
    monkeypatch.setitem(globals(), "imports", lambda name: real(name) | ({"train"} if name == "data" else set()))
    try:
        test_modules_never_import_scripts_and_scripts_borrow_no_helpers()
    except AssertionError as e:
        assert "data.py (module) imports train.py (script)" in str(e)
    else:
        raise AssertionError("the import rule did not notice data.py importing train.py")
