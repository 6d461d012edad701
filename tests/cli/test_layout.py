"""Thin front ends. Each checkpoint command is its own module holding its
parsing and presentation calls; what they share is in ``cli.common``, how results look in
``deconcnn_curvature.present``."""

from __future__ import annotations

import ast
from pathlib import Path

import deconcnn_curvature
from deconcnn_curvature.cli import cli

CLI = Path(deconcnn_curvature.__file__).parent / "cli"


def test_each_checkpoint_command_lives_in_its_own_module() -> None:
    commands = {"list-backends", "estimate", "compare", "density", "train", "report"}
    assert set(cli.commands) == commands
    for name in ("estimate", "compare", "density"):
        callback = cli.commands[name].callback
        assert callback is not None
        assert callback.__module__ == f"deconcnn_curvature.cli.{name}", name


def test_command_modules_print_nothing_of_their_own() -> None:
    """Tables are built in present.py: a command module builds no rich Table itself."""
    for name in ("estimate", "compare", "density", "report"):
        tree = ast.parse((CLI / f"{name}.py").read_text())
        calls = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        assert not calls & {"_table", "Table", "_compare_table"}, name
