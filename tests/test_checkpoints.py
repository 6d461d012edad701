"""The checkpoint loader: the load_checkpoint hook (plugins first, built-ins last), the reference
run's Lightning checkpoints, state dicts with a model factory, data sources, and every bad file."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch
from checkpoint_helpers import (
    HELPER_MODULE,
    helper_model,
    reference_checkpoint,
    save_state_dict,
    write_fake_cifar,
)
from torch import nn

from deconcnn_curvature import checkpoints, hookimpl, hookspecs
from deconcnn_curvature.checkpoints import (
    CheckpointError,
    LoadedCheckpoint,
    checkpoint_settings,
    import_factory,
    open_checkpoint,
    parse_key_values,
    parse_value,
)
from deconcnn_curvature.checkpoints.data import DataSpec, build_batches
from deconcnn_curvature.errors import ConfigurationError, CurvatureError, PluginError
from deconcnn_curvature.registry import Registry

GENERIC = {"model": f"{HELPER_MODULE}:factory", "data": "synthetic", "input_shape": (12,)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lightning")
    return reference_checkpoint(tmp_path_factory.getbasetemp())


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


# --------------------------------------------------------------------------- generic path


@pytest.mark.parametrize(
    ("prefix", "wrap"),
    [
        ("", None),
        ("model.", "state_dict"),
        ("module.", None),
        ("", "model_state_dict"),
        # A LightningModule holding its network as self.net (or backbone, encoder, ...): the
        # factory builds that network; its keys are the checkpoint's under one submodule name.
        ("net.", "state_dict"),
    ],
    ids=["plain", "lightning-prefixed", "ddp-prefixed", "model_state_dict", "lightning-submodule"],
)
def test_state_dict_with_factory_loads_the_weights(
    workdir: Path, prefix: str, wrap: str | None
) -> None:
    path = save_state_dict(workdir / "w.pt", seed=3, prefix=prefix, wrap=wrap)
    loaded = open_checkpoint(path, {**GENERIC, "batch_size": 5, "num_batches": 2, "seed": 7})
    assert loaded.loader == "builtin:factory"
    _same_weights(loaded.model, helper_model(3))
    assert isinstance(loaded.loss_fn, nn.CrossEntropyLoss)
    expected = build_batches(DataSpec("synthetic", 5, 2, input_shape=(12,), num_classes=3, seed=7))
    assert len(loaded.data) == 2
    for (x, y), (ex, ey) in zip(loaded.data, expected, strict=True):
        torch.testing.assert_close(x, ex, rtol=0, atol=0)
        torch.testing.assert_close(y, ey, rtol=0, atol=0)
    if wrap == "state_dict":
        assert loaded.metadata["epoch"] == 3 and loaded.metadata["global_step"] == 42


def test_factory_arguments_and_mse_targets(workdir: Path) -> None:
    state = helper_model(0, hidden=4, num_classes=5).state_dict()
    torch.save(state, workdir / "w.pt")
    loaded = open_checkpoint(
        workdir / "w.pt",
        {
            **GENERIC,
            "model_args": parse_key_values(["hidden=4", "num_classes=5"]),
            "num_classes": 5,
            "loss": "mse",
            "batch_size": 6,
        },
    )
    assert isinstance(loaded.loss_fn, nn.MSELoss)
    y = loaded.data[0][1]
    assert y.shape == (6, 5) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(dim=1), torch.ones(6))
    assert loaded.model_description == f"{HELPER_MODULE}:factory(hidden=4, num_classes=5)"


def test_import_factory_searches_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_cwd_models.py").write_text("def make():\n    return 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_cwd_models", raising=False)
    assert import_factory("my_cwd_models:make")() == 1
    assert str(tmp_path) not in sys.path  # only while importing
    sys.modules.pop("my_cwd_models", None)


def test_parsers() -> None:
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("0.5") == 0.5 and parse_value("1e-3") == 1e-3
    assert parse_value("True") is True and parse_value("false") is False
    assert parse_value("none") == "none"  # stays text: norm_type=none is a real value
    assert parse_key_values(["a=1", "b=x=y"]) == {"a": 1, "b": "x=y"}
    for bad, match in (
        (["a"], "key=value"),
        (["1a=2"], "identifier"),
        (["a=1", "a=2"], "given twice"),
    ):
        with pytest.raises(ConfigurationError, match=match):
            parse_key_values(bad)
    with pytest.raises(ConfigurationError, match="batch_size must be an integer >= 1"):
        checkpoint_settings(batch_size=0)
    with pytest.raises(ConfigurationError, match="unknown data source 'imagenet'"):
        checkpoint_settings(data="imagenet")
    with pytest.raises(ConfigurationError, match="unknown loss 'hinge'"):
        checkpoint_settings(loss="hinge")
    with pytest.raises(ConfigurationError, match="unknown checkpoint setting"):
        checkpoint_settings(batchsize=3)


# --------------------------------------------------------------------------- bad input


def _write(path: Path, kind: str) -> Path:
    if kind == "truncated":
        save_state_dict(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    return path


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("truncated", r"is not a PyTorch checkpoint, or it is truncated \(.*zip"),
        # weights-only unpickling reports a text file as IndexError, not
        # UnpicklingError; what matters is the one-line reason in parentheses.
        ("text", r"is not a PyTorch checkpoint, or it is truncated \(.*(Unpickling|Index)Error"),
        ("empty", r"is not a PyTorch checkpoint, or it is truncated"),
        ("list", r"holds a list, not a checkpoint"),
    ],
)
def test_unreadable_files(workdir: Path, kind: str, match: str) -> None:
    path = _write(workdir / f"{kind}.pt", kind)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(path, GENERIC)


def test_missing_file_and_directory(workdir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint file .*nope\.ckpt does not exist"):
        open_checkpoint(workdir / "nope.ckpt", GENERIC)
    with pytest.raises(CheckpointError, match="it is a directory"):
        open_checkpoint(workdir, GENERIC)


def test_state_dict_without_model_names_the_option(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path, {"data": "synthetic"})
    message = str(info.value)
    assert "cannot rebuild the model" in message
    assert "bare state dict (4 tensors)" in message
    assert "--model package.module:factory" in message


def test_lightning_checkpoint_of_another_module_names_the_option(workdir: Path) -> None:
    path = workdir / "other.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match=r"hyper_parameters \(lr\) do not name .* --model"):
        open_checkpoint(path, {"data": "synthetic"})


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"model": "no_colon"}, "must look like package.module:factory"),
        ({"model": "no_such_module_xyz:f"}, "cannot import module 'no_such_module_xyz'"),
        ({"model": f"{HELPER_MODULE}:nope"}, "has no attribute 'nope'"),
        ({"model": f"{HELPER_MODULE}:broken"}, "failed: RuntimeError: the factory itself fails"),
        ({"model": f"{HELPER_MODULE}:not_a_module"}, "returned int, not a torch.nn.Module"),
        ({"model_args": {"hidden": 4}}, r"shape mismatch for body.1.bias \(5,\) vs model \(4,\)"),
        ({"model_args": {"bogus": 1}}, "unexpected keyword argument 'bogus'"),
        ({"input_shape": (3, 8, 8)}, "fails on inputs of shape 3,8,8: RuntimeError.*--input-shape"),
        ({"num_classes": 7}, r"returns 3 logits per sample, .* 7 classes; pass --num-classes 3"),
        ({"data": None}, "nothing says which data to measure on; pass --data synthetic-cifar"),
        ({"data": "cifar10"}, "--data cifar10 needs --data-root"),
        ({"data": "synthetic-cifar"}, "makes images of shape 3,12,12.*asked for is 12"),
    ],
)
def test_bad_generic_settings(workdir: Path, settings: dict[str, Any], match: str) -> None:
    path = save_state_dict(workdir / "w.pt")
    with pytest.raises(ConfigurationError, match=match):
        open_checkpoint(path, {**GENERIC, "num_classes": 3, **settings})


def test_weights_that_do_not_fit(workdir: Path) -> None:
    path = workdir / "w.pt"
    state = helper_model(0).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["body.3.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing body\.3\.bias; unexpected extra\.weight"):
        open_checkpoint(path, GENERIC)


# --------------------------------------------------------------------------- data sources


def test_cifar10_folder(workdir: Path) -> None:
    from deconcnn_curvature.training.data import load_cifar10, normalize

    root = write_fake_cifar(workdir / "cifar")
    path = save_state_dict(workdir / "w.pt", seed=0)
    state = helper_model(0, in_features=3 * 32 * 32, num_classes=10).state_dict()
    torch.save(state, path)
    loaded = open_checkpoint(
        path,
        {
            "model": f"{HELPER_MODULE}:factory",
            "model_args": {"in_features": 3072, "num_classes": 10},
            "data": "cifar10",
            "data_root": root,
            "batch_size": 6,
            "num_batches": 2,
        },
    )
    images, labels = load_cifar10(root)
    x = torch.cat([b[0] for b in loaded.data])
    y = torch.cat([b[1] for b in loaded.data])
    torch.testing.assert_close(x, normalize(images[:12].float() / 255))
    torch.testing.assert_close(y, labels[:12])
    with pytest.raises(ConfigurationError, match="exceeds the 40 training images"):
        build_batches(DataSpec("cifar10", 41, root=root))
    with pytest.raises(CurvatureError, match="CIFAR-10 files missing"):
        build_batches(DataSpec("cifar10", 4, root=workdir))


def test_synthetic_batches_are_seeded() -> None:
    a = build_batches(DataSpec("synthetic", 4, 3, input_shape=(2, 5), num_classes=4, seed=1))
    b = build_batches(DataSpec("synthetic", 4, 3, input_shape=(2, 5), num_classes=4, seed=1))
    c = build_batches(DataSpec("synthetic", 4, 3, input_shape=(2, 5), num_classes=4, seed=2))
    assert [x.shape for x, _ in a] == [torch.Size([4, 2, 5])] * 3
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    assert all(int(y.max()) < 4 for _, y in a)
    with pytest.raises(ConfigurationError, match="num_classes must be >= 2"):
        DataSpec("synthetic", num_classes=1)
    with pytest.raises(ConfigurationError, match="input_shape must be one or more positive"):
        DataSpec("synthetic", input_shape=(0,))


# --------------------------------------------------------------------------- reference run


def test_reference_checkpoint_rebuilds_model_and_data(reference: Path) -> None:
    from deconcnn_curvature.training.data import SyntheticCIFAR
    from deconcnn_curvature.training.module import ClassificationModule

    loaded = open_checkpoint(reference, {"data": "synthetic-cifar", "batch_size": 8})
    assert loaded.loader == "builtin:reference"
    assert "small_cnn(width=4, norm_type='batchnorm')" in loaded.model_description
    module = ClassificationModule.load_from_checkpoint(reference, map_location="cpu")
    _same_weights(loaded.model, module.model)
    assert isinstance(loaded.loss_fn, nn.CrossEntropyLoss)
    expected = SyntheticCIFAR(8, seed=0, split="train")
    x, y = loaded.data[0]
    torch.testing.assert_close(x, torch.stack([expected[i][0] for i in range(8)]))
    torch.testing.assert_close(y, expected.labels)
    assert loaded.metadata["epoch"] == 1 and loaded.metadata["global_step"] == 2


def test_reference_checkpoint_uses_its_saved_data_config(reference: Path, tmp_path: Path) -> None:
    from deconcnn_curvature.training.data import SyntheticCIFAR

    ckpt = torch.load(reference, weights_only=False)
    ckpt["datamodule_hyper_parameters"] = {"source": "synthetic", "seed": 3, "root": None}
    torch.save(ckpt, tmp_path / "with_data.ckpt")
    loaded = open_checkpoint(tmp_path / "with_data.ckpt", {"batch_size": 4})  # no --data
    assert loaded.data_description.startswith(
        "synthetic-cifar: reference-run synthetic CIFAR, seed 3;"
    )
    torch.testing.assert_close(loaded.data[0][1], SyntheticCIFAR(4, seed=3).labels)

    root = write_fake_cifar(tmp_path / "cifar")
    del ckpt["datamodule_hyper_parameters"]
    ckpt["hyper_parameters"]["data"] = {"source": "cifar10", "root": str(root)}
    torch.save(ckpt, tmp_path / "cifar.ckpt")
    loaded = open_checkpoint(tmp_path / "cifar.ckpt", {"batch_size": 4})
    assert loaded.data_description.startswith(f"cifar10: CIFAR-10 training images from {root}")
    # --data overrides the saved configuration
    loaded = open_checkpoint(tmp_path / "cifar.ckpt", {"batch_size": 4, "data": "synthetic"})
    assert loaded.data_description.startswith("synthetic: random N(0,1) inputs 3x32x32")


def test_reference_run_folder_config(reference: Path, tmp_path: Path) -> None:
    """`deconcnn-curv train` writes config.yaml next to last.ckpt; its data section is used."""
    from deconcnn_curvature.training.data import SyntheticCIFAR

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_bytes(reference.read_bytes())
    (run / "config.yaml").write_text(
        "seed: 0\ndata:\n  _target_: x.CIFARDataModule\n  source: synthetic\n  seed: 2\n"
        "  synthetic_noise_std: 0.5\n"
    )
    loaded = open_checkpoint(run / "last.ckpt", {"batch_size": 4})
    assert "seed 2;" in loaded.data_description
    expected = SyntheticCIFAR(4, seed=2, noise_std=0.5)
    torch.testing.assert_close(loaded.data[0][0], torch.stack([expected[i][0] for i in range(4)]))
    (run / "config.yaml").write_text("data: [unclosed\n")
    with pytest.raises(
        CheckpointError, match=r"cannot read the run configuration .*ParserError: .*--data"
    ):
        open_checkpoint(run / "last.ckpt", {"batch_size": 4})
    # ... and --data, as the message advises, gets past it
    loaded = open_checkpoint(run / "last.ckpt", {"batch_size": 4, "data": "synthetic"})
    assert loaded.data_description.startswith("synthetic: random N(0,1)")


def test_reference_checkpoint_errors(reference: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing says which data"):
        open_checkpoint(reference, {})
    with pytest.raises(ConfigurationError, match="--model-arg needs --model"):
        open_checkpoint(reference, {"data": "synthetic", "model_args": {"width": 8}})
    ckpt = torch.load(reference, weights_only=False)
    ckpt["hyper_parameters"]["model_name"] = "vgg_nonexistent"
    torch.save(ckpt, tmp_path / "unknown_model.ckpt")
    with pytest.raises(
        CheckpointError, match=r"cannot rebuild the model .*vgg_nonexistent.*--model"
    ):
        open_checkpoint(tmp_path / "unknown_model.ckpt", {"data": "synthetic"})
    ckpt["hyper_parameters"]["model_name"] = "small_cnn"
    ckpt["hyper_parameters"]["model_kwargs"]["width"] = 8
    torch.save(ckpt, tmp_path / "wrong_width.ckpt")
    with pytest.raises(CheckpointError, match="do not fit the model: shape mismatch"):
        open_checkpoint(tmp_path / "wrong_width.ckpt", {"data": "synthetic"})


def test_reference_checkpoint_with_explicit_factory(reference: Path) -> None:
    from deconcnn_curvature.training.module import ClassificationModule

    loaded = open_checkpoint(
        reference,
        {
            "model": "deconcnn_curvature.training.resnet_cifar:small_cnn",
            "model_args": {"width": 4, "norm_type": "batchnorm"},
            "data": "synthetic",
        },
    )
    assert loaded.loader == "builtin:factory"
    _same_weights(loaded.model, ClassificationModule.load_from_checkpoint(reference).model)


# --------------------------------------------------------------------------- the hook


class ToyLoader:
    """A training project's plugin: understands ``.toy`` JSON files (torch cannot read them) and
    torch files with a ``toy_weights`` entry; declines everything else."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    @hookimpl
    def load_checkpoint(self, path: Path, checkpoint: Any, settings: Any) -> Any:
        self.calls.append((path.name, checkpoint is None))
        if path.suffix == ".toy":
            spec = json.loads(path.read_text())
            weight = torch.tensor(spec["weight"])
        elif isinstance(checkpoint, dict) and "toy_weights" in checkpoint:
            weight = checkpoint["toy_weights"]
        else:
            return None
        model = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            model.weight.copy_(weight)
        gen = torch.Generator().manual_seed(settings["seed"])
        x = torch.randn(settings["batch_size"], weight.shape[1], generator=gen)
        y = torch.randint(0, weight.shape[0], (settings["batch_size"],), generator=gen)
        return LoadedCheckpoint(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            data=[(x, y)],
            loader="toy",
            model_description="toy linear",
            data_description=f"toy batch of {settings['batch_size']}",
        )


