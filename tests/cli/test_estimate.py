"""`deconcnn-curv estimate CHECKPOINT`: round trips against the library and dense Hessians, the
option mapping, and every bad input as one `Error:` line with the right exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from cases import dense_hessian
from checkpoint_helpers import (
    GENERIC_ARGS,
    HELPER_MODULE,
    helper_model,
    reference_checkpoint,
    save_state_dict,
)
from click.testing import CliRunner, Result
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature import Backend, hookimpl
from deconcnn_curvature import registry as registry_module
from deconcnn_curvature.checkpoints.data import DataSpec, build_batches
from deconcnn_curvature.cli import cli
from deconcnn_curvature.registry import Registry


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lightning")
    return reference_checkpoint(tmp_path_factory.getbasetemp())


def run(*args: Any, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def assert_error(result: Result, fragment: str, code: int = 1) -> None:
    """One `Error: ...` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if code == 1:
        assert len(lines) == 1, result.stderr
    assert lines[-1].startswith("Error: "), result.stderr
    assert fragment in result.stderr, result.stderr


def _problem(seed: int, batch_size: int, num_batches: int, data_seed: int):
    model = helper_model(seed)
    batches = build_batches(
        DataSpec("synthetic", batch_size, num_batches, (12,), num_classes=3, seed=data_seed)
    )
    return model, nn.CrossEntropyLoss(), batches


# --------------------------------------------------------------------------- round trips


