"""The configuration ``deconcnn-curv train`` runs: composed by Hydra, or for a resume, the run's
own ``config.yaml`` with this command's overrides merged on top.

Resume precedence (lowest first), merged by ``OmegaConf.merge``:

1. the run's saved ``config.yaml``;
2. a group choice on this command (``model=small_cnn``, ``curvature=hutchpp``) replaces that whole
   group by the shipped option, as in a fresh run (a ``@package _global_`` option such as
   ``+preset=demo`` replaces every top-level node it changes);
3. ``key=value`` / ``+key=value`` overrides on this command;
4. ``resume=`` and the run folder: the run continues in the checkpoint's folder unless ``run_dir=``
   or ``name=`` is given.

The ``callbacks`` node of a saved config holds a resolved copy of ``curvature`` (its ``settings``):
it is set from the merged ``curvature`` again, so a ``curvature.*`` override reaches the callback.

A saved config is a file from a run folder, which may come from anyone: before anything in it is
instantiated, every ``_target_`` it names (and every ``batch_fn`` import path) must be one that the
shipped configs, the user's own config folder, or this command's overrides name
(:func:`check_targets`); ``--trust-config`` lifts that.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.errors import ConfigurationError

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "ENV_CONFIG_DIR",
    "TRUST_FLAG",
    "UntrustedConfigError",
    "check_targets",
    "compose_config",
    "compose_run_config",
    "default_config_dir",
    "finish_composed_config",
    "known_targets",
    "resume_config",
]

#: Environment variable naming a config folder to use instead of the shipped one.
ENV_CONFIG_DIR = "DECONCNN_CURVATURE_CONFIG_DIR"

#: The command-line flag that lets a resume instantiate what its saved config names.
TRUST_FLAG = "--trust-config"


class UntrustedConfigError(ConfigurationError):
    """A saved config names code that no config of this package or of the user names."""


def _shipped_config_dir() -> Path:
    source = Path(__file__).resolve().parents[2] / "configs"
    if (source / "train.yaml").is_file():  # a source checkout (editable install)
        return source
    return Path(str(resources.files("deconcnn_curvature") / "conf"))


def default_config_dir() -> Path:
    """The folder holding ``train.yaml`` and its groups: ``$DECONCNN_CURVATURE_CONFIG_DIR`` if
    set; else the repository's ``configs/`` in a source checkout; else the copy installed with
    the package (``deconcnn_curvature/conf``)."""
    env = os.environ.get(ENV_CONFIG_DIR)
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "train.yaml").is_file():
            raise ConfigurationError(
                f"${ENV_CONFIG_DIR}={env} has no train.yaml; point it at a folder like the "
                "repository's configs/, or unset it."
            )
        return path
    return _shipped_config_dir()


def _folder(config_dir: str | os.PathLike[str] | None) -> Path:
    return Path(config_dir).resolve() if config_dir is not None else default_config_dir()


def compose_config(
    overrides: Sequence[str] = (), config_dir: str | os.PathLike[str] | None = None
) -> DictConfig:
    """Compose ``train.yaml`` with Hydra overrides (``key=value``, ``group=option``, ``+key=v``).

    Raises :class:`~deconcnn_curvature.errors.ConfigurationError` with Hydra's message when an
    override does not apply (unknown key or group option).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = _folder(config_dir)
    if not (folder / "train.yaml").is_file():
        raise ConfigurationError(f"config folder {folder} has no train.yaml.")
    try:
        with initialize_config_dir(str(folder), version_base="1.3", job_name="deconcnn-curv"):
            return compose("train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        _check_curvature_keys(overrides)  # not Hydra's "use +curvature.num_hvp=3": no such setting
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigurationError(
            f"bad configuration override: {message} (config folder: {folder}; see "
            "`deconcnn-curv train --cfg` for the keys)."
        ) from exc


def _monitor_parameters() -> Any:
    from deconcnn_curvature.monitor import CurvatureMonitor

    return inspect.signature(CurvatureMonitor.__init__).parameters


def _check_curvature_keys(overrides: Sequence[str]) -> None:
    """Raise the monitor's own unknown-setting error (the valid names, a close match) for an
    override ``curvature.<name>=...`` whose name is no monitor setting."""
    from deconcnn_curvature.monitor.settings import settings_kwargs

    accepted = [p for p in _monitor_parameters() if p != "self"]
    for key in override_keys(overrides):
        head, _, rest = key.partition(".")
        name = rest.partition(".")[0]
        if head == "curvature" and name and name not in accepted:
            settings_kwargs(accepted, {name: None}, {})


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The keys of ``key=value`` overrides, without Hydra's ``+``/``++``/``~`` prefixes."""
    return [o.partition("=")[0].lstrip("+~") for o in overrides if "=" in o]


def _expand_home(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep or not value.startswith("~") or "'" in value or '"' in value:
        return override
    return f"{key}='{os.path.expanduser(value)}'"


def compose_run_config(
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike[str] | None = None,
    *,
    trust_config: bool = False,
) -> tuple[DictConfig, list[str]]:
    """The configuration ``deconcnn-curv train OVERRIDES`` runs, and notes to show at start-up.

    On top of :func:`compose_config`: a value starting with ``~`` is expanded to the home folder;
    a resume (``resume=<run>/last.ckpt``) takes the run's own ``config.yaml`` with these overrides
    merged on top (:func:`resume_config`, its ``_target_`` s checked unless ``trust_config``);
    otherwise ``$DECONCNN_CURVATURE_BACKEND`` names the backend when no override does; the
    ``curvature`` settings left unset (``null``) are filled with the monitor's defaults, so
    ``--cfg`` and the saved ``config.yaml`` show the values the run uses.
    """
    overrides = [_expand_home(o) for o in overrides]
    resume = next((o.partition("=")[2] for o in overrides if o.startswith("resume=")), None)
    if resume:
        saved = Path(resume.strip("'\"")).expanduser().parent / "config.yaml"
        if saved.is_file():
            cfg, notes = resume_config(saved, overrides, config_dir)
            if not trust_config:
                check_targets(cfg, saved, overrides, config_dir)
            return _fill_monitor_defaults(cfg), notes
    cfg = compose_config(overrides, config_dir)
    if cfg.get("resume"):
        return _fill_monitor_defaults(cfg), [
            f"no config.yaml next to {cfg.resume}; resuming with the configuration this command "
            "composes (the checkpoint must fit it)."
        ]
    return finish_composed_config(cfg, overrides)


def finish_composed_config(
    cfg: DictConfig, overrides: Sequence[str]
) -> tuple[DictConfig, list[str]]:
    """What a fresh run adds to the config Hydra composed from ``overrides`` (by the compose API,
    or by Hydra's own launcher for a job of a sweep): ``$DECONCNN_CURVATURE_BACKEND``, and the
    monitor's defaults for the unset ``curvature`` settings. Returns the config and notes."""
    notes = _env_backend(cfg, overrides)
    return _fill_monitor_defaults(cfg), notes


def _fill_monitor_defaults(cfg: DictConfig) -> DictConfig:
    """Set each unset ``curvature`` setting to the default of ``CurvatureMonitor``'s signature
    (where the defaults are written, once). A config without a ``curvature`` group is returned as
    it is."""
    from omegaconf import OmegaConf, open_dict

    from deconcnn_curvature.monitor.settings import is_unset

    node = OmegaConf.select(cfg, "curvature", default=None)
    if not OmegaConf.is_dict(node):
        return cfg
    defaults = _monitor_parameters()
    with open_dict(node):
        for key in list(node.keys()):
            if key not in defaults:
                continue
            if OmegaConf.is_missing(node, key) or not is_unset(key, node[key]):
                continue
            if key == "num_samples":
                del node[key]
                continue
            value = _per_backend_default(key, node) or defaults[key].default
            node[key] = list(value) if isinstance(value, tuple) else value
    return cfg


def _per_backend_default(key: str, node: Any) -> Any:
    """The monitor's default of ``key`` for the group's backend where the defaults table gives
    one per backend (``num_hvps``, ``hessian_batch_size``), so ``--cfg`` shows what the run
    uses; ``None`` elsewhere (the signature's default then applies)."""
    from deconcnn_curvature.defaults import MONITOR, default
    from deconcnn_curvature.registry import default_backend_name

    if key not in ("num_hvps", "hessian_batch_size"):
        return None
    backend = node.get("backend") or default_backend_name()
    value = default(key, MONITOR, backend)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ------------------------------------------------------------------ resume


def _groups(config_dir: str | os.PathLike[str] | None) -> set[str]:
    return {p.name for p in _folder(config_dir).iterdir() if p.is_dir()}


def _split(overrides: Sequence[str], groups: set[str]) -> tuple[list[str], list[str], list[str]]:
    """Group choices, ``key=value`` overrides (``+``/``++`` stripped), ``~key`` deletions."""
    chosen, values, deleted = [], [], []
    for override in overrides:
        key, sep, _ = override.partition("=")
        bare = key.lstrip("+~")
        if key.startswith("~"):
            deleted.append(bare)
        elif sep and bare in groups:
            chosen.append(override)
        elif sep:
            values.append(override.lstrip("+"))
    return chosen, values, deleted


def _apply_group_choices(
    saved: DictConfig, chosen: Sequence[str], config_dir: str | os.PathLike[str] | None
) -> None:
    """Replace each group a choice selects by the composed option (precedence step 2)."""
    from omegaconf import OmegaConf

    composed = compose_config(chosen, config_dir)
    plain = compose_config([], config_dir)
    names = {c.partition("=")[0].lstrip("+") for c in chosen}
    for key in composed:
        if key in names or composed.get(key) != plain.get(key):
            OmegaConf.update(saved, str(key), composed[key], merge=False, force_add=True)


def resume_config(
    saved_path: Path, overrides: Sequence[str], config_dir: str | os.PathLike[str] | None
) -> tuple[DictConfig, list[str]]:
    """The run's saved config with this command's overrides on top (see the module docstring
    for the precedence)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    saved = OmegaConf.load(saved_path)
    chosen, values, deleted = _split(overrides, _groups(config_dir))
    _check_known_keys(saved, overrides, config_dir)
    if chosen:
        _apply_group_choices(saved, chosen, config_dir)
    try:
        merged = OmegaConf.merge(saved, OmegaConf.from_dotlist(values))
    except OmegaConfBaseException as exc:
        raise ConfigurationError(f"bad configuration override: {exc}") from exc
    for key in deleted:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(merged, parent) if parent else merged
        if OmegaConf.is_dict(node) and leaf in node:
            del node[leaf]
    merged = _fill_monitor_defaults(merged)  # a newly chosen curvature group's nulls
    _mirror_curvature(merged, override_keys(values))
    named = override_keys(overrides)
    resume = Path(str(merged.resume)).expanduser()
    merged.resume = str(resume)
    if not {"run_dir", "name"} & set(named):
        merged.run_dir = str(resume.parent)  # the run continues in its own folder
    elif "name" in named and "run_dir" not in named:
        merged.run_dir = None
    shown = [o for o in overrides if override_keys([o])[:1] not in (["resume"], ["run_dir"])]
    extra = f" and this command's {' '.join(shown)}" if shown else ""
    return merged, [f"resuming with the run's own configuration ({saved_path}){extra}."]


def _check_known_keys(
    saved: DictConfig, overrides: Sequence[str], config_dir: str | os.PathLike[str] | None
) -> None:
    """A ``key=value`` (no ``+``) for a key neither the saved config nor the shipped one has is a
    typo, refused as Hydra refuses it in a fresh run (``+key=value`` adds a key)."""
    from omegaconf import OmegaConf

    absent = object()
    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~"))]
    missing = [
        key
        for key in override_keys(plain)
        if key not in _groups(config_dir) and OmegaConf.select(saved, key, default=absent) is absent
    ]
    if not missing:
        return
    _check_curvature_keys(plain)  # the monitor's own message for a curvature.* name
    shipped = compose_config([], config_dir)
    for key in missing:
        if OmegaConf.select(shipped, key, default=absent) is absent:
            raise ConfigurationError(
                f"bad configuration override: the run's config has no key {key}; check the "
                f"spelling (`deconcnn-curv train resume=... --cfg` shows the keys), or add it "
                f"with +{key}=..."
            )


def _mirror_curvature(cfg: Any, named: Sequence[str]) -> None:
    """Set the saved ``callbacks.settings`` (a resolved copy of ``curvature``) from the merged
    ``curvature``, unless this command overrides ``callbacks.settings`` itself."""
    from omegaconf import OmegaConf

    if any(n == "callbacks" or n.startswith("callbacks.settings") for n in named):
        return
    curvature = OmegaConf.select(cfg, "curvature", default=None)
    if OmegaConf.is_dict(curvature) and OmegaConf.is_dict(
        OmegaConf.select(cfg, "callbacks.settings", default=None)
    ):
        cfg.callbacks.settings = OmegaConf.create(OmegaConf.to_container(curvature))


# ------------------------------------------------------------------ what a config may build


def _code_references(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """``(key, name)`` of every ``_target_`` in ``node`` and every ``batch_fn`` import path."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key in ("_target_", "batch_fn") and isinstance(value, str) and value.strip():
                yield where, value
            else:
                yield from _code_references(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _code_references(value, f"{path}[{i}]")


def known_targets(config_dirs: Sequence[Path]) -> set[str]:
    """Every ``_target_`` (and ``batch_fn``) named by the YAML files under ``config_dirs``."""
    import yaml

    found: set[str] = set()
    for folder in config_dirs:
        for file in sorted(Path(folder).rglob("*.yaml")):
            try:
                data = yaml.safe_load(file.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            found.update(name for _, name in _code_references(data))
    return found


def _loss_class(name: str) -> bool:
    """``torch.nn.<X>Loss``: a loss class of torch (the documented ``loss_fn`` form)."""
    import torch.nn

    module, _, attr = name.rpartition(".")
    return module in ("torch.nn", "torch.nn.modules.loss") and (
        attr.endswith("Loss") and isinstance(getattr(torch.nn, attr, None), type)
    )


def check_targets(
    cfg: DictConfig,
    saved: Path,
    overrides: Sequence[str],
    config_dir: str | os.PathLike[str] | None,
) -> None:
    """Refuse (:class:`UntrustedConfigError`, one line) a resumed config naming code that neither
    the shipped configs, the user's config folder, this command's overrides, nor torch's loss
    classes name: instantiating it would run whatever the run folder's ``config.yaml`` says."""
    from omegaconf import OmegaConf

    folders = [_shipped_config_dir(), _folder(config_dir)]
    allowed = known_targets(folders)
    allowed.update(name for _, name in _code_references(_given(overrides)))
    plain = OmegaConf.to_container(cfg, resolve=False)
    for where, name in _code_references(plain):
        if name not in allowed and not _loss_class(name):
            raise UntrustedConfigError(
                f"{saved}: {where}={name} is not built by this package's configs or yours, so "
                f"the resume does not run it; if you wrote this config, resume with {TRUST_FLAG} "
                "(or put the option in your --config-dir)."
            )


def _given(overrides: Sequence[str]) -> dict[str, Any]:
    """This command's overrides as a nested dict (what the user typed is theirs to run)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    values = [o.lstrip("+") for o in overrides if "=" in o and not o.startswith("~")]
    try:
        node = OmegaConf.to_container(OmegaConf.from_dotlist(values))
    except OmegaConfBaseException:
        return {}
    return node if isinstance(node, dict) else {}


def _env_backend(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """Apply ``$DECONCNN_CURVATURE_BACKEND`` as the default curvature backend."""
    from omegaconf import OmegaConf

    from deconcnn_curvature.registry import ENV_BACKEND

    env = os.environ.get(ENV_BACKEND)
    if not env:
        return []
    keys = override_keys(overrides)
    if any(k in ("curvature", "curvature.backend", "callbacks", "callbacks.backend") for k in keys):
        backend = OmegaConf.select(cfg, "curvature.backend", default=None)
        return [
            f"curvature backend {backend} (from the command line; ${ENV_BACKEND}={env} unused)."
        ]
    import deconcnn_curvature as dcc

    known = [b["name"] for b in dcc.list_backends()]
    if env not in known:
        raise ConfigurationError(
            f"${ENV_BACKEND}={env} names no registered backend (known: {', '.join(known)}); "
            "unset it or set it to a name from `deconcnn-curv list-backends`."
        )
    OmegaConf.update(cfg, "curvature.backend", env, merge=False, force_add=True)
    return [f"curvature backend {env} (from ${ENV_BACKEND})."]
