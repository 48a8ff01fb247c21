"""``.pt2`` programs (``torch.export``) loaded without running code from the file.

``torch.export.load`` runs code from the archive in several places: it unpickles the sample inputs
(weights-only first, then fully when that fails), pickled weights and tensor constants (fully), opaque
constants (``pickle.loads``) and TorchScript objects; it evaluates the shape expressions with
``sympy.sympify`` (Python's ``eval``); ``ExportedProgram.module()`` ``exec``s the program's guard code;
AOTInductor parts are shared libraries it loads; and an archive it cannot load as such is read in the
old layout, whose pickles it unpickles fully when the weights-only load fails.

``load`` checks those parts first, in the file it then hands to ``torch.export.load`` (one open file):
every pickle must load with ``torch.load(..., weights_only=True)``, no object or compiled part, and every
shape expression and guard must be plain arithmetic on sizes and sympy numbers. What ``torch.export.save``
writes for a plain module (distill's adapted teachers included) passes, and loads as torch loads it.
"""
from __future__ import annotations

import ast
import io
import json
import re
import zipfile

import torch

from .files import UserError

# the archive's layout (torch._C._export.pt2_archive_constants, as torch.export.pt2_archive reads it)
MODELS = ("models/", ".json")                  # models/<name>.json: a program's graph
SAMPLE_INPUTS = "data/sample_inputs/{}.pt"
PAYLOADS = {"data/weights/": "data/weights/{}_weights_config.json",
            "data/constants/": "data/constants/{}_constants_config.json"}
OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")       # constants torch unpickles as Python objects
COMPILED = "data/aotinductor/"

# what a shape expression (sympy's srepr, evaluated by sympify) or a guard (Python, exec'd) may name
_SYMPY = ("Symbol Integer Float Rational Add Mul Pow Mod Max Min Abs floor ceiling Eq Ne Lt Le Gt Ge Equality "
          "Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan And Or Not true false BooleanTrue "
          "BooleanFalse oo zoo nan Infinity NegativeInfinity NaN One Zero NegativeOne Half int_oo Piecewise "
          "ExprCondPair FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv IntTrueDiv "
          "FloatTrueDiv LShift RShift IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt "
          "RoundDecimal ToFloat FloatPow PowByNatural Identity")
_GUARDS = "L math max min abs float int round inf cast_symbool_to_symint_guardless"
_NAMES = frozenset(f"{_SYMPY} {_GUARDS}".split())
_ATTRS = frozenset("size stride storage_offset dim numel floor ceil trunc sqrt isnan isinf inf pi".split())
_SYMBOL = re.compile(r"[a-z]+[0-9]+")               # s0, u3, s77: a size variable
_TEXT = re.compile(r"[\w .,()\[\]'+\-*/%<>=!&|~^]*", re.ASCII)   # no double quote, #, backslash, ;, :, braces, newline
_STRING = re.compile(r"[\w.+-]*", re.ASCII)
_NODES = (ast.Expression, ast.Call, ast.keyword, ast.Name, ast.Load, ast.Constant, ast.Attribute, ast.Subscript,
          ast.Tuple, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.operator, ast.unaryop,
          ast.boolop, ast.cmpop)


def load(path: str):
    """The ``ExportedProgram`` in ``path``; UserError (one line) when a part of it would run code on load."""
    with open(path, "rb") as f:
        problem = code_problem(f)
        if problem:
            raise UserError(f"refusing .pt2 teacher {path}: {problem}; loading it could run code from the file "
                            "(distill loads only plain tensors and shape arithmetic, as torch.export.save writes "
                            "them for a plain module)")
        f.seek(0)
        return torch.export.load(f)


