"""The shipped Hydra configs compose with Hydra's compose API and instantiate the monitor.

Checked: one flag enables curvature, one override swaps the backend, the callback YAML works
unchanged in a deconCNN-style ``configs/callbacks/`` folder (with or without a ``curvature``
group), and every setting a file writes reaches the monitor. (That an installed package finds these
files: ``tests/test_packaging.py``.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from config_helpers import BACKEND_FILES, CONFIGS
from config_helpers import attributes as _attributes
from config_helpers import listed as _listed
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import deconcnn_curvature as dcc
from deconcnn_curvature import monitor as dcc_monitor
from deconcnn_curvature.monitor import DEFAULT_METRIC_KEYS, CurvatureMonitor

CURVATURE_FILES = BACKEND_FILES


def _compose(overrides: list[str], config_dir: Path = CONFIGS, name: str = "train"):
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_every_builtin_backend_has_a_curvature_file_that_selects_it() -> None:
    builtin = sorted(r["name"] for r in dcc.list_backends() if r["plugin"].startswith("builtin:"))
    assert builtin == CURVATURE_FILES
    for name in builtin:
        assert instantiate(_compose([f"curvature={name}"]).callbacks).backend == name


def test_train_config_composes_with_curvature_on_by_default() -> None:
    cfg = _compose([])
    assert cfg.curvature.enabled is True and cfg.curvature.backend == "pyhessian"
    assert cfg.model.name == "resnet18_cifar" and cfg.data.source == "synthetic"
    monitor = instantiate(cfg.callbacks)
    assert isinstance(monitor, CurvatureMonitor)
    # The monitor's defaults, but for what curvature/pyhessian.yaml writes and train.yaml's
    # enabled: true.
    listed = {**_listed("pyhessian"), "enabled": True}
    assert _attributes(monitor) == _attributes(CurvatureMonitor(**listed))
    assert monitor.metric_keys == dict(DEFAULT_METRIC_KEYS)
    assert monitor.check_config()["trace"]["num_hvps"] == listed["num_hvps"]


def test_one_flag_enables_and_one_override_swaps_the_backend() -> None:
    off = instantiate(_compose(["curvature.enabled=false"]).callbacks)
    assert off.enabled is False
    on = instantiate(_compose(["curvature.enabled=true"]).callbacks)
    assert on.enabled is True

    hutchpp = instantiate(_compose(["curvature=hutchpp"]).callbacks)
    assert hutchpp.backend == "hutchpp" and hutchpp.enabled is True  # train.yaml turns it on
    assert hutchpp.quantities == ("trace", "eigenvalues") and hutchpp.num_hvps == 10
    assert (
        hutchpp.hessian_batch_size == 64
    )  # the cost/accuracy frontier (benchmarks/cost_accuracy.py)

    swapped = instantiate(_compose(["curvature.backend=backpack"]).callbacks)
    assert swapped.backend == "backpack"
    assert swapped.compute_every_n_steps == 500  # everything else is kept

    backpack = instantiate(
        _compose(["curvature=backpack", "curvature.compute_every_n_steps=50"]).callbacks
    )
    assert backpack.backend == "backpack" and backpack.quantities == ("trace",)
    assert backpack.num_hvps is None and backpack.compute_every_n_steps == 50

    tuned = instantiate(
        _compose(
            [
                "curvature.num_hvps=20",
                "curvature.rtol=0.05",
                "curvature.batch_mode=refresh",
                "curvature.on_error=raise",
                "+curvature.backend_options.probe_batch=4",
                "curvature.quantities=[trace]",
            ]
        ).callbacks
    )
    assert tuned.num_hvps == 20 and tuned.rtol == 0.05 and tuned.batch_mode == "refresh"
    assert tuned.on_error == "raise" and tuned.backend_options == {"probe_batch": 4}
    assert tuned.quantities == ("trace",)


@pytest.mark.parametrize("name", CURVATURE_FILES)
def test_the_overrides_the_config_comments_show_compose(name: str) -> None:
    """Dict-valued settings are overridden whole (no `+` needed), as the comments say."""
    example = {"backpack": "{verify:true}"}.get(name, "{tol:0.001}")
    cfg = _compose(
        [
            f"curvature={name}",
            f"curvature.backend_options={example}",
            "curvature.metric_keys={trace:hess/tr}",
            "trainer.accumulate_grad_batches=2",
        ]
    )
    monitor = instantiate(cfg.callbacks)
    assert monitor.metric_keys["trace"] == "hess/tr"
    assert monitor.backend_options == ({"verify": True} if name == "backpack" else {"tol": 0.001})
    assert cfg.trainer.accumulate_grad_batches == 2
    assert instantiate(_compose([f"curvature={name}"]).callbacks).backend_options == {}


@pytest.mark.parametrize("name", CURVATURE_FILES)
def test_each_curvature_file_resolves_with_its_backend(name: str) -> None:
    monitor = instantiate(_compose([f"curvature={name}"]).callbacks)
    registered = {b["name"]: b for b in dcc.list_backends()}
    if monitor.backend not in registered:
        pytest.skip(f"backend {monitor.backend!r} is not registered in this build")
    if not registered[monitor.backend]["available"]:
        pytest.skip(f"backend {monitor.backend!r} is not installed here")
    resolved = monitor.check_config()
    assert set(resolved) == set(monitor.quantities)


def test_demo_preset_is_small() -> None:
    cfg = _compose(["+preset=demo"])
    assert cfg.model.width_mult == 0.125 and cfg.data.num_train == 4096
    assert cfg.trainer.max_epochs == 2
    monitor = instantiate(cfg.callbacks)
    assert monitor.enabled and monitor.compute_every_n_steps == 8 and monitor.compute_at_step_zero
    assert monitor.backend_options == {}  # nothing backend-specific: curvature=<any> still works
    monitor.check_config()
    for name in CURVATURE_FILES:
        swapped = instantiate(_compose(["+preset=demo", f"curvature={name}"]).callbacks)
        assert swapped.compute_every_n_steps == 8 and swapped.backend == name


def test_every_setting_a_config_file_writes_reaches_the_monitor() -> None:
    """The callback file hands the whole curvature group to CurvatureMonitor.from_config: each
    curvature/<backend>.yaml gives a monitor with the signature's defaults except the settings the
    file writes, which arrive as written (a setting dropped on the way would be silently ignored).
    """
    callback = OmegaConf.load(CONFIGS / "callbacks" / "curvature_monitor.yaml")
    assert callback._target_ == "deconcnn_curvature.monitor.CurvatureMonitor.from_config"
    for name in CURVATURE_FILES:
        listed = _listed(name)
        monitor = instantiate(_compose([f"curvature={name}", "curvature.enabled=false"]).callbacks)
        assert _attributes(monitor) == _attributes(CurvatureMonitor(**listed)), name
        for key, value in listed.items():
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(monitor, key) == expected, (name, key)


def _deconcnn_style(tmp_path: Path, with_group: bool) -> Path:
    """A foreign project's config folder with our callback file dropped in unchanged."""
    configs = tmp_path / "configs"
    (configs / "callbacks").mkdir(parents=True)
    shutil.copy(CONFIGS / "callbacks" / "curvature_monitor.yaml", configs / "callbacks")
    defaults = ["  - callbacks: curvature_monitor"]
    if with_group:
        shutil.copytree(CONFIGS / "curvature", configs / "curvature")
        defaults.insert(0, "  - curvature: pyhessian")
    (configs / "config.yaml").write_text(
        "defaults:\n" + "\n".join(defaults) + "\n  - _self_\nepochs: 50\nseed: 0\n"
    )
    return configs


