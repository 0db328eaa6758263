"""Reliability battery, published code: the `.py` files a remote-code folder carries import only torch, transformers
and the standard library (plus single-dot imports of each other) and run nothing at import but definitions.
`expert_parallel.py`, which the model imports only when expert_parallel_size > 1, also imports deepspeed (in a
guarded import block) and safetensors.

tests/test_save_load.py::test_remote_code_folder_loads_in_a_fresh_process_without_hf_switch runs such a folder.
"""

import ast
import sys

import pytest
from conftest import tiny_model

from hf_switch import SwitchConfig, SwitchForConditionalGeneration

# huggingface_hub is a dependency of transformers, and transformers' own configuration files take `strict` from it.
ALLOWED_PACKAGES = {"torch", "transformers", "huggingface_hub"} | set(sys.stdlib_module_names)
ALSO_ALLOWED = {"expert_parallel.py": {"deepspeed", "safetensors"}}
DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@pytest.fixture(scope="module")
def remote_code_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote")
    model = tiny_model()
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForSeq2SeqLM")
    try:
        model.save_pretrained(folder)
    finally:
        SwitchConfig._auto_class = None
        SwitchForConditionalGeneration._auto_class = None
    files = {path.name: ast.parse(path.read_text(), filename=str(path)) for path in folder.glob("*.py")}
    assert {"configuration_switch.py", "modeling_switch.py", "routing.py", "cache.py"} <= set(files)
    return files


def _import_problems(tree: ast.Module, siblings: set[str], allowed: set[str] = ALLOWED_PACKAGES) -> list[str]:
    problems = []
    for node in ast.walk(tree):  # imports inside functions count too: they run when the function does
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.ImportFrom):
            if node.level != 1 or f"{node.module}.py" not in siblings:
                problems.append(f"line {node.lineno}: relative import {'.' * node.level}{node.module}")
            continue
        else:
            continue
        problems += [f"line {node.lineno}: import {name}" for name in modules if name.split(".")[0] not in allowed]
    return problems


def _is_constant(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def _top_level_problems(tree: ast.Module) -> list[str]:
    problems = []
    for index, node in enumerate(tree.body):
        is_docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_constant = isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value and _is_constant(node.value)
        is_guarded_import = isinstance(node, ast.Try) and all(isinstance(line, DEFINITIONS) for line in node.body)
        if not (is_docstring or is_constant or is_guarded_import or isinstance(node, DEFINITIONS)):
            problems.append(f"line {node.lineno}: {ast.unparse(node).splitlines()[0]}")
    return problems


def test_published_code_imports_only_torch_transformers_stdlib_and_its_own_files(remote_code_files):
    siblings = set(remote_code_files)
    problems = {
        name: _import_problems(tree, siblings, ALLOWED_PACKAGES | ALSO_ALLOWED.get(name, set()))
        for name, tree in remote_code_files.items()
    }
    assert not any(problems.values()), problems


def test_published_code_runs_nothing_at_import_but_definitions(remote_code_files):
    problems = {name: _top_level_problems(tree) for name, tree in remote_code_files.items()}
    assert not any(problems.values()), problems


def test_the_checks_catch_what_they_are_for():
    tree = ast.parse("import numpy\nfrom ..pkg import x\nfrom .missing import y\nprint('hi')\nSIZE = len('ab')\n")
    assert len(_import_problems(tree, {"cache.py"})) == 3
    assert len(_top_level_problems(tree)) == 2
