"""The package's layers, as its imports show them: the core imports nothing of the others, the
kernel adapters nothing of operations or the lab (the config is data to them), and no module
imports one that imports it back."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mplb_nfq"
# what each layer may import at run time, besides itself
ALLOWED = {"core": set(), "kernel": {"core"}, "ops": {"core", "kernel"}, "lab": {"core", "kernel", "ops"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, typing: bool = False) -> set[str]:
    """The package's modules that `path` imports, at module level or inside functions, leaving out
    those under `if TYPE_CHECKING:` unless `typing`."""
    tree = ast.parse(path.read_text())
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING" and not typing:
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("mplb_nfq"):
                found.update(f"{target}.{a.name}" for a in node.names)  # a module, or a name in one
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mplb_nfq"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph(typing: bool = False) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m if m in modules else m.rsplit(".", 1)[0] for m in runtime_imports(path, typing)} - {name}
    return edges


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ALLOWED else None


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, targets in graph().items():
        own = layer(module)
        if own is None:
            continue
        for target in targets:
            other = layer(target)
            if target != "mplb_nfq" and other != own and other not in ALLOWED[own]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    cycles = []

    def walk(module, path):
        for target in edges.get(module, ()):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                walk(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in edges:
        if module not in done:
            walk(module, [module])
    assert not cycles, cycles


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    edges = graph()
    assert "mplb_nfq.core.packet" in edges["mplb_nfq.core.balancer"]  # from .packet import ...
    assert "mplb_nfq.service" in edges["mplb_nfq.cli"]  # imported inside cmd_run


def test_the_kernel_layer_imports_nothing_of_operations_not_even_for_typing():
    wrong = [f"{module} -> {target}" for module, targets in graph(typing=True).items() if layer(module) == "kernel"
             for target in targets if layer(target) in ("ops", "lab")]
    assert not wrong, wrong


def test_no_two_modules_share_a_file_name():
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert sorted(set(names)) == sorted(names), sorted({n for n in names if names.count(n) > 1})
