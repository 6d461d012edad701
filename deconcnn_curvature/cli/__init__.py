"""``deconcnn-curv``: a thin Click front end over :mod:`deconcnn_curvature`.

Each command parses options, calls one library function and prints (a rich table for people,
``--json`` for programs). Package errors become a one-line message on stderr and exit code 1;
usage errors are Click's (exit code 2).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import deconcnn_curvature as dcc
from deconcnn_curvature.errors import CurvatureError

__all__ = ["JsonErrorCommand", "cli", "json_error", "main", "print_json", "user_errors"]

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn package errors (user mistakes) into ``Error: <message>`` and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CurvatureError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _finite_only(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_only(v) for v in obj]
    return obj


_JSON_PRINTED = "deconcnn_curvature.json_printed"


def print_json(obj: Any) -> None:
    """Strict JSON on stdout. Results are validated (finite values and errors) before they get
    here; a non-finite number left in a backend's ``details`` (an infinite interval, a NaN
    residual) is written as ``null`` rather than crashing the command."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite_only(obj), indent=2, allow_nan=False)
    click.echo(text)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_JSON_PRINTED] = True  # an error after this is not printed as a second object


def json_error(exc: BaseException) -> dict[str, Any]:
    """The JSON a ``--json`` command prints on stdout when it fails: the error's type (the
    package's, e.g. ``InvalidOptionError``; ``UsageError`` for Click's own checks) and its
    one-line message."""
    cause = exc.__cause__ if isinstance(exc.__cause__, CurvatureError) else exc
    message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
    return {"error": {"type": type(cause).__name__, "message": message}}


class JsonErrorCommand(click.Command):
    """A command whose ``--json`` output stays machine-readable when it fails: the error, a
    usage error too, is printed on stdout as :func:`json_error`'s object, and on stderr and as
    the exit code as without ``--json``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        wants_json = "--json" in args
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if wants_json:
                print_json(json_error(exc))
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            # One JSON document on stdout: the results already printed (density's, with the
            # error after them on stderr) or the error.
            if ctx.params.get("as_json") and not ctx.meta.get(_JSON_PRINTED):
                print_json(json_error(exc))
            raise


def console() -> Console:
    return Console(soft_wrap=False, width=max(100, Console().width))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(dcc.__version__, "--version", "-V", prog_name="deconcnn-curv")
def cli() -> None:
    """Curvature of a network's loss: Hessian trace, top eigenvalues, spectral density."""


cli.command_class = JsonErrorCommand  # every command: with --json, errors are JSON too


@cli.command("list-backends")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@user_errors
def list_backends_cmd(as_json: bool) -> None:
    """List the registered curvature backends and whether each can run here."""
    from deconcnn_curvature.registry import default_backend_name, get_registry

    rows = dcc.list_backends()
    broken = [b.to_dict() for b in get_registry().broken]
    if as_json:
        print_json({"default": default_backend_name(), "backends": rows, "broken_plugins": broken})
        return
    table = Table(title="deconcnn-curvature backends")
    for col in ("name", "plugin", "quantities", "kind", "available"):
        table.add_column(col, overflow="fold")  # an install command is never cut short
    for r in rows:
        status = (
            "yes"
            if r["available"]
            else f"no: {r['reason']}" + (f" (install: {r['install']})" if r.get("install") else "")
        )
        table.add_row(
            r["name"] + (" (default)" if r["name"] == default_backend_name() else ""),
            r["plugin"],
            ", ".join(r["quantities"]),
            "exact" if r["exact"] else "stochastic",
            escape(status),
        )
    out = console()
    out.print(table)
    for r in rows:
        if not r["available"] and r.get("install"):
            out.print(f"to use {r['name']}: {r['install']}", soft_wrap=True, markup=False)
    for b in broken:
        out.print(f"[red]broken plugin[/red] {b['name']} ({b['where']}): {b['error']}")


def _load_subcommands() -> None:
    # Commands that live in their own modules register themselves on `cli` when imported.
    import importlib

    for mod in ("estimate", "compare", "density", "train", "report"):
        try:
            importlib.import_module(f"deconcnn_curvature.cli.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"deconcnn_curvature.cli.{mod}":
                raise


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _load_subcommands()
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="deconcnn-curv")


_load_subcommands()
