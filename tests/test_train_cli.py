"""``deconcnn-curv train``: a tiny real run through the CLI leaves a complete run folder.

The runs here are the reference run scaled down to seconds (a few dozen synthetic images, one or
two epochs); the command, configs and files are those of the README's main job.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from deconcnn_curvature.cli import cli
from deconcnn_curvature.monitor import read_curvature_jsonl
from deconcnn_curvature.training.metrics import read_metrics_jsonl
from deconcnn_curvature.training.run import ENV_CONFIG_DIR, compose_config, default_config_dir

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model=small_cnn",
    "model.width=4",
    "data.num_train=64",
    "data.num_val=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=1.0",
    "trainer.log_every_n_steps=1",
    "lrsched.warmup_epochs=0.5",
    "curvature.compute_every_n_steps=2",
    "curvature.compute_at_step_zero=true",
    "curvature.num_hvps=4",
    "curvature.hessian_batch_size=8",
    "+curvature.backend_options.max_hvps=6",
]


def _train(*args: str) -> object:
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def test_train_writes_a_complete_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _train(*TINY, f"run_dir={run}", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the JSON alone: Lightning's output goes to stderr
    assert summary["run_dir"] == str(run) and summary["global_step"] == 4

    for name in ("config.yaml", "metrics.jsonl", "curvature.jsonl", "last.ckpt", "curvature.png"):
        assert (run / name).is_file(), name
    assert (run / "curvature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = (run / "config.yaml").read_text()
    assert "name: small_cnn" in config and "compute_every_n_steps: 2" in config

    records = read_curvature_jsonl(run / "curvature.jsonl")
    assert [(r["step"], r["quantity"]) for r in records] == [
        (s, q) for s in (0, 2, 4) for q in ("trace", "eigenvalues")
    ]
    assert all(r["error"] is None and r["backend"] == "pyhessian" for r in records)
    assert all(r["n_hvp"] == 4 for r in records if r["quantity"] == "trace")
    assert summary["curvature_records"] == records

    lines = read_metrics_jsonl(run / "metrics.jsonl")
    assert {"timestamp", "step", "metrics"} == set(lines[0])
    by_step = {line["step"]: line["metrics"] for line in lines if "train/loss" in line["metrics"]}
    assert sorted(by_step) == [1, 2, 3, 4]
    assert by_step[2]["curvature/hutch_trace"] == pytest.approx(records[2]["value"], rel=1e-6)
    # The initial model's curvature is on step 0's line, not on the first optimiser step's.
    curv = {
        line["step"]: line["metrics"] for line in lines if "curvature/lambda_max" in line["metrics"]
    }
    assert sorted(curv) == [0, 2, 4]
    assert "train/loss" not in curv[0] and "curvature/lambda_max" not in by_step[1]
    for rec in records[1::2]:
        assert curv[rec["step"]]["curvature/lambda_max"] == pytest.approx(rec["value"][0], rel=1e-6)
    assert "val/acc" in {k for line in lines for k in line["metrics"]}


@pytest.mark.slow
def test_train_prints_a_summary_table_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 0, result.output
    for text in ("curvature records", "6 ok, 0 failed", "trace @ step 4", "λ_max @ step 4"):
        assert text in result.output, text

    again = _train(*TINY, f"run_dir={run}")
    assert again.exit_code == 1 and "already holds a run" in again.output

    resumed = _train(
        *TINY, f"run_dir={run}", f"resume={run / 'last.ckpt'}", "trainer.max_epochs=2", "--json"
    )
    assert resumed.exit_code == 0, resumed.output
    steps = [r["step"] for r in read_curvature_jsonl(run / "curvature.jsonl")][::2]
    assert steps == [0, 2, 4, 6, 8]  # the resumed run continued the same file and cadence


def test_reference_resnet_runs(tmp_path: Path) -> None:
    """The README's model (resnet18_cifar at width 1/8, BatchNorm) through the same command."""
    result = _train(
        "model.width_mult=0.125",
        "data.num_train=32",
        "data.num_val=16",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=1.0",
        "curvature.compute_every_n_steps=2",
        "curvature.num_hvps=2",
        "curvature.hessian_batch_size=8",
        "+curvature.backend_options.max_hvps=3",
        f"run_dir={tmp_path / 'r'}",
        "--json",
    )
    assert result.exit_code == 0, result.output
    (trace, eig) = read_curvature_jsonl(tmp_path / "r" / "curvature.jsonl")
    assert trace["step"] == 2 and trace["value"] is not None and eig["value"] is not None