def test_builtin_loader_is_registered_trylast() -> None:
    manager = Registry.build().manager
    impls = manager.hook.load_checkpoint.get_hookimpls()
    builtin = [i for i in impls if i.plugin_name == "builtin:checkpoints"]
    assert len(builtin) == 1 and builtin[0].trylast


def test_plugin_loader_is_asked_first(workdir: Path) -> None:
    plugin = ToyLoader()
    manager = Registry.build(extra_plugins=(plugin,)).manager
    toy = workdir / "run.toy"
    toy.write_text(json.dumps({"weight": [[1.0, 2.0], [0.5, -1.0], [0.0, 3.0]]}))
    loaded = open_checkpoint(toy, {"batch_size": 4, "seed": 1}, manager=manager)
    assert loaded.loader == "toy" and loaded.data[0][0].shape == (4, 2)
    assert plugin.calls == [("run.toy", True)]  # torch could not read it: checkpoint=None

    torch.save({"toy_weights": torch.eye(3)}, workdir / "toy.pt")
    assert open_checkpoint(workdir / "toy.pt", manager=manager).loader == "toy"

    # Files the plugin declines fall through to the built-in loaders.
    path = save_state_dict(workdir / "w.pt")
    assert open_checkpoint(path, GENERIC, manager=manager).loader == "builtin:factory"
    assert plugin.calls[-1] == ("w.pt", False)


