"""Each monitor default is written once, in ``CurvatureMonitor.__init__``.

``configs/curvature/base.yaml`` lists every setting unset (``null``), each backend file lists only
what differs, and ``configs/callbacks/curvature_monitor.yaml`` hands the whole group to
``CurvatureMonitor.from_config``. Checked with real Hydra composition of the shipped configs (the
train app's compose), real instantiation and tiny real Trainer runs.
"""

from __future__ import annotations

import inspect
import re
import shutil
import warnings
from pathlib import Path

import pytest
from config_helpers import BACKEND_FILES, CONFIGS
from config_helpers import attributes as _attributes
from config_helpers import listed as _listed
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor import CurvatureMonitor, read_curvature_jsonl
from deconcnn_curvature.training.run import compose_config, compose_run_config

PARAMETERS = inspect.signature(CurvatureMonitor).parameters


def test_base_yaml_lists_every_monitor_argument_unset_and_documented() -> None:
    """The reference file and the signature name the same settings (no exception: loss_fn and
    batch_fn take names in a config too); each is unset (null, not ???: see
    test_the_dropped_in_group_survives_strict_config_logging) and carries a comment, except jsonl,
    whose null is a value (no records file): it holds the signature's default."""
    base = OmegaConf.load(CONFIGS / "curvature" / "base.yaml")
    assert set(base) == set(PARAMETERS)
    assert not OmegaConf.missing_keys(base)
    assert base.jsonl == PARAMETERS["jsonl"].default
    assert all(base[key] is None for key in base if key != "jsonl")
    text = (CONFIGS / "curvature" / "base.yaml").read_text()
    for key in base:
        value = "curvature.jsonl" if key == "jsonl" else "null"
        assert re.search(rf"^{key}: {re.escape(value)} +# \S", text, re.M), key


@pytest.mark.parametrize("name", BACKEND_FILES)
def test_each_backend_file_lists_only_what_differs_from_the_signature(name: str) -> None:
    raw = OmegaConf.load(CONFIGS / "curvature" / f"{name}.yaml")
    assert list(raw.defaults) == ["base", "_self_"]
    listed = _listed(name)
    assert set(listed) <= set(PARAMETERS), name
    for key, value in listed.items():
        default = PARAMETERS[key].default
        assert value != (list(default) if isinstance(default, tuple) else default), (name, key)


@pytest.mark.parametrize("name", BACKEND_FILES)
def test_a_setting_the_file_leaves_unset_is_overridden_without_plus(name: str) -> None:
    overrides = [
        f"curvature={name}",
        "curvature.k=3",
        "curvature.log_metrics=false",
        "curvature.seed=7",
        "curvature.data_groups=2",
        "curvature.metric_keys={trace:hess/tr}",
    ]
    monitor = instantiate(compose_config(overrides).callbacks)
    assert monitor.k == 3 and monitor.log_metrics is False and monitor.seed == 7
    assert monitor.data_groups == 2 and monitor.metric_keys["trace"] == "hess/tr"
    # Everything else: the file's value or the signature's default.
    reference = CurvatureMonitor(
        **{**_listed(name), "enabled": True, "k": 3, "log_metrics": False, "seed": 7},
        data_groups=2,
        metric_keys={"trace": "hess/tr"},
    )
    assert _attributes(monitor) == _attributes(reference)


def test_an_unknown_setting_is_a_clear_error_naming_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        CurvatureMonitor.from_config({"num_hvp": 10, "k": 2})
    message = str(info.value)
    assert "unknown setting 'num_hvp'" in message and "curvature.num_hvp" in message
    assert "did you mean num_hvps?" in message
    assert all(key in message for key in PARAMETERS)
    # Through Hydra (a `+` key the shipped configs do not list) the same message.
    cfg = compose_config(["+curvature.num_hvp=10"])
    with pytest.raises(InstantiationException, match="unknown setting 'num_hvp'"):
        instantiate(cfg.callbacks)


