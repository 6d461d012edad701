"""`deconcnn-curv density CHECKPOINT`: SLQ density and top eigenvalues checked against a dense
Hessian, the smoothed curve, the plot file, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cases import dense_hessian
from checkpoint_helpers import (
    GENERIC_ARGS,
    helper_model,
    save_state_dict,
)
from click.testing import CliRunner, Result
from torch import nn

from deconcnn_curvature import Backend, CurvatureResult, Density, hookimpl
from deconcnn_curvature import registry as registry_module
from deconcnn_curvature.checkpoints.data import DataSpec, build_batches
from deconcnn_curvature.cli import cli
from deconcnn_curvature.registry import Registry


class DensityOnly(Backend):
    """A plugin backend with a fixed three-point density and no eigenvalues."""

    name = "density-only"
    quantities = frozenset({"density"})

    def compute(self, problem, quantity, *, seed, options) -> CurvatureResult:
        value = Density(
            nodes=(-1.0, 0.0, 2.0), weights=(0.25, 0.5, 0.25), dim=problem.dim, num_runs=1,
            lanczos_steps=3,
        )  # fmt: skip
        return CurvatureResult(
            backend=self.name, quantity=quantity, value=value, stderr=None, n_hvp=3, seconds=0.0,
            seed=seed, device=str(problem.device), exact=False, method="fixed", dim=problem.dim,
        )  # fmt: skip


class Plugin:
    @hookimpl
    def register_backends(self, register):
        register(DensityOnly)


@pytest.fixture
def workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared working folder (tests/conftest.py) with this file's test plugin registered."""
    registry_module.set_registry(Registry.build(extra_plugins=(Plugin(),)))
    return workdir


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200"})


