"""Each default is declared once, in ``deconcnn_curvature.defaults``: every other place that shows
or applies one (Python signatures, the shipped YAML, the CLI's options, the checkpoint loader's
settings, docs/defaults.md) is checked against the table here; the demo preset's deliberate
differences are listed explicitly."""

from __future__ import annotations

import inspect

import click
import pytest
from click.testing import CliRunner
from config_helpers import BACKEND_FILES, CONFIGS, listed
from hydra.utils import instantiate
from omegaconf import OmegaConf

import deconcnn_curvature as dcc
from deconcnn_curvature.checkpoints import DEFAULT_SETTINGS
from deconcnn_curvature.cli import cli
from deconcnn_curvature.defaults import BACKEND_DECLARED, MONITOR, OFFLINE, declared, default
from deconcnn_curvature.defaults import markdown as table_markdown
from deconcnn_curvature.losses import LOSSES
from deconcnn_curvature.monitor import LOSS_NAMES, CurvatureMonitor
from deconcnn_curvature.training.run import compose_config

MONITOR_SIGNATURE = inspect.signature(CurvatureMonitor).parameters
ROOT = CONFIGS.parent


def test_the_monitor_signature_reads_the_table() -> None:
    for name in ("compute_every_n_steps", "rtol", "k", "data_groups", "seed", "eval_mode"):
        assert MONITOR_SIGNATURE[name].default == default(name, MONITOR), name
    # per backend: unset in the signature, the table's value for the backend once built
    assert MONITOR_SIGNATURE["num_hvps"].default is None
    assert MONITOR_SIGNATURE["hessian_batch_size"].default is None
    for backend in ("pyhessian", "hutchpp", "backpack"):
        monitor = CurvatureMonitor(backend=backend)
        budget = default("num_hvps", MONITOR, backend)
        assert monitor.num_hvps == (None if budget == BACKEND_DECLARED else budget), backend
        assert monitor.hessian_batch_size == default("hessian_batch_size", MONITOR, backend)
    assert (CurvatureMonitor().num_hvps, CurvatureMonitor().hessian_batch_size) == (50, 128)
    assert CurvatureMonitor(backend="hutchpp").check_config()["trace"]["num_hvps"] == 10


def test_the_api_signatures_read_the_table() -> None:
    for func in (dcc.estimate, dcc.compare, dcc.density):
        params = inspect.signature(func).parameters
        assert params["seed"].default == default("seed", OFFLINE), func.__name__
    for func in (dcc.estimate, dcc.density):
        params = inspect.signature(func).parameters
        assert params["eval_mode"].default == default("eval_mode", OFFLINE), func.__name__
    # the offline budget is the backend's declared one
    assert default("num_hvps", OFFLINE) == BACKEND_DECLARED
    assert declared("num_hvps") == {"pyhessian": 100, "hutchpp": 30}
    _, opts = dcc.resolve("trace", "hutchpp")
    assert opts["num_hvps"] == 30


def test_the_checkpoint_settings_and_the_cli_read_the_table() -> None:
    for name in ("batch_size", "num_batches", "seed"):
        assert DEFAULT_SETTINGS[name] == default(name, OFFLINE), name
    for command in ("estimate", "compare", "density"):
        params = {p.name: p for p in click.Context(cli).command.commands[command].params}
        for name in ("batch_size", "num_batches", "seed"):
            assert params[name].default == default(name, OFFLINE), (command, name)
        assert list(params["loss"].type.choices) == list(LOSSES)  # every loss the monitor takes
    assert LOSS_NAMES is LOSSES  # one loss table
    shape = ",".join(map(str, default("input_shape", OFFLINE)))
    help_text = "".join(CliRunner().invoke(cli, ["estimate", "--help"]).output.split())
    assert f"[default:{shape}]" in help_text


@pytest.mark.parametrize("name", BACKEND_FILES)
def test_the_yaml_files_leave_the_tables_settings_to_it(name: str) -> None:
    """No backend file restates a tabled setting; composed, each gives the table's value."""
    tabled = {"num_hvps", "hessian_batch_size", "compute_every_n_steps", "rtol", "k",
              "data_groups", "seed", "eval_mode"}  # fmt: skip
    assert not tabled & set(listed(name)), name
    monitor = instantiate(compose_config([f"curvature={name}"]).callbacks)
    assert monitor.hessian_batch_size == default("hessian_batch_size", MONITOR, name)
    budget = default("num_hvps", MONITOR, name)
    assert monitor.num_hvps == (None if budget == BACKEND_DECLARED else budget)
    assert monitor.compute_every_n_steps == default("compute_every_n_steps", MONITOR)
    base = OmegaConf.load(CONFIGS / "curvature" / "base.yaml")
    assert all(base[key] is None for key in tabled)  # null: the table's default


def test_the_demo_preset_differs_only_where_it_says() -> None:
    """The demo is small on purpose (about a minute on 2 CPU cores); these are all its
    curvature settings, each a deliberate difference from the table."""
    preset = OmegaConf.load(CONFIGS / "preset" / "demo.yaml")
    assert OmegaConf.to_container(preset.curvature) == {
        "enabled": True,
        "compute_every_n_steps": 8,  # its run is a few hundred steps
        "compute_at_step_zero": True,
        "num_hvps": 20,
        "hessian_batch_size": 64,
    }
    assert default("compute_every_n_steps", MONITOR) != 8


def test_the_docs_page_is_the_table() -> None:
    page = (ROOT / "docs" / "defaults.md").read_text()
    assert table_markdown() in page