def test_builtin_stays_last_whatever_the_registration_order(workdir: Path) -> None:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(ToyLoader(), name="toy")  # registered *before* the built-in module
    manager.register(checkpoints, name="builtin:checkpoints")
    torch.save({"toy_weights": torch.eye(2)}, workdir / "toy.pt")
    assert open_checkpoint(workdir / "toy.pt", manager=manager).loader == "toy"


class _Raising:
    def __init__(self, exc: Exception | None = None, result: Any = None) -> None:
        self.exc, self.result = exc, result

    @hookimpl
    def load_checkpoint(self, path: Path) -> Any:
        if self.exc is not None:
            raise self.exc
        return self.result


def test_plugin_errors(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    mine = CurvatureError("this is a toy checkpoint from an old version; re-export it")
    manager = Registry.build(extra_plugins=(_Raising(mine),)).manager
    with pytest.raises(CurvatureError, match="re-export it") as info:
        open_checkpoint(path, GENERIC, manager=manager)
    assert info.value is mine

    manager = Registry.build(extra_plugins=(_Raising(KeyError("cfg")),)).manager
    with pytest.raises(PluginError, match=r"inside a load_checkpoint hook .*extra-0.*KeyError"):
        open_checkpoint(path, GENERIC, manager=manager)

    manager = Registry.build(extra_plugins=(_Raising(result="a model"),)).manager
    with pytest.raises(PluginError, match=r"returned str .* must return a .*LoadedCheckpoint"):
        open_checkpoint(path, GENERIC, manager=manager)


def test_plugin_from_an_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (faked) installed distribution's entry point, selected by the environment variable."""
    (tmp_path / "toy_curvature_plugin.py").write_text(
        "from torch import nn\n"
        "from deconcnn_curvature import hookimpl\n"
        "from deconcnn_curvature.checkpoints import LoadedCheckpoint\n"
        "class Loader:\n"
        "    @hookimpl\n"
        "    def load_checkpoint(self, checkpoint):\n"
        "        if not (isinstance(checkpoint, dict) and 'toy_weights' in checkpoint):\n"
        "            return None\n"
        "        w = checkpoint['toy_weights']\n"
        "        return LoadedCheckpoint(\n"
        "            nn.Linear(2, 2), nn.CrossEntropyLoss(), [(w, w[0].long())],\n"
        "            'toy', 'toy linear', 'its own weights')\n"
        "loader = Loader()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_curvature_plugin", raising=False)
    ep = importlib.metadata.EntryPoint(
        name="toy", value="toy_curvature_plugin:loader", group=hookspecs.PROJECT_NAME
    )
    real = importlib.metadata.entry_points

    def fake(**kwargs: Any) -> Any:
        if kwargs.get("group") == hookspecs.PROJECT_NAME:
            return [ep]
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", "toy")
    registry = Registry.build()
    assert not registry.broken
    torch.save({"toy_weights": torch.eye(2)}, tmp_path / "toy.pt")
    assert open_checkpoint(tmp_path / "toy.pt", manager=registry.manager).loader == "toy"
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", "")  # deselected: the built-in refuses it
    with pytest.raises(CheckpointError, match="cannot rebuild the model"):
        open_checkpoint(
            tmp_path / "toy.pt", {"data": "synthetic"}, manager=Registry.build().manager
        )
    sys.modules.pop("toy_curvature_plugin", None)