def test_density_and_eigenvalues_match_the_dense_hessian(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt", seed=6)
    plot = workdir / "density.png"
    result = run(
        "density", path, *GENERIC_ARGS, "--batch-size", 24, "-k", 4, "-o", "lanczos_steps=40",
        "-o", "num_runs=8", "--plot", plot, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model = helper_model(6).eval()
    batches = build_batches(DataSpec("synthetic", 24, 1, (12,), num_classes=3, seed=0))
    hessian = dense_hessian(model, nn.CrossEntropyLoss(), batches)
    spectrum = torch.linalg.eigvalsh(hessian)
    lo, hi = float(spectrum[0]), float(spectrum[-1])

    density = out["density"]["value"]
    assert density["num_runs"] == 8 and density["lanczos_steps"] == 40
    assert out["options"]["lanczos_steps"] == 40 and out["options"]["num_runs"] == 8
    assert abs(sum(density["weights"]) - 1) < 1e-9
    tol = 1e-8 * max(abs(lo), abs(hi))
    assert all(lo - tol <= x <= hi + tol for x in density["nodes"])  # Ritz values lie inside
    torch.testing.assert_close(max(density["nodes"]), hi, rtol=1e-6, atol=0)  # λmax converges
    details = out["density"]["details"]  # no trace from SLQ: one probe per run
    assert "trace_estimate" not in details and len(details["probe_quadratic_forms"]) == 8

    top = torch.tensor(out["eigenvalues"]["value"], dtype=torch.float64)
    torch.testing.assert_close(top, spectrum.flip(0)[:4], rtol=1e-5, atol=1e-9)
    assert out["eigenvalues"]["seed"] == out["density"]["seed"] == 0

    smooth = out["smoothed"]
    grid, curve = np.array(smooth["grid"]), np.array(smooth["density"])
    assert len(grid) == 1000 and smooth["sigma"] > 0
    assert grid[0] < lo and grid[-1] > hi
    assert abs(np.trapezoid(curve, grid) - 1) < 1e-3  # a probability density

    assert out["plot"] == str(plot)
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_human_output_log_scale_and_sigma(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    plot = workdir / "log.png"
    result = run(
        "density", path, *GENERIC_ARGS, "--batch-size", 8, "-k", 2, "-o", "lanczos_steps=10",
        "--plot", plot, "--log-scale", "--sigma", 0.05,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "spectral density — backend pyhessian, seed 0" in text
    for label in ("density", "λ1", "λ2", "3 runs x 10 steps"):
        assert label in text
    assert "λ3" not in text
    assert "trace (from SLQ)" not in text  # it disagreed with estimate's trace
    assert "no trace from SLQ" in text and "deconcnn-curv estimate w.pt -q trace" in text
    assert f"plot written to {plot} (σ = 0.05)" in text
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_the_plot_marks_eigenvalues_beside_the_curve_and_keeps_the_legend_off_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guard: full-height lines marked λ2, λ3 where the curve shows no mass (each outlier holds
    # 1/dim of it), and the legend covered the peak.
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    save = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    path = save_state_dict(workdir / "w.pt", seed=6)
    result = run(
        "density", path, *GENERIC_ARGS, "--batch-size", 24, "-k", 4, "-o", "lanczos_steps=20",
        "--plot", workdir / "d.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (fig,) = figures
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    legends = [*fig.legends, *([ax.get_legend()] if ax.get_legend() else [])]
    assert legends and all(
        not leg.get_window_extent(renderer).overlaps(axes_box) for leg in legends
    )
    lines = {line.get_label(): line for line in ax.get_lines()}
    for line in lines.values():  # no vertical line claims a height at an eigenvalue
        x = np.asarray(line.get_xdata(), dtype=float)
        assert not (len(x) == 2 and x[0] == x[1]), line.get_label()
    (eig_label,) = [label for label in lines if label.startswith("top-4 eigenvalues")]
    assert "each holds 1/" in eig_label and "of the mass" in eig_label
    eig = lines[eig_label]
    assert eig.get_marker() == "v" and list(eig.get_ydata()) == [1.0] * 4  # the top edge
    rug = lines["SLQ nodes (Ritz values of the runs)"]
    assert len(rug.get_xdata()) == 3 * 20 and set(rug.get_ydata()) == {0.0}  # the bottom edge


def test_plugin_backend_without_eigenvalues(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run("density", path, *GENERIC_ARGS, "-b", "density-only", "--batch-size", 4)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: backend 'density-only' computes no eigenvalues to mark; pass -k 0 or a backend "
        "that computes both density and eigenvalues."
    )
    result = run(
        "density", path, *GENERIC_ARGS, "-b", "density-only", "-k", 0, "--batch-size", 4,
        "--sigma", 0.1, "--grid-points", 4001, "--json", "--plot", workdir / "three.svg",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["eigenvalues"] is None
    grid, curve = np.array(out["smoothed"]["grid"]), np.array(out["smoothed"]["density"])
    # Three Gaussians of width 0.1: the peak at 0 holds half the mass.
    peak = 0.5 / (0.1 * np.sqrt(2 * np.pi))
    torch.testing.assert_close(float(curve.max()), peak, rtol=1e-3, atol=0)
    assert abs(np.trapezoid(curve, grid) - 1) < 1e-6
    assert (workdir / "three.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--plot", "no/such/folder/d.png"], "no/such/folder does not exist"),
        (["--plot", "w.pt/d.png"], "w.pt is not a folder"),
        (["--plot", "d.xyz"], "unknown image format '.xyz'; use one of "),
        (["--plot", "d.pgf"], "unknown image format '.pgf'"),  # needs LaTeX at save time
        (["-o", "bogus=1"], "-o bogus is not an option of backend 'pyhessian'"),
        (["-o", "k=3"], "use -k, not -o k=..."),
        (["-o", "num_runs=0"], "option 'num_runs' of backend 'pyhessian' must be >= 1, got 0."),
        (["-b", "nonexistent"], "unknown backend 'nonexistent'"),
    ],
)
def test_bad_input(workdir: Path, args: list[str], fragment: str) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run("density", path, *GENERIC_ARGS, *args)
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_backend_without_density(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class TraceOnly(DensityOnly):
        name = "trace-only"
        quantities = frozenset({"trace"})

    class Other:
        @hookimpl
        def register_backends(self, register):
            register(TraceOnly)

    registry_module.set_registry(Registry.build(extra_plugins=(Other(),)))
    path = save_state_dict(workdir / "w.pt")
    result = run("density", path, *GENERIC_ARGS, "-b", "trace-only")
    assert result.exit_code == 1
    assert "backend 'trace-only' cannot compute quantity 'density'" in result.stderr


@pytest.mark.parametrize(
    ("sigma", "fragment"),
    [("1e-300", "is out of range for this spectrum"), ("1e300", "is out of range"),
     ("1e-9", "below twice the grid spacing")],
)  # fmt: skip
def test_a_sigma_that_cannot_smooth_keeps_the_results_and_says_why(
    workdir: Path, sigma: str, fragment: str
) -> None:
    path = save_state_dict(workdir / "w.pt")
    plot = workdir / "d.png"
    result = run(
        "density", path, *GENERIC_ARGS, "-o", "lanczos_steps=10", "--sigma", sigma,
        "--plot", plot, "--json",
    )  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: --sigma ") and fragment in result.stderr
    out = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(c))  # nothing lost
    assert out["smoothed"] is None and out["plot"] is None
    assert abs(sum(out["density"]["value"]["weights"]) - 1) < 1e-9
    assert not plot.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--sigma", "0"],
        ["-k", "-1"],
        ["--grid-points", "5"],
        ["--grid-points", "100000000"],
        ["--batch-size", "0"],
    ],
)
def test_out_of_range(workdir: Path, args: list[str]) -> None:
    result = run("density", workdir / "w.pt", *args)
    assert result.exit_code == 2 and "Error: Invalid value for" in result.stderr
