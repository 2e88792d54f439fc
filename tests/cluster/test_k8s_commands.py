"""cluster/k8s against the code: the modules the manifests' commands run exist, and every flag they
pass is one the step (or the router) defines, with a value it accepts. Read from the sources with
``ast``: nothing here starts a server or imports torch."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.k8s_manifests import ROOT, containers, module_and_flags, of_kind, replica_deployments


def commands() -> list[list[str]]:
    return [c["command"] for d in of_kind("Deployment").values() for c in containers(d)]


@pytest.mark.parametrize("command", commands(), ids=lambda c: c[2])
def test_each_command_runs_a_real_module(command: list[str]) -> None:
    module, _ = module_and_flags(command)
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"python -m {module}: no such module"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        assert any((Path(p) / "__main__.py").is_file() for p in spec.submodule_search_locations), module


def _module_file(dotted: str) -> Path:
    path = ROOT / Path(*dotted.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _literal(node: ast.expr, constants: dict[str, ast.expr]) -> Any:
    """A tuple of strings, with ``*NAME`` of a module-level tuple spliced in (``("auto", *SCHEMES)``)."""
    if isinstance(node, (ast.Tuple, ast.List)):
        out: list[Any] = []
        for e in node.elts:
            out.extend(_literal(e.value, constants) if isinstance(e, ast.Starred) else [_literal(e, constants)])
        return tuple(out)
    if isinstance(node, ast.Name):
        return _literal(constants[node.id], constants)
    return ast.literal_eval(node)


def _config_fields(module: str, cls: str) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """``cls``'s flag fields in ``module``: name -> (annotation, choices or None)."""
    tree = ast.parse(_module_file(module).read_text())
    constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name)}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.value, ast.Call) \
                        and getattr(item.value.func, "id", None) == "flag_field":
                    choices = next((_literal(k.value, constants) for k in item.value.keywords
                                    if k.arg == "choices"), None)
                    fields[item.target.id] = (ast.unparse(item.annotation), choices)
            return fields
    # re-exported: follow the module's own import of the name
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == cls for a in node.names):
            return _config_fields(node.module, cls)
    raise AssertionError(f"{cls} not found in {module}")


def step_flags(step: str) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """Every ``--flag`` of ``python -m <step>``: ModelConfig's and ServerConfig's (shared/config.py,
    always added by build_parser) and those of the config classes its __main__ passes to run_step."""
    main = ROOT / step / "__main__.py"
    assert main.is_file(), f"python -m {step}: no {step}/__main__.py"
    tree = ast.parse(main.read_text())
    imports = {a.asname or a.name: n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_step"]
    assert len(calls) == 1, f"{step}/__main__.py: run_step called {len(calls)} times"
    classes = [("shared.config", "ModelConfig"), ("shared.config", "ServerConfig")]
    classes += [(imports[a.id], a.id) for a in calls[0].args[3:] if isinstance(a, ast.Name)]
    assert len(classes) > 2, f"{step}: no config classes passed to run_step"
    flags = {}
    for module, cls in classes:
        flags.update({"--" + name.replace("_", "-"): info for name, info in _config_fields(module, cls).items()})
    return flags


def test_step_commands_pass_only_flags_the_step_defines_with_valid_values() -> None:
    checked = 0
    for name, deployment in replica_deployments().items():
        module, flags = module_and_flags(containers(deployment)[0]["command"])
        known = step_flags(module)
        for flag, value in flags:
            assert flag in known, f"{name}: python -m {module} has no {flag}"
            kind, choices = known[flag]
            assert value is not None or kind == "bool", f"{name}: {flag} needs a value"
            if choices is not None:
                assert value in choices, f"{name}: {flag} {value} not in {choices}"
            if kind in ("int", "float"):
                {"int": int, "float": float}[kind](value)  # raises if it would not parse
            checked += 1
    assert checked >= 10


def test_flag_reader_rejects_a_flag_the_step_lacks() -> None:
    """The check above can fail: step 07 has no --quantization (step 08 adds it), int4 is a step 08 scheme."""
    assert "--quantization" not in step_flags("step07_paged_kv")
    assert "int4" in step_flags("step08_quant")["--quantization"][1]
    assert "bogus" not in step_flags("step08_quant")["--quantization"][1]
    assert step_flags("step07_paged_kv")["--threads"][0] == "int"
