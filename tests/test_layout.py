"""The shape of the package: imports that point one way, no cycle, a short top level, and an
install that puts no generic top-level module into site-packages yet keeps `ms-rm parity`."""

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ms_rm"

# What each part of ms_rm may import (besides itself and ms_rm.version):
# cli -> scoring / generators -> rewards -> backbones / encoders -> vae -> core / io.
MAY_IMPORT = {
    "core": set(),
    "io": {"core"},
    "vae": {"core", "io"},
    "backbones": {"core", "io"},
    "encoders": {"vae", "core", "io"},
    "rewards": {"backbones", "core", "io"},
    "scoring": {"rewards", "encoders", "backbones", "core", "io"},
    "generators": {"encoders", "backbones", "core", "io"},
    "search": {"core"},
    "flows": {"core", "io"},
    "training": {"evaluation", "scoring", "generators", "rewards", "core", "io"},   # validation: the eval code
    "integrations": {"scoring", "encoders", "rewards", "core", "io"},
    "evaluation": {"scoring", "rewards", "core", "io"},
    "cli": {"evaluation", "training", "scoring", "generators", "search", "flows", "rewards", "encoders", "vae",
            "backbones", "core", "io"},
}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT):
    """Every ms_rm module that `path` imports, at module level or inside functions."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield from (f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_imports_point_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:                                   # ms_rm/__init__.py, ms_rm/version.py
            continue
        here = parts[0]
        for target in _imports(path):
            bits = target.split(".")
            if bits[0] != "ms_rm" or len(bits) < 2 or bits[1] in (here, "version"):
                continue
            if bits[1] not in MAY_IMPORT[here]:
                wrong.append(f"{_module_name(path)} imports {target}")
    assert not wrong, wrong


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (anywhere in the file, functions included).

    `from x import name` counts as an import of x.name when that is a module, else of x; a name
    outside the package is dropped, and so is a module's import of itself."""
    root = package.parent
    modules = {_module_name(p, root): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(path, root):
            if target not in modules:                     # `from x import name`, name not a module: x
                target = target.rsplit(".", 1)[0] if "." in target else target
            if target in modules and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def import_cycles(package: Path) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph = import_graph(package)
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]      # an explicit stack: no recursion limit
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_cycle_among_modules():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The check above can fail: a fake package where a imports b (inside a function, by a
    relative `from`) and b imports a, beside a module c that imports a without closing a cycle."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (fake / "b.py").write_text("import fake.a\n\ndef g():\n    return fake.a\n")
    (fake / "c.py").write_text("from fake import a\nfrom fake.c import nothing\n")
    assert import_graph(fake)["fake.c"] == {"fake.a"}
    assert import_cycles(fake) == [["fake.a", "fake.b"]]


def _module_level_imports(tree: ast.Module):
    """The imports that run when a module is imported: not those inside a function."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def test_ms_rm_imports_ms_rm_parity_only_inside_functions():
    """ms_rm_parity imports torch; `import ms_rm` must not, so no module of ms_rm imports it at
    module level (ms_rm/cli/parity.py does, inside the functions that run its commands)."""
    at_module_level, inside = [], []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in _module_level_imports(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] == "ms_rm_parity" for n in names):
                (at_module_level if id(node) in top else inside).append(f"{_module_name(path)}:{node.lineno}")
    assert not at_module_level, at_module_level
    assert inside, "ms_rm/cli/parity.py no longer imports ms_rm_parity: update this test"


def test_top_level_is_short_and_every_package_is_installed():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 8, modules
    found = sorted(_module_name(p.parent) for p in PACKAGE.rglob("__init__.py"))
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    listed = setup["options"]["packages"].split()
    assert sorted(p for p in listed if p.startswith("ms_rm.") or p == "ms_rm") == found
    assert "ms_rm_parity" in listed and "ms_rm_parity = parity" in setup["options"]["package_dir"]


def test_importing_ms_rm_never_imports_torch():
    script = "import sys, ms_rm, ms_rm.cli; print(sorted(m for m in ('torch', 'diffusers', 'peft', 'mindone') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip install` would build, from a copy of the sources (no build/ left in the checkout)."""
    source, folder = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("ms_rm", "parity"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
                    str(source)], check=True, capture_output=True)
    (path,) = folder.glob("*.whl")
    return path


