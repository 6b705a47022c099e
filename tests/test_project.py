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


# The layers: scripts import helper modules, helper modules import the core, the core imports only itself.
CORE = {"models", "diffusion"}
SCRIPTS = {"train", "sample", "sample_ddp", "extract_features", "evaluate", "convert_diffusers"}


def project_imports() -> dict:
    """{module: the project modules it imports anywhere in its file, function bodies included}."""
    modules = {p.stem: p for p in ROOT.glob("*.py")} | {"diffusion": ROOT / "diffusion"}
    files = {name: [path] if path.suffix else sorted(path.glob("*.py")) for name, path in modules.items()}
    files |= {f"{folder}.{p.stem}": [p] for folder in ("demo", "experiments", "bench")
              for p in (ROOT / folder).glob("*.py")}
    graph = {}
    for name, paths in files.items():
        found = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module)
        graph[name] = {m for m in found if m in files or m.split(".")[0] in modules} - {name}
    return graph


def test_imports_point_one_way_and_never_in_a_circle():
    graph = project_imports()
    for name, imported in graph.items():
        top = {m.split(".")[0] for m in imported}
        if name in CORE:
            assert top <= CORE, f"{name} (core) imports {top - CORE}"
        elif "." not in name and name not in SCRIPTS:
            assert not top & SCRIPTS, f"helper module {name} imports the script(s) {top & SCRIPTS}"
        if name.startswith(("experiments.", "bench.")):
            assert not any(m.startswith("demo") for m in imported), f"{name} imports the demo"
    visiting, done = set(), set()

    def visit(name, path):
        assert name not in visiting, f"import cycle: {' -> '.join(path + [name])}"
        if name in done:
            return
        visiting.add(name)
        for other in graph.get(name, ()):
            visit(other if other in graph else other.split(".")[0], path + [name])
        visiting.discard(name)
        done.add(name)

    for module in graph:
        visit(module, [])
    assert not any("sys.path" in p.read_text() for folder in ("demo", "experiments", "bench")
                   for p in (ROOT / folder).glob("*.py")), "run them with python -m instead"