def test_curvature_off_writes_no_records(tmp_path: Path) -> None:
    result = _train(*TINY, "curvature.enabled=false", f"run_dir={tmp_path / 'r'}")
    assert result.exit_code == 0, result.output
    assert "off (curvature.enabled=false)" in result.output
    assert not (tmp_path / "r" / "curvature.jsonl").exists()
    assert not (tmp_path / "r" / "curvature.png").exists()
    assert (tmp_path / "r" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nosuchkey=1"], "bad configuration override"),
        (["curvature=nosuchfile"], "bad configuration override"),
        (["data=cifar10"], "data.root must be given"),
        (["curvature.backend=pyhesian"], "Did you mean 'pyhessian'"),
        (["curvature.compute_every_n_steps=0"], "compute_every_n_steps must be an integer >= 1"),
        (["resume=/no/such.ckpt"], "no such checkpoint"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_1(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    result = _train(*TINY, f"run_dir={tmp_path / 'r'}", *overrides)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # nothing is created for a run that cannot start


def test_unknown_option_is_a_usage_error() -> None:
    result = _train("--nope")
    assert result.exit_code == 2 and "overrides look like key=value" in result.output


def test_cfg_prints_the_composed_config() -> None:
    result = _train("+preset=demo", "curvature=hutchpp", "--cfg")
    assert result.exit_code == 0
    assert "width_mult: 0.125" in result.output and "backend: hutchpp" in result.output


def test_cfg_takes_hydras_own_job_word() -> None:
    """A Hydra user types `--cfg job` (Hydra's form); `job` was read as an override and failed
    with "Error parsing override 'job' missing EQUAL"."""
    result = _train("--cfg", "job", "curvature=hutchpp")
    assert result.exit_code == 0, result.output
    assert "backend: hutchpp" in result.output and "Error" not in result.output
    assert _train("--cfg", "all").exit_code == 0
    assert "backend: hutchpp" in _train("curvature=hutchpp", "--cfg", "job").output


def test_config_dir_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_config_dir() == ROOT / "configs"  # a source checkout uses configs/
    # (an installed wheel's own copy is tested by tests/test_packaging.py)
    elsewhere = tmp_path / "my_configs"
    shutil.copytree(ROOT / "configs", elsewhere)
    assert compose_config(["+preset=demo"], elsewhere).model.width_mult == 0.125
    monkeypatch.setenv(ENV_CONFIG_DIR, str(elsewhere))
    assert default_config_dir() == elsewhere
    monkeypatch.setenv(ENV_CONFIG_DIR, str(tmp_path))
    result = _train("--cfg")
    assert result.exit_code == 1 and "has no train.yaml" in result.output


def test_summary_marks_an_unconverged_lambda_max(tmp_path: Path) -> None:
    # A capped λ_max must not print like a converged one in the summary.
    from rich.console import Console

    from deconcnn_curvature.training.run import RunResult, summary_table

    def eig(step: int, converged: bool) -> dict:
        details = {"residuals": [0.3], "converged": converged}
        return {"step": step, "quantity": "eigenvalues", "value": [2.5], "n_hvp": 30,
                "seconds": 0.1, "details": details}  # fmt: skip

    def render(recs: list[dict]) -> str:
        result = RunResult(
            run_dir=tmp_path, config_path=tmp_path / "c", metrics_path=tmp_path / "m",
            curvature_path=None, checkpoint_path=None, plot_path=None, global_step=8, epochs=1,
            seconds=1.0, metrics={}, records=recs,
        )  # fmt: skip
        console = Console(record=True, width=200)
        console.print(summary_table(result))
        return console.export_text()

    text = render([eig(4, False), eig(8, False)])
    assert "30 HVPs, UNCONVERGED)" in text
    assert "λ_max unconverged" in text and "2 of 2 measurements (first at step 4)" in text
    text = render([eig(4, False), eig(8, True)])
    assert "UNCONVERGED" not in text and "1 of 2 measurements (first at step 4)" in text
    assert "unconverged" not in render([eig(4, True), eig(8, True)])