def test_the_install_adds_no_generic_top_level_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"ms_rm", "ms_rm_parity"}
    expected = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")} | \
        {"ms_rm_parity/" + p.name for p in (ROOT / "parity").glob("*.py")}
    assert expected <= set(names)
    assert "ms-rm = ms_rm.cli:main" in entry_points


def test_ms_rm_parity_runs_from_an_installed_copy(wheel, tmp_path):
    """The wheel unpacked outside the checkout (its dependencies from this environment): the
    command line finds the reference side as ms_rm_parity."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    script = ("import ms_rm, ms_rm_parity; from ms_rm.cli import main; print(ms_rm.__file__); "
              "print(ms_rm_parity.__file__); main(['parity', '--list'])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(tmp_path / "site")) and lines[1].startswith(str(tmp_path / "site"))
    assert "tiny-sd35" in out.stdout


def test_an_extra_that_is_installed_but_broken_fails_instead_of_skipping(monkeypatch):
    """The prompt tests import mindone through helpers.import_extra: pytest.importorskip would
    skip them silently when a dependency of the installed extra is missing."""
    from helpers import import_extra

    monkeypatch.setitem(sys.modules, "mindone.transformers", None)       # installed, but the import fails
    with pytest.raises(ImportError):
        import_extra("mindone.transformers", "mindone", "images")
    monkeypatch.setenv("CI", "true")                                      # CI installs every extra: never skip
    with pytest.raises(pytest.fail.Exception, match="CI installs every extra"):
        import_extra("ms_rm_no_such_module", "ms-rm-no-such-distribution", "images")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="pip install 'ms-rm\\[images\\]'"):
        import_extra("ms_rm_no_such_module", "ms-rm-no-such-distribution", "images")


def test_ci_runs_every_line_of_the_readme_blocks(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"""# x
<!-- ci:install -->
```bash
touch {tmp_path}/first
touch {tmp_path}/second
```
<!-- ci:test -->
```bash
echo tested > {tmp_path}/third
false
touch {tmp_path}/never
```
""")
    result = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=dict(os.environ, MS_RM_README=str(readme)),
                            capture_output=True, text=True)
    assert (tmp_path / "first").exists() and (tmp_path / "second").exists() and (tmp_path / "third").exists()
    assert result.returncode != 0 and not (tmp_path / "never").exists()       # a failing line fails CI


# --- the README and docs/: a short README, set-up in two commands, guides whose links resolve ---

DOCS = ROOT / "docs"


def readme_block(text: str, name: str) -> list[str]:
    """The lines of the fenced block after `<!-- ci:NAME -->`, as .ci/run's awk extracts them."""
    lines, found, inside = [], False, False
    for line in text.splitlines():
        if line == f"<!-- ci:{name} -->":
            found = True
        elif found and line.startswith("```"):
            if inside:
                break
            inside = True
        elif found and inside:
            lines.append(line)
    return lines


def test_readme_block_extraction_matches_ci_run(tmp_path):
    """readme_block above reads what .ci/run runs: the CI script, with `bash -c` stubbed to print."""
    text = (ROOT / "README.md").read_text()
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "bash").write_text('#!/bin/sh\nprintf "%s\\n" "$2" >> "$BLOCKS_OUT"\n')
    (stub / "bash").chmod(0o755)
    script = (ROOT / ".ci" / "run").read_text().replace('bash -c "', f'"{stub}/bash" -c "')
    (tmp_path / "run").write_text(script)
    out = tmp_path / "blocks"
    subprocess.run(["bash", str(tmp_path / "run")], check=True, capture_output=True, cwd=ROOT,
                   env=dict(os.environ, MS_RM_README=str(ROOT / "README.md"), BLOCKS_OUT=str(out)))
    ran = out.read_text()
    for name in ("install", "test"):
        assert "\n".join(readme_block(text, name)) in ran