def test_the_train_command_reports_an_unknown_setting_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deconcnn_curvature.cli import cli

    result = CliRunner().invoke(
        cli,
        ["train", "model=small_cnn", "data.num_train=16", f"run_dir={tmp_path / 'r'}",
         "+curvature.num_hvp=10"],
    )  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "unknown setting 'num_hvp'" in result.output
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_a_misspelt_setting_without_plus_names_the_valid_ones_not_hydras_append(
    tmp_path: Path,
) -> None:
    """`deconcnn-curv train curvature.num_hvp=3` (no `+`): Hydra's own advice was "To append to
    your config use +curvature.num_hvp=3", which only leads to the unknown-setting error; the
    command now says what is wrong and what the settings are."""
    from click.testing import CliRunner

    from deconcnn_curvature.cli import cli

    result = CliRunner().invoke(
        cli, ["train", "model=small_cnn", f"run_dir={tmp_path / 'r'}", "curvature.num_hvp=3"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "unknown setting 'num_hvp'" in result.output
    assert "did you mean num_hvps?" in result.output
    assert "+curvature.num_hvp" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_explicit_null_stays_null_and_unset_takes_the_default() -> None:
    unset = instantiate(compose_config([]).callbacks)
    assert unset.jsonl == Path("curvature.jsonl") and unset.rtol is None
    null = instantiate(compose_config(["curvature.jsonl=null", "curvature.rtol=0.1"]).callbacks)
    assert null.jsonl is None and null.rtol == 0.1
    assert CurvatureMonitor.from_config({"jsonl": None, "k": None}).jsonl is None
    # The group itself (a DictConfig) works as well as its plain copy.
    direct = CurvatureMonitor.from_config(compose_config(["curvature=hutchpp"]).curvature)
    assert direct.num_hvps == _listed("hutchpp")["num_hvps"]
    assert direct.k == PARAMETERS["k"].default


def test_the_run_config_shows_the_values_the_monitor_uses() -> None:
    """`deconcnn-curv train --cfg` and the saved config.yaml: unset settings filled with the
    signature's defaults; the monitor built from that config is the one built from the group."""
    for name in BACKEND_FILES:
        cfg, _ = compose_run_config([f"curvature={name}"])
        node = cfg.curvature
        assert not any(OmegaConf.is_missing(node, key) for key in node), name
        assert "num_samples" not in node  # the deprecated alias, unset: left out
        text = OmegaConf.to_yaml(cfg, resolve=True)
        assert "???" not in text.split("curvature:")[1].split("\n\n")[0]
        saved = OmegaConf.create(text)
        again = instantiate(saved.callbacks)
        assert _attributes(again) == _attributes(
            instantiate(compose_config([f"curvature={name}"]).callbacks)
        )


def _tiny_module():  # type: ignore[no-untyped-def]
    import lightning.pytorch as pl
    import torch
    from torch import nn

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def _fit(monitor: CurvatureMonitor, root: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(32, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (32,), generator=g),
    )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
        callbacks=[monitor],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(LeafSpec|num_workers|does not have many)")
        trainer.fit(_tiny_module(), DataLoader(data, batch_size=8))


TINY = [
    "curvature.loss_fn=cross_entropy",
    "curvature.model_attr=net",
    "curvature.compute_every_n_steps=2",
    "curvature.hessian_batch_size=8",
    "curvature.quantities=[trace]",
]


def test_num_samples_from_a_config_is_the_deprecated_alias_of_num_hvps(tmp_path: Path) -> None:
    """deconCNN's `curvature.num_samples=50` composes (no `+`), warns, and is the budget spent;
    it replaces the num_hvps the group file sets."""
    cfg, _ = compose_run_config([*TINY, "curvature.num_samples=6"])
    with pytest.warns(DeprecationWarning, match=r"num_samples is deprecated.*num_hvps=6"):
        monitor = instantiate(cfg.callbacks, jsonl=str(tmp_path / "c.jsonl"))
    assert monitor.num_hvps == 6
    _fit(monitor, tmp_path)
    records = read_curvature_jsonl(tmp_path / "c.jsonl")
    assert [(r["step"], r["n_hvp"], r["error"]) for r in records] == [(2, 6, None), (4, 6, None)]


def test_jsonl_null_in_a_config_writes_no_records_file(tmp_path: Path) -> None:
    monitor = instantiate(compose_config([*TINY, "curvature.jsonl=null"]).callbacks)
    assert monitor.jsonl is None
    _fit(monitor, tmp_path)
    assert monitor.measurements == 2
    assert not list(tmp_path.rglob("*.jsonl"))


def test_a_foreign_config_tree_with_the_dropped_in_files(tmp_path: Path) -> None:
    """The README's drop-in: callbacks/curvature_monitor.yaml, curvature/base.yaml and one backend
    file; unlisted settings override without `+`, num_samples works; a backend file without
    base.yaml next to it fails at composition, naming base."""
    configs = tmp_path / "configs"
    (configs / "callbacks").mkdir(parents=True)
    (configs / "curvature").mkdir()
    shutil.copy(CONFIGS / "callbacks" / "curvature_monitor.yaml", configs / "callbacks")
    for name in ("base", "pyhessian"):
        shutil.copy(CONFIGS / "curvature" / f"{name}.yaml", configs / "curvature")
    (configs / "config.yaml").write_text(
        "defaults:\n  - curvature: pyhessian\n  - callbacks: curvature_monitor\n  - _self_\n"
        "epochs: 50\n"
    )
    with initialize_config_dir(str(configs), version_base="1.3"):
        cfg = compose("config", overrides=["curvature.enabled=true", "curvature.k=2"])
        legacy = compose("config", overrides=["curvature.num_samples=50"])
    monitor = instantiate(cfg.callbacks)
    assert monitor.enabled and monitor.k == 2 and monitor.backend == "pyhessian"
    # deconCNN combines monitors (all_monitors.yaml style): the node still builds inside a list.
    combined = OmegaConf.create({"curvature": cfg.curvature, "all": [cfg.callbacks]})
    assert instantiate(combined.all)[0].k == 2
    with pytest.warns(DeprecationWarning, match="num_samples is deprecated"):
        assert instantiate(legacy.callbacks).num_hvps == 50

    (configs / "curvature" / "base.yaml").unlink()
    with (
        initialize_config_dir(str(configs), version_base="1.3"),
        pytest.raises(MissingConfigException, match="base"),
    ):
        compose("config")


def test_resume_reaches_a_setting_the_saved_run_left_at_its_default(tmp_path: Path) -> None:
    cfg, _ = compose_run_config(["curvature=hutchpp"])
    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    resumed, _ = compose_run_config(
        [f"resume={run / 'last.ckpt'}", "curvature.k=2", "curvature.num_samples=9"]
    )
    with pytest.warns(DeprecationWarning, match="num_samples is deprecated"):
        monitor = instantiate(resumed.callbacks)
    assert monitor.k == 2 and monitor.num_hvps == 9 and monitor.backend == "hutchpp"


def test_the_dropped_in_group_survives_strict_config_logging(tmp_path: Path) -> None:
    """A user's own code reads its whole config: wandb's Hydra recipe
    (``OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)``), ``OmegaConf.to_object``,
    ``cfg.curvature.k``, and a callbacks list whose entry hands ``${curvature}`` to
    ``from_config`` under Hydra's default recursive instantiation. None of them may fail on a
    setting the user left at the monitor's default (``???`` made every one raise
    ``MissingMandatoryValue``)."""
    configs = tmp_path / "configs"
    (configs / "callbacks").mkdir(parents=True)
    (configs / "curvature").mkdir()
    shutil.copy(CONFIGS / "callbacks" / "curvature_monitor.yaml", configs / "callbacks")
    for name in ("base", "hutchpp"):
        shutil.copy(CONFIGS / "curvature" / f"{name}.yaml", configs / "curvature")
    (configs / "config.yaml").write_text(
        "defaults:\n  - curvature: hutchpp\n  - callbacks: curvature_monitor\n  - _self_\n"
        "data:\n  batch_size: 32\n"
        "extra:\n  - _target_: deconcnn_curvature.monitor.CurvatureMonitor.from_config\n"
        "    settings: ${curvature}\n"
    )
    overrides = ["curvature.enabled=true", "curvature.hessian_batch_size=${data.batch_size}"]
    with initialize_config_dir(str(configs), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    logged = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(logged, dict) and logged["curvature"]["hessian_batch_size"] == 32
    assert OmegaConf.missing_keys(cfg) == set()
    OmegaConf.to_object(cfg)
    assert cfg.curvature.k is None  # the monitor's default applies
    for monitor in (instantiate(cfg.callbacks), instantiate(cfg.extra)[0]):
        assert monitor.enabled and monitor.backend == "hutchpp" and monitor.k == 1
        assert monitor.hessian_batch_size == 32
        assert monitor.num_hvps == _listed("hutchpp")["num_hvps"]
        assert monitor.jsonl == Path("curvature.jsonl")
        assert monitor.quantities == PARAMETERS["quantities"].default
