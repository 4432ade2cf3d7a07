"""The shape of the code, measured from it: the import rule of the README's Layout section (scripts
on top, modules below, no module imports a script, a script uses another script only to run that
script's own job), no import cycles, and the sizes that keep it readable: no file over 500 lines, no
function over 60, one optimizer step in at most 40 lines, the loop in at most 60, the README a front
door of at most 300 lines."""

import ast
import re

from conftest import ROOT

# The script -> script imports that run the other script's job (and borrow no helper). bench.py's
# benchmarks live in the benchmarks/ package, which is part of it.
ALLOWED = {("train", "prepare"), ("bench", "train"), ("bench", "prepare"), ("bench", "export")}
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_STEP_LINES, MAX_LOOP_LINES, MAX_README_LINES = 500, 60, 40, 60, 300


def layout() -> dict[str, str]:
    """{module name: "module" | "script"} from the README's layout table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- layout:start -->\n(.*?)<!-- layout:end -->", text, re.DOTALL).group(1)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.strip()]
    return {file.removesuffix(".py"): kind for file, kind, _ in rows}


def sources() -> dict[str, str]:
    """{name: path} of the project's code: the top-level files and the benchmarks package."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    files |= {f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")}
    return files


def imports(name: str) -> set[str]:
    """The project files that `name` imports, at the top or inside functions (a benchmarks module by its
    full name)."""
    tree = ast.parse(sources()[name].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "benchmarks":
                found |= {f"benchmarks.{a.name}" for a in node.names}
    known = set(sources())
    return {m if m in known else m.split(".")[0] for m in found} & (known | {"benchmarks"})


def owner(name: str) -> str:
    """The layout table's name for a file: a benchmarks module belongs to bench.py."""
    return "bench" if name.startswith("benchmarks") else name


def test_every_file_is_in_the_layout_table():
    kinds = layout()
    files = {p.stem for p in ROOT.glob("*.py")}
    assert files == set(kinds), f"in the README's layout table but not a file, or the other way round: " \
                                f"{sorted(files ^ set(kinds))}"
    assert set(kinds.values()) == {"module", "script"}


def test_modules_never_import_scripts_and_scripts_borrow_no_helpers():
    kinds = layout()
    wrong = []
    for name in sources():
        kind = kinds.get(owner(name), "script")
        for other in {owner(o) for o in imports(name)} - {owner(name)}:
            if kinds.get(other) == "script" and (kind == "module" or (owner(name), other) not in ALLOWED):
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


def cycles() -> list[list[str]]:
    """Import cycles among the project's files (imports inside functions count too)."""
    graph = {name: imports(name) - {name} for name in sources()}
    graph["benchmarks"] = graph.pop("benchmarks.__init__", set()) - {"benchmarks"}  # the package itself
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            found.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for other in sorted(graph.get(name, ())):
            visit(other, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return found


def test_no_import_cycles():
    assert cycles() == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles())


def test_the_cycle_check_can_fail(monkeypatch):
    real = imports
    monkeypatch.setitem(globals(), "imports", lambda name: real(name) | ({"monitor"} if name == "errors" else set()))
    assert any("errors" in c for c in cycles())


def functions(name: str) -> dict[str, int]:
    """{qualified name: lines} of every function and method of a file."""
    out = {}

    def walk(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[prefix + child.name] = child.end_lineno - child.lineno + 1
                walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")

    walk(ast.parse(sources()[name].read_text(encoding="utf-8")), "")
    return out


def test_sizes_keep_the_code_readable():
    too_long = [f"{name}.py: {n} lines" for name, path in sources().items()
                if (n := path.read_text(encoding="utf-8").count("\n")) > MAX_FILE_LINES]
    too_long += [f"{name}.py: {fn}() is {n} lines" for name in sources() for fn, n in functions(name).items()
                 if n > MAX_FUNCTION_LINES]
    assert not too_long, f"over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function:\n" + \
        "\n".join(too_long)
    train = functions("train")
    assert train["train_step"] <= MAX_STEP_LINES, "one optimizer step fits in a reader's head"
    assert train["train_loop"] <= MAX_LOOP_LINES
    assert (ROOT / "README.md").read_text(encoding="utf-8").count("\n") <= MAX_README_LINES