def test_set_up_is_one_install_line_and_the_demo():
    """A newcomer copies two commands; the test-only reference packages come with the test command."""
    text = (ROOT / "README.md").read_text()
    install, tests = readme_block(text, "install"), readme_block(text, "test")
    assert len(install) == 2 and install[0].startswith("pip install ") and install[1] == "ms-rm demo", install
    assert tests[0] == "tools/fetch-test-deps" and tests[-1].startswith("python -m pytest"), tests
    assert ".deps" not in "\n".join(install)


def _constant(path: Path, name: str) -> str:
    """A module-level string constant of `path`, read without importing it (ms_rm_parity imports torch)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no {name}")


def test_fetch_test_deps_runs_the_commands_the_parity_errors_name():
    """The ImageReward and CLIP reference sides tell a user without .deps which command to run:
    tools/fetch-test-deps runs exactly those."""
    script = (ROOT / "tools" / "fetch-test-deps").read_text().splitlines()
    assert _constant(ROOT / "parity" / "imagereward_reference.py", "INSTALL") in script
    assert _constant(ROOT / "parity" / "clip_parity.py", "OPEN_CLIP_DOWNLOAD") in script
    assert _constant(ROOT / "parity" / "upstream_eval.py", "HPSV2_DOWNLOAD") in script
    assert _constant(ROOT / "parity" / "hpsv2_reference.py", "FTFY_INSTALL") in script
    assert os.access(ROOT / "tools" / "fetch-test-deps", os.X_OK)


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 300


def test_the_layout_guide_lists_every_package():
    """docs/layout.md's tree names every package of ms_rm (rewards' own packages included)."""
    guide = (DOCS / "layout.md").read_text()
    tree = guide.split("\n```\nms_rm/", 1)[1].split("\n```", 1)[0]
    named = set(re.findall(r"^\s+([a-z_0-9]+)/", tree, re.M))
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert packages <= named, f"docs/layout.md does not list {sorted(packages - named)}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def markdown_links(text: str):
    """(target, anchor) of every relative link, code blocks left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            yield path, anchor


def check_links(files: list[Path]) -> list[str]:
    broken = []
    for source in files:
        for path, anchor in markdown_links(source.read_text()):
            target = (source.parent / path).resolve() if path else source
            if not target.exists():
                broken.append(f"{source.name}: {path} does not exist")
            elif anchor and target.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", target.read_text(), flags=re.S), re.M)
                if anchor not in {github_anchor(h) for h in headings}:
                    broken.append(f"{source.name}: {path}#{anchor} names no heading")
    return broken


def test_every_link_in_the_readme_and_the_guides_resolves():
    files = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))
    assert len(files) > 10
    broken = check_links(files)
    assert not broken, broken


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# A title\n\n[ok](b.md#the-part) [gone](c.md) [bad](b.md#no-such)\n"
                                   "```\n[in code](d.md)\n```\n[self](#a-title)\n")
    (tmp_path / "b.md").write_text("# B\n\n## The part\n")
    assert check_links([tmp_path / "a.md"]) == ["a.md: c.md does not exist", "a.md: b.md#no-such names no heading"]


def test_the_fast_tier_covers_every_package_with_tests_that_exist_and_are_not_slow():
    """tests/fast_tier.py names every package of ms_rm (and ms_rm_parity); each entry is a test
    function of that file, not marked slow (conftest.py marks them `fast`)."""
    import ast

    from fast_tier import FAST_TIER

    packages = {_module_name(p.parent) for p in PACKAGE.rglob("__init__.py")} | {"ms_rm_parity"}
    assert set(FAST_TIER) == packages, (sorted(packages - set(FAST_TIER)), sorted(set(FAST_TIER) - packages))
    for package, tests in FAST_TIER.items():
        assert tests, package
        for test in tests:
            path, name = test.split("::")
            functions = {node.name: node for node in ast.parse((ROOT / path).read_text()).body
                         if isinstance(node, ast.FunctionDef)}
            assert name in functions, f"{package}: {test} names no test"
            slow = [d for d in functions[name].decorator_list if ast.unparse(d) == "pytest.mark.slow"]
            assert not slow, f"{package}: {test} is marked slow"
