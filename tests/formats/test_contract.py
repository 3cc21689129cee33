import inspect
import json
import subprocess
import sys
import types

from pipeline import formats
from pipeline.formats import contract

HEAVY = ("torch", "transformers", "llama_cpp", "modelopt", "llmcompressor")


def test_every_registered_format_imports_light_and_meets_the_contract():
    probe = f"""
import json, sys
from pipeline import formats
from pipeline.formats import contract
problems = {{name: contract.contract_problems(formats.module(name)) for name in formats.FORMATS}}
print(json.dumps({{"problems": problems, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    assert found["heavy"] == []
    assert found["problems"] == {name: [] for name in formats.FORMATS}


def test_each_format_says_who_it_is():
    for name in formats.FORMATS:
        info = formats.module(name).INFO
        assert info.name == name and info.distribution and info.library_name and info.tags


def test_the_check_names_what_a_module_lacks_or_defines_differently():
    gguf = formats.module("gguf")
    broken = types.ModuleType("broken")
    broken.__dict__.update({name: getattr(gguf, name) for name in dir(gguf) if not name.startswith("_")})
    del broken.tokenize
    broken.open_session = lambda build_dir, threads: None
    broken.INFO = None
    problems = contract.contract_problems(broken)
    assert "tokenize() is missing" in problems and "INFO is not a FormatInfo" in problems
    assert any(p.startswith("open_session('build_dir', 'threads') should take") for p in problems)


def documented_functions() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """What docs/adding-a-format.md tells a format author to write: the functions of its Python
    blocks with their parameters, and the optional hooks its bullets list."""
    import ast
    import re

    from tests.conftest import REPO

    text = (REPO / "docs" / "adding-a-format.md").read_text()
    functions = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.FunctionDef):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                functions[node.name] = tuple(argument.arg for argument in arguments)
    section = text.split("## 5. Optional hooks", 1)[1].split("\n## ", 1)[0]
    hooks = {name: tuple(p.strip() for p in params.split(",") if p.strip())
             for name, params in re.findall(r"^- `(\w+)\(([^)]*)\)", section, re.M)}
    return functions, hooks


def test_adding_a_format_promises_the_contracts_functions_and_signatures():
    functions, hooks = documented_functions()
    required = {name: contract.parameters(member) for name, member in vars(contract.Format).items()
                if inspect.isfunction(member) and not name.startswith("_")}
    assert functions == required
    assert hooks == contract.OPTIONAL_HOOKS
