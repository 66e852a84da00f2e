"""The trainer is built from parts: every attribute of a ``engram_cli/train`` class is set in its ``__init__``.

Parsed with ``ast``, not imported: for every class of the package, each ``self.X = ...`` (also
``self.X += ...``, ``self.X: T = ...``, tuple and chained targets) in a method other than
``__init__`` must assign an attribute that ``__init__`` also assigns. A dataclass's fields (the
annotated names of its body) are its generated ``__init__``'s, and ``__post_init__`` runs inside
that ``__init__``.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "engram_cli" / "train"
INIT_METHODS = ("__init__", "__post_init__")


def _self_targets(node: ast.AST, self_name: str) -> list[tuple[str, int]]:
    """(attribute, line) of every ``self.<attribute>`` assigned anywhere under ``node``."""
    found = []
    for n in ast.walk(node):
        if isinstance(n, ast.Assign):
            targets = n.targets
        elif isinstance(n, (ast.AugAssign, ast.AnnAssign)):
            targets = [n.target]
        else:
            continue
        stack = list(targets)
        while stack:
            t = stack.pop()
            if isinstance(t, (ast.Tuple, ast.List)):
                stack.extend(t.elts)
            elif isinstance(t, ast.Starred):
                stack.append(t.value)
            elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == self_name:
                found.append((t.attr, n.lineno))
    return found


def _instances_made(m: ast.FunctionDef) -> set[str]:
    """In a classmethod: the local names bound to ``cls(...)`` (an instance the factory fills in)."""
    cls_name = m.args.args[0].arg
    return {t.id for n in ast.walk(m) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
            and isinstance(n.value.func, ast.Name) and n.value.func.id == cls_name
            for t in n.targets if isinstance(t, ast.Name)}


def attributes_set_outside_init(source: str, where: str = "<source>") -> list[str]:
    """``where:line Class.attr`` for every attribute first assigned outside ``__init__`` (in a
    method, or in a classmethod on the instance it made with ``cls(...)``), in source order."""
    problems = []
    for cls in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)):
        methods = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_init = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        for m in methods:
            if m.name in INIT_METHODS and m.args.args:
                in_init |= {attr for attr, _ in _self_targets(m, m.args.args[0].arg)}
        for m in methods:
            decorators = {d.id for d in m.decorator_list if isinstance(d, ast.Name)}
            if m.name in INIT_METHODS or not m.args.args or "staticmethod" in decorators:
                continue
            names = _instances_made(m) if "classmethod" in decorators else {m.args.args[0].arg}
            late = sorted((line, attr) for name in names for attr, line in _self_targets(m, name) if attr not in in_init)
            problems += [f"{where}:{line} {cls.name}.{attr} (first set in {m.name})" for line, attr in late]
    return problems


def test_every_attribute_of_a_train_class_is_set_in_its_init():
    modules = sorted(TRAIN.glob("*.py"))
    assert len(modules) >= 10 and TRAIN / "trainer.py" in modules
    problems = [p for path in modules
                for p in attributes_set_outside_init(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())]
    assert problems == [], "set these in __init__ (or build the object whole in a factory):\n" + "\n".join(problems)


def test_the_check_finds_a_late_attribute():
    late = textwrap.dedent("""
        from dataclasses import dataclass

        class Late:
            def __init__(self, a):
                self.a = a
            def setup(self):
                self.a, (self.b, *self.c) = 1, (2, 3)
                self.d = self.e.f = 4
                self.a += 1
            @classmethod
            def build(cls):
                self = cls(1)
                self.g = 5   # a factory filling in what __init__ left out
                other = object()
                other.h = 6  # not an instance of the class

        @dataclass
        class Fields:
            x: int
            def __post_init__(self):
                self.y = 2
            def later(me):
                me.x, me.y, me.z = 1, 2, 3
        """)
    assert [p.split(" ", 1)[1] for p in attributes_set_outside_init(late)] == [
        "Late.b (first set in setup)", "Late.c (first set in setup)", "Late.d (first set in setup)",
        "Late.g (first set in build)", "Fields.z (first set in later)"]


def test_the_check_finds_the_trainer_that_was_set_up_in_steps():
    """The Trainer before its parts: 38 attributes first set in its setup steps, caught here."""
    before = textwrap.dedent("""
        class Trainer:
            def __init__(self, config):
                self.config = config
            @classmethod
            def setup(cls, config):
                self = cls(config)
                self._load_inputs()
                return self
            def _load_inputs(self):
                self.tables = tables = load_tables(self.config.tables)
                self.vocab, self.tok = tables.vocab, load_tokenizer()
        """)
    assert len(attributes_set_outside_init(before)) == 3