def code_problem(f) -> str | None:
    """What in the archive ``f`` (a seekable binary file) ``torch.export.load`` would run as code, or None."""
    if _old_layout(f):
        return "it is in torch.export's old layout (a top-level 'version' file), whose parts torch unpickles fully"
    from torch.export.pt2_archive import PT2ArchiveReader
    f.seek(0)
    try:
        reader = PT2ArchiveReader(f)
    except Exception:                # not an archive: torch.export.load fails on it without unpickling
        return None
    names = reader.get_file_names()
    compiled = [n for n in names if n.startswith(COMPILED)]
    if compiled:
        return f"it holds compiled code ({compiled[0]})"
    for name in (n for n in names if n.startswith(MODELS[0])):     # each a program torch loads, named as torch does
        model = name[len(MODELS[0]):-len(MODELS[1])]
        problem = _pickles_problem(reader, names, model) or _program_problem(reader.read_bytes(name))
        if problem:
            return problem
    return None


def _old_layout(f) -> bool:
    """torch.export.load reads an archive it cannot load as a pt2 archive as the old layout (zipfile)."""
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as z:
            return "version" in z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _pickled(reader, names, model: str):
    """The parts of ``model`` torch unpickles; raises ValueError naming a part it unpickles as an object."""
    yield SAMPLE_INPUTS.format(model)
    for folder, config in PAYLOADS.items():
        if f"{folder}{model}.pt" in names:                  # an older archive's state dict / constants
            yield f"{folder}{model}.pt"
        elif config.format(model) in names:
            for entry in _entries(reader.read_bytes(config.format(model))):
                path = str(entry.get("path_name", ""))
                if folder == "data/constants/" and path.startswith(OBJECT_PREFIXES):
                    raise ValueError(f"its constant {folder}{path} is a pickled Python object")
                if entry.get("use_pickle", True):
                    yield folder + path


def _entries(config: bytes) -> list[dict]:
    """The entries of a payload config (``{"config": {name: {"path_name", "use_pickle", ...}}}``); none
    when it is not one (torch cannot read it either)."""
    try:
        entries = json.loads(config.decode())["config"].values()      # as torch reads it
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    return [e for e in entries if isinstance(e, dict)]


def _pickles_problem(reader, names, model: str) -> str | None:
    try:
        parts = [p for p in _pickled(reader, names, model) if p in names]
    except ValueError as e:
        return str(e)
    for part in parts:
        data = reader.read_bytes(part)
        if not data:                                        # torch reads an empty part as nothing
            continue
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            return f"{part} is a pickle that torch.load(weights_only=True) refuses"
    return None


def _program_problem(program: bytes) -> str | None:
    """A shape expression or guard of the program's JSON that is not plain arithmetic."""
    try:
        doc = json.loads(program.decode())                          # as torch reads it
    except ValueError:
        return None                                         # torch cannot read it either
    for key, text in _texts(doc):
        if not _plain(text):
            what = "guard code" if key == "guards_code" else "shape expression"
            return f"its {what} {str(text)[:80]!r} is not plain arithmetic"
    return None


def _texts(doc):
    """(key, text) of every ``expr_str`` (sympified on load) and ``guards_code`` entry (exec'd) in ``doc``."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "expr_str":
                yield key, value
            elif key == "guards_code" and value is not None:
                yield from ((key, g) for g in (value if isinstance(value, list) else [value]))
            else:
                yield from _texts(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _texts(value)


def _plain(text) -> bool:
    """True when ``text`` is arithmetic, comparisons and calls of sympy's and torch's shape functions on
    sizes, numbers and size variables: nothing evaluating it (sympify, exec) can reach other code."""
    if not isinstance(text, str) or not _TEXT.fullmatch(text):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    return all(_plain_node(node) for node in ast.walk(tree))


def _plain_node(node: ast.AST) -> bool:
    if not isinstance(node, _NODES):
        return False
    if isinstance(node, ast.Name):
        return node.id in _NAMES or bool(_SYMBOL.fullmatch(node.id))
    if isinstance(node, ast.Attribute):
        return node.attr in _ATTRS
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float, bool, type(None)) or (
            type(node.value) is str and bool(_STRING.fullmatch(node.value)))
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant)
    return True
