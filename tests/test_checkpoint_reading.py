"""Reading a checkpoint: hyper-parameters are never resolved against the environment, the zip
archive's sizes are checked before anything is inflated, and ``train resume=`` accepts and refuses
the same files as ``estimate``, for the same, true reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import save_state_dict
from click.testing import CliRunner, Result

from deconcnn_curvature.cli import cli

SECRET = "hunter2-the-secret-value"


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _with_hparams(path: Path, hparams: dict, state: dict | None = None) -> Path:
    omegaconf = pytest.importorskip("omegaconf")
    if state is None:
        state = torch.load(save_state_dict(path.with_suffix(".w.pt")), weights_only=True)
    torch.save({"state_dict": state, "hyper_parameters": omegaconf.OmegaConf.create(hparams)}, path)
    return path


def _small_cnn_state() -> dict:
    from deconcnn_curvature.training.resnet_cifar import small_cnn

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return small_cnn(width=2).state_dict()


SMALL_CNN = [
    "--model",
    "deconcnn_curvature.training.resnet_cifar:small_cnn",
    "--model-arg",
    "width=2",
]


def test_an_environment_interpolation_in_hyper_parameters_never_reaches_the_output(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET", SECRET)
    env = "${oc.env:SECRET}"
    # an error path: the reference loader names the bad model argument
    bad_width = _with_hparams(
        workdir / "a.ckpt", {"model_name": "small_cnn", "model_kwargs": {"width": env}}
    )
    # an error path: the saved CIFAR folder does not exist
    cifar = _with_hparams(
        workdir / "b.ckpt",
        {"data": {"source": "cifar10", "root": f"/data/{env}"}},
        _small_cnn_state(),
    )
    # a success path: the data configuration (root included) is printed in --json
    synthetic = _with_hparams(
        workdir / "c.ckpt",
        {"seed": 3, "data": {"source": "synthetic", "seed": "${seed}", "root": env}},
        _small_cnn_state(),
    )
    outputs = [
        run("estimate", bad_width, "--json"),
        run("estimate", cifar, *SMALL_CNN, "--json"),
        run("estimate", synthetic, *SMALL_CNN, "--num-hvps", 4, "--batch-size", 4, "--json"),
    ]
    assert [r.exit_code for r in outputs] == [1, 1, 0], [r.output for r in outputs]
    for result in outputs:
        assert SECRET not in result.output
    assert "width must be an integer" in outputs[0].output and env in outputs[0].output
    assert env in outputs[2].output  # shown as the text it is
    assert '"seed": 3' in outputs[2].output  # a reference to another node still resolves
    assert os.environ["SECRET"] == SECRET
