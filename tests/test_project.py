"""The project's set-up files agree with each other."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return {line.strip().lstrip("- ").strip() for line in lines if "==" in line and not line.strip().startswith("#")}


def test_conda_environment_pins_the_same_packages_as_requirements():
    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    requirements |= pins((ROOT / "requirements-trackers.txt").read_text().splitlines())
    conda = pins((ROOT / "environment.yml").read_text().splitlines())
    assert requirements == conda
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= requirements


# The layout: commands at the root (and models.py), the library in ditlib/, DiT's diffusion in
# diffusion/ and SiT's transport in transport/.
COMMANDS = {"train", "sample", "sample_ddp", "extract_features", "evaluate", "reproduce", "convert_diffusers",
            "download"}
CORE = {"models", "diffusion", "transport"}
PACKAGE = "ditlib"


def package_modules() -> list:
    return sorted(p.stem for p in (ROOT / PACKAGE).glob("*.py") if p.stem != "__init__")


def project_imports() -> dict:
    """{module: the project modules it imports anywhere in its file, function bodies included}."""
    files = {p.stem: [p] for p in ROOT.glob("*.py")} | {core: sorted((ROOT / core).glob("*.py"))
                                                         for core in ("diffusion", "transport")}
    files |= {f"{folder}.{p.stem}": [p] for folder in (PACKAGE, "demo", "experiments", "bench")
              for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, paths in files.items():
        found = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m if m in files else m.split(".")[0] for m in found
                       if m in files or m.split(".")[0] in ("diffusion", "transport")} - {name}
    return graph


def test_the_root_holds_the_commands_and_the_model():
    assert {p.stem for p in ROOT.glob("*.py")} == COMMANDS | {"models"}
    for command in COMMANDS:
        assert '__name__ == "__main__"' in (ROOT / f"{command}.py").read_text(), command


def test_imports_point_one_way_and_never_in_a_circle():
    graph = project_imports()
    for name, imported in graph.items():
        layers = {m.split(".")[0] if m.split(".")[0] in (PACKAGE, "demo", "experiments", "bench", "transport")
                  else m for m in imported}
        if name in CORE:
            assert layers <= CORE, f"{name} (the model or the diffusion) imports {layers - CORE}"
        elif name.startswith(PACKAGE + "."):
            assert layers <= CORE | {PACKAGE}, f"{name} (the library) imports {layers - CORE - {PACKAGE}}"
        elif name in COMMANDS:
            assert layers <= CORE | {PACKAGE}, f"the command {name} imports {layers - CORE - {PACKAGE}}"
        if name.startswith(("experiments.", "bench.")):
            assert "demo" not in layers, f"{name} imports the demo"
    visiting, done = set(), set()

    def visit(name, path):
        assert name not in visiting, f"import cycle: {' -> '.join(path + [name])}"
        if name in done:
            return
        visiting.add(name)
        for other in graph.get(name, ()):
            visit(other, path + [name])
        visiting.discard(name)
        done.add(name)

    for module in graph:
        visit(module, [])
    assert not any("sys.path" in p.read_text() for folder in ("demo", "experiments", "bench")
                   for p in (ROOT / folder).glob("*.py")), "run them with python -m instead"


def test_the_library_takes_values_not_flags():
    for name in package_modules():
        tree = ast.parse((ROOT / PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert "argparse" not in modules, f"{PACKAGE}/{name}.py imports argparse"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.args + node.args.kwonlyargs:
                    annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                    assert "Namespace" not in annotation and arg.arg != "args", \
                        f"{PACKAGE}/{name}.py: {node.name}() takes parsed flags ({arg.arg})"


def test_every_module_and_command_has_its_test_file():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    expected = {f"test_{name}" for name in [*package_modules(), *COMMANDS, *CORE]}
    assert expected <= tests, f"missing: {sorted(expected - tests)}"


def test_commands_read_beside_the_official_ones():
    for command in COMMANDS:
        lines = (ROOT / f"{command}.py").read_text().splitlines()
        long = [n for n, line in enumerate(lines, 1) if len(line) > 100]
        assert not long, f"{command}.py has lines over 100 columns: {long[:5]}"
    assert len((ROOT / "train.py").read_text().splitlines()) <= 450