def test_callback_file_works_standalone_in_a_foreign_callbacks_folder(tmp_path: Path) -> None:
    configs = _deconcnn_style(tmp_path, with_group=False)
    cfg = _compose([], configs, name="config")
    monitor = instantiate(cfg.callbacks)
    assert isinstance(monitor, CurvatureMonitor) and monitor.enabled
    # Without a curvature group every setting is CurvatureMonitor's default (written there once;
    # num_hvps None: the backend's own budget).
    assert _attributes(monitor) == _attributes(CurvatureMonitor())
    assert monitor.check_config() == CurvatureMonitor().check_config()
    assert monitor.backend_name == "pyhessian"

    # Settings given as the callback's own arguments (`+`: the file names no keys of its own), or
    # as a curvature group made on the command line.
    tuned = instantiate(_compose(["+callbacks.num_hvps=10"], configs, name="config").callbacks)
    assert tuned.num_hvps == 10
    tuned = instantiate(_compose(["+curvature.num_hvps=12"], configs, name="config").callbacks)
    assert tuned.num_hvps == 12


def test_callback_file_reads_a_dropped_in_curvature_group(tmp_path: Path) -> None:
    configs = _deconcnn_style(tmp_path, with_group=True)
    assert instantiate(_compose([], configs, name="config").callbacks).enabled is False
    cfg = _compose(["curvature.enabled=true", "curvature=hutchpp"], configs, name="config")
    monitor = instantiate(cfg.callbacks)
    assert monitor.enabled and monitor.backend == "hutchpp"