def test_trace_matches_the_library_and_the_dense_hessian(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt", seed=1)
    result = run(
        "estimate", path, *GENERIC_ARGS, "--batch-size", 16, "--num-batches", 2,
        "--seed", 5, "--num-hvps", 60, "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no progress display when stderr is not a terminal
    out = json.loads(result.stdout)
    model, loss, batches = _problem(1, 16, 2, 5)
    expected = dcc.estimate(model, loss, batches, "trace", "pyhessian", seed=5, num_hvps=60)
    got = out["result"]
    torch.testing.assert_close(got["value"], expected.value)
    torch.testing.assert_close(got["stderr"], expected.stderr)
    torch.testing.assert_close(got["ci"], list(expected.ci))
    assert got["n_hvp"] == 60 and got["seed"] == 5 and got["device"] == "cpu"
    assert got["backend"] == "pyhessian" and got["method"] == "hutchinson"
    assert out["options"]["num_hvps"] == 60 and out["device"] == "cpu"
    assert out["loaded"]["loader"] == "builtin:factory"
    assert out["loaded"]["num_batches"] == 2
    # The number itself: within 4 standard errors of the exact trace (a bound that can fail).
    exact = float(dense_hessian(model.eval(), loss, batches).trace())
    assert abs(got["value"] - exact) <= 4 * got["stderr"]
    assert got["dim"] == sum(p.numel() for p in model.parameters())


def test_eigenvalues_match_the_dense_hessian(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt", seed=2)
    result = run(
        "estimate", path, *GENERIC_ARGS, "-q", "eigenvalues", "-k", 3, "--batch-size", 20,
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model, loss, batches = _problem(2, 20, 1, 0)
    exact = torch.linalg.eigvalsh(dense_hessian(model.eval(), loss, batches)).flip(0)[:3]
    torch.testing.assert_close(
        torch.tensor(out["result"]["value"], dtype=torch.float64), exact, rtol=1e-5, atol=1e-9
    )
    assert out["result"]["details"]["converged"] is True


def test_reference_checkpoint_matches_the_library(reference: Path) -> None:
    from deconcnn_curvature.training.data import SyntheticCIFAR
    from deconcnn_curvature.training.module import ClassificationModule

    result = run(
        "estimate", reference, "--data", "synthetic-cifar", "--batch-size", 8,
        "--num-hvps", 6, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    module = ClassificationModule.load_from_checkpoint(reference, map_location="cpu")
    data = SyntheticCIFAR(8, seed=0)
    batch = (torch.stack([data[i][0] for i in range(8)]), data.labels)
    expected = dcc.estimate(module.model, module.loss_fn, batch, "trace", seed=0, num_hvps=6)
    torch.testing.assert_close(out["result"]["value"], expected.value)
    torch.testing.assert_close(out["result"]["stderr"], expected.stderr)
    assert out["loaded"]["loader"] == "builtin:reference"
    assert out["loaded"]["metadata"]["global_step"] == 2

    human = run(
        "estimate", reference, "--data", "synthetic-cifar", "--batch-size", 8,
        "--num-hvps", 6,
    )  # fmt: skip
    assert human.exit_code == 0, human.output
    text = human.stdout
    assert "reference run (ClassificationModule): small_cnn(width=4, norm_type='batchnorm')" in text
    assert "(epoch 1, global_step 2)" in text
    assert "trace — backend pyhessian (hutchinson, seed 0)" in text
    for column in ("value", "± stderr", "interval", "HVPs", "seconds", "device"):
        assert column in text
    assert f"{expected.value:.6g}" in text and f"{expected.stderr:.6g}" in text
    assert "(95%)" in text


def test_human_output_and_quiet(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    loud = run("estimate", path, *GENERIC_ARGS, "--batch-size", 8, "--num-hvps", 10)
    assert loud.exit_code == 0, loud.output
    assert "model      tests_helper_module:factory()" in loud.stdout
    assert "data       synthetic: random N(0,1) inputs 12, 3 classes, seed 0" in loud.stdout
    quiet = run("estimate", path, *GENERIC_ARGS, "--batch-size", 8, "--num-hvps", 10, "--quiet")
    assert quiet.exit_code == 0 and "model " not in quiet.stdout and "trace" in quiet.stdout


def test_rtol_and_backend_options(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    args = [path, *GENERIC_ARGS, "--batch-size", 8]
    result = run("estimate", *args, "--rtol", 0.5, "--num-hvps", 400, "-o", "min_hvps=4")
    assert result.exit_code == 0, result.output
    assert "rtol 0.5: met after" in result.stdout
    short = run("estimate", *args, "--rtol", 1e-4, "--num-hvps", 6, "--quiet")
    assert "rtol 0.0001: NOT met (probe budget exhausted) after 6 HVPs" in short.stdout
    out = json.loads(run("estimate", *args, "--rtol", 0.5, "--num-hvps", 400, "--json").stdout)
    assert out["result"]["target_met"] is True and out["result"]["n_hvp"] < 400
    assert out["options"]["rtol"] == 0.5

    out = json.loads(run("density", *args, "-k", 0, "-o", "lanczos_steps=12", "--json").stdout)
    density = out["density"]["value"]
    assert out["options"]["lanczos_steps"] == 12 and density["lanczos_steps"] == 12
    assert abs(sum(density["weights"]) - 1) < 1e-9


def test_the_density_is_the_density_commands(workdir: Path) -> None:
    """``estimate -q density`` is not offered: the density command smooths and plots it."""
    path = save_state_dict(workdir / "w.pt")
    help_text = "".join(run("estimate", "--help").output.split())
    assert "trace,eigenvalues,layer_trace,diagonal" in help_text and "density" not in help_text
    result = run("estimate", path, *GENERIC_ARGS, "-q", "density")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"use `deconcnn-curv density {path}`" in result.stderr


def test_model_args_reach_the_factory(workdir: Path) -> None:
    torch.save(helper_model(0, hidden=4, num_classes=5).state_dict(), workdir / "w.pt")
    result = run(
        "estimate", workdir / "w.pt", *GENERIC_ARGS, "--model-arg", "hidden=4",
        "--model-arg", "num_classes=5", "--loss", "mse", "--batch-size", 4, "--num-hvps", 4,
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["loaded"]["model"] == "tests_helper_module:factory(hidden=4, num_classes=5)"
    assert out["loaded"]["metadata"]["loss"] == "mse"
    assert out["loaded"]["metadata"]["data"]["num_classes"] == 5


def test_backend_from_the_environment(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run("estimate", path, *GENERIC_ARGS, env={"DECONCNN_CURVATURE_BACKEND": "pyhesian"})
    # A usage error naming the variable the bad value came from.
    assert_error(result, "unknown backend 'pyhesian'. Did you mean 'pyhessian'?", code=2)
    assert "(env var: 'DECONCNN_CURVATURE_BACKEND')" in result.stderr
    assert "Unset or fix $DECONCNN_CURVATURE_BACKEND" in result.stderr


@pytest.mark.slow
def test_generic_path_needs_no_lightning(workdir: Path) -> None:
    """With Lightning unimportable, a state dict + --model + synthetic data still works, and
    nothing even tries to import Lightning."""
    path = save_state_dict(workdir / "w.pt")
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
            sys.modules[name] = None  # any import of it now raises ImportError
        from deconcnn_curvature.cli import main
        try:
            main(["estimate", {str(path)!r}, "--model", "{HELPER_MODULE}:factory", "--data",
                  "synthetic", "--input-shape", "12", "--batch-size", "4", "--num-hvps", "4",
                  "--json"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        loaded = [m for m, mod in sys.modules.items() if m.startswith("lightning") and mod]
        assert not loaded, loaded
        """
    )
    env = {**os.environ, "DECONCNN_CURVATURE_PLUGINS": ""}
    env.pop("DECONCNN_CURVATURE_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"]["n_hvp"] == 4


# --------------------------------------------------------------------------- bad input


def test_missing_file(workdir: Path) -> None:
    assert_error(
        run("estimate", workdir / "nope.ckpt", *GENERIC_ARGS),
        f"Error: checkpoint file {workdir / 'nope.ckpt'} does not exist.",
    )


def test_truncated_and_foreign_files(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    data = path.read_bytes()
    (workdir / "cut.pt").write_bytes(data[: len(data) // 3])
    assert_error(
        run("estimate", workdir / "cut.pt", *GENERIC_ARGS),
        "cut.pt is not a PyTorch checkpoint, or it is truncated (RuntimeError: "
        "PytorchStreamReader failed",
    )
    (workdir / "notes.txt").write_text("hello\n")
    assert_error(
        run("estimate", workdir / "notes.txt", *GENERIC_ARGS),
        "notes.txt is not a PyTorch checkpoint, or it is truncated",
    )
    assert_error(run("estimate", workdir, *GENERIC_ARGS), "(it is a directory)")


def test_model_that_cannot_be_rebuilt(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    assert_error(
        run("estimate", path, "--data", "synthetic"),
        "it is a bare state dict (4 tensors) with no model description. Pass --model "
        "package.module:factory (and --model-arg key=value for its arguments)",
    )
    assert_error(
        run("estimate", path, *GENERIC_ARGS, "--model-arg", "hidden=7"),
        "do not fit the model: shape mismatch for body.1.bias (5,) vs model (7,)",
    )
    assert_error(
        run("estimate", path, *GENERIC_ARGS, "--model-arg", "hidden"),
        "--model-arg must look like key=value",
    )
    assert_error(
        run("estimate", path, "--model", "nowhere_xyz:f", "--data", "synthetic"),
        "cannot import module 'nowhere_xyz'",
    )
    assert_error(
        run("estimate", path, "--model", f"{HELPER_MODULE}:factory", "--data", "synthetic"),
        "fails on inputs of shape 3,32,32",
    )


def test_device_errors(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_state_dict(workdir / "w.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_error(
        run("estimate", path, *GENERIC_ARGS, "--device", "cuda"),
        "--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); use "
        "--device cpu or --device auto.",
    )
    assert_error(run("estimate", path, *GENERIC_ARGS, "--device", "cuda:1"), "no CUDA GPU")
    assert_error(
        run("estimate", path, *GENERIC_ARGS, "--device", "tpu"),
        "--device must be auto, cpu, cuda or cuda:N, got 'tpu'.",
    )
    result = run("estimate", path, *GENERIC_ARGS, "--batch-size", 4, "--num-hvps", 4, "--json")
    assert json.loads(result.stdout)["device"] == "cpu"  # auto without a GPU


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-b", "nonexistent"], "unknown backend 'nonexistent'. Known backends: "),
        (["-q", "hessian"], "unknown quantity 'hessian'"),
        (["-q", "diagonal"], "backend 'pyhessian' cannot compute quantity 'diagonal'"),
        (
            ["-q", "eigenvalues", "--num-hvps", "5"],
            "--num-hvps: option 'num_hvps' of backend 'pyhessian' applies to trace only, not to "
            "'eigenvalues'; drop it or choose another backend.",
        ),
        (
            ["-k", "2"],
            "-k: option 'k' of backend 'pyhessian' applies to eigenvalues only, not to "
            "'trace'; drop it or choose another backend.",
        ),
        (
            ["-o", "bogus=1"],
            "-o bogus: unknown option(s) 'bogus' for backend 'pyhessian'; its "
            "options are: ci_level, data_groups, k, lanczos_steps,",
        ),
        (
            ["-o", "num_hvps=5", "--num-hvps", "6"],
            "option 'num_hvps' of backend 'pyhessian' is given twice (-o num_hvps and --num-hvps)",
        ),
        (["-o", "min_hvps=1"], "option 'min_hvps' of backend 'pyhessian' must be >= 2, got 1."),
        (["-o", "min_hvps"], "-o/--option must look like key=value"),
        (["--data", "cifar10"], "--data cifar10 needs --data-root DIR"),
        (["-q", "eigenvalues", "-k", "500"], "option 'k' (500) exceeds the number of trainable"),
    ],
)
def test_bad_choices(workdir: Path, args: list[str], fragment: str) -> None:
    path = save_state_dict(workdir / "w.pt")
    assert_error(run("estimate", path, *GENERIC_ARGS, "--batch-size", 4, *args), fragment)


def test_unavailable_backend(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Missing(Backend):
        name = "needs-gpu-lib"
        quantities = frozenset({"trace"})
        requires = ("a_module_that_is_not_installed",)
        install_hint = "pip install gpu-lib"

        def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
            raise AssertionError("never called")

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(Missing)

    registry_module.set_registry(Registry.build(extra_plugins=(Plugin(),)))
    path = save_state_dict(workdir / "w.pt")
    assert_error(
        run("estimate", path, *GENERIC_ARGS, "-b", "needs-gpu-lib"),
        "backend 'needs-gpu-lib' is not available here (missing module(s): "
        "a_module_that_is_not_installed). Install it with: pip install gpu-lib",
    )


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--num-batches", "0"], "--num-batches"),
        (["--num-hvps", "0"], "--num-hvps"),
        (["--rtol", "0"], "--rtol"),
        (["--rtol", "-0.1"], "--rtol"),
        (["-k", "0"], "-k"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**63)], "--seed"),  # was exit 1, an error naming no flag
        (["--seed", str(2**64)], "--seed"),  # was exit 1, "Overflow when unpacking long long"
        (["--num-classes", "1"], "--num-classes"),
        (["--input-shape", "3,x,2"], "--input-shape"),
        (["--loss", "hinge"], "--loss"),
        (["--data", "imagenet"], "--data"),
    ],
)
def test_out_of_range_values_are_usage_errors(workdir: Path, args: list[str], option: str) -> None:
    result = run("estimate", workdir / "w.pt", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"Error: Invalid value for '{option}'" in result.stderr


def test_progress_display_only_on_a_terminal_and_not_with_quiet(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    args = ["estimate", path, *GENERIC_ARGS, "--batch-size", 4, "--num-hvps", 4]
    terminal = {"FORCE_COLOR": "1"}  # rich treats stderr as a terminal
    shown = run(*args, env=terminal)
    assert shown.exit_code == 0 and "trace with pyhessian on cpu" in shown.stderr
    assert run(*args, "--quiet", env=terminal).stderr == ""
    assert run(*args).stderr == ""  # CliRunner's stderr is not a terminal
    compare = run("compare", *args[1:], "--backends", "pyhessian", env=terminal)
    assert compare.exit_code == 0 and "0/1" in compare.stderr


@pytest.mark.cuda
def test_on_the_gpu(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt", seed=1)
    args = [path, *GENERIC_ARGS, "--batch-size", 16, "--num-hvps", 20, "--device", "cuda", "--json"]
    out = json.loads(run("estimate", *args).stdout)
    assert out["device"] == "cuda:0" and out["result"]["device"] == "cuda:0"
    assert out["result"]["peak_memory_bytes"] > 0
    model, loss, batches = _problem(1, 16, 1, 0)
    expected = dcc.estimate(model.cuda(), loss, batches, "trace", seed=0, num_hvps=20)
    torch.testing.assert_close(out["result"]["value"], expected.value)
    compare = json.loads(run("compare", *args, "--backends", "pyhessian").stdout)
    assert compare["memory"]["kind"] == "cuda_max_allocated"
    assert compare["rows"][0]["peak_memory_bytes"] > 0


def test_unconverged_eigenvalues_are_flagged_in_the_table(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt", seed=2)
    result = run(
        "estimate", path, *GENERIC_ARGS, "-q", "eigenvalues", "-k", 2, "-o", "max_hvps=2",
        "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "eigenvalues NOT converged (largest residual" in result.stdout
    assert "raise -o max_hvps" in result.stdout
    converged = run("estimate", path, *GENERIC_ARGS, "-q", "eigenvalues", "--quiet")
    assert "NOT converged" not in converged.stdout


def test_eigenvalues_stopped_at_the_rounding_floor_say_so_instead_of_more_products(
    workdir: Path,
) -> None:
    """A tol below what the products can certify (1e-18 of max|θ| for the helper's float64 MLP)
    stops early; the warning gives the note (a larger tol), not "raise -o max_hvps", which would
    not help."""
    path = save_state_dict(workdir / "w.pt", seed=2)
    args = ["-q", "eigenvalues", "-o", "tol=1e-18", "-o", "max_hvps=200", "--json"]
    result = run("estimate", path, *GENERIC_ARGS, *args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["result"]
    assert out["details"]["converged"] is False and out["n_hvp"] < 60
    assert "rounding floor of float64" in out["details"]["note"]
    shown = run("estimate", path, *GENERIC_ARGS, *args[:-1], "--quiet").stdout
    assert "eigenvalues NOT converged" in shown and "rounding floor of float64" in shown
    assert "raise -o max_hvps" not in shown and "measure in float64" not in shown


def test_a_printing_model_factory_leaves_json_clean(workdir: Path) -> None:
    (workdir / "chatty.py").write_text(
        f"from {HELPER_MODULE} import factory as _f\n"
        "def factory():\n    print('building the model')\n    return _f()\n"
    )
    path = save_state_dict(workdir / "w.pt")
    result = run(
        "estimate", path, "--model", "chatty:factory", "--data", "synthetic",
        "--input-shape", 12, "--num-hvps", 4, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"]["n_hvp"] == 4
    assert "building the model" in result.stderr


def test_a_single_output_model_is_not_a_classifier_and_the_message_says_what_to_do(
    workdir: Path,
) -> None:
    path = workdir / "one.pt"
    torch.save(helper_model(0, num_classes=1).state_dict(), path)
    result = run("estimate", path, *GENERIC_ARGS, "--model-arg", "num_classes=1")
    assert_error(result, "returns 1 output per sample; the command line measures classifiers")
    assert "deconcnn_curvature.estimate(model, loss_fn, data)" in result.stderr


def test_missing_cifar_points_to_the_data_flag_not_a_train_override(workdir: Path) -> None:
    """The message suggested `data=synthetic`, a `train` override, on a command line
    whose option is `--data`."""
    from deconcnn_curvature.checkpoints.data import DataSpec, build_batches
    from deconcnn_curvature.errors import CurvatureError

    spec = DataSpec("cifar10", 4, 1, (3, 32, 32), num_classes=10, root=workdir / "no-cifar")
    with pytest.raises(CurvatureError) as info:
        build_batches(spec)
    message = str(info.value)
    assert "does not exist" in message and "(data=synthetic)" not in message
    assert "--data synthetic-cifar" in message and "or --data synthetic)" in message