class _InlineLoss:
    """Built lazily (Lightning is imported inside the test): the common shape of other people's
    modules, `self.net` and no forward, the loss computed inline with F.cross_entropy."""

    @staticmethod
    def make():  # type: ignore[no-untyped-def]
        import lightning.pytorch as pl
        import torch
        from torch import nn

        class InlineLoss(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
                self.steps_run = 0

            def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
                self.steps_run += 1
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):  # type: ignore[no-untyped-def]
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return InlineLoss()


def _fit_with_config(monitor: CurvatureMonitor, root: Path):  # type: ignore[no-untyped-def]
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(32, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (32,), generator=g),
    )
    pl.seed_everything(0, verbose=False)
    module = _InlineLoss.make()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
        callbacks=[monitor],
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module


@pytest.mark.parametrize(
    "loss",
    ["curvature.loss_fn=cross_entropy", "curvature.loss_fn={_target_:torch.nn.CrossEntropyLoss}"],
)
def test_a_module_with_an_inline_loss_is_enabled_by_config_alone(tmp_path: Path, loss: str) -> None:
    """The loss and the model come from the shipped callback YAML: no code change."""
    from torch import nn

    overrides = [
        loss,
        "curvature.model_attr=net",
        "curvature.compute_every_n_steps=2",
        "curvature.num_hvps=4",
        "curvature.hessian_batch_size=8",
    ]
    monitor = instantiate(_compose(overrides).callbacks, jsonl=str(tmp_path / "c.jsonl"))
    assert isinstance(monitor.loss_fn, nn.CrossEntropyLoss) and monitor.model_attr == "net"
    _fit_with_config(monitor, tmp_path)
    recs = dcc_monitor.read_curvature_jsonl(tmp_path / "c.jsonl")
    assert [(r["step"], r["error"]) for r in recs] == [(s, None) for s in (2, 2, 4, 4)]
    assert all(r["value"] is not None for r in recs)

    # The same file dropped into a foreign config folder without our curvature group.
    configs = _deconcnn_style(tmp_path / "foreign", with_group=False)
    foreign = instantiate(
        _compose(
            ["+callbacks.loss_fn=mse", "+callbacks.model_attr=net"], configs, name="config"
        ).callbacks
    )
    assert isinstance(foreign.loss_fn, nn.MSELoss) and foreign.model_attr == "net"


def test_without_a_loss_in_the_config_the_run_stops_before_step_one_saying_what_to_set(
    tmp_path: Path,
) -> None:
    cfg = _compose(["curvature.compute_every_n_steps=2", "curvature.hessian_batch_size=8"])
    monitor = instantiate(cfg.callbacks, jsonl=str(tmp_path / "c.jsonl"))
    with pytest.raises(dcc.ConfigurationError, match=r"curvature\.loss_fn=cross_entropy"):
        _fit_with_config(monitor, tmp_path)
    assert not (tmp_path / "c.jsonl").exists()
