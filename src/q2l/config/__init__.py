"""Configuration: where q2l's config files are, the typed schema every config group starts from
(q2l.config.schemas, q2l.config.commands) and the value rules no type can express
(q2l.config.checks).

`conf/` sits at the top of the repository, where users look for it, and ships inside the package
(`q2l/conf` in a wheel; in a checkout a link to the top-level folder): `CONFIG_DIR` is found
through the installed package, wherever q2l runs from. Users add their own config folders with
Hydra's `--config-dir DIR` (docs/configs.md).

Importing this module registers every schema in Hydra's ConfigStore and the `q2l_now` resolver
that names run directories: anything that composes q2l configs (the commands, tests, notebooks
using hydra.compose) imports it first.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from hydra.core.config_store import ConfigStore

from q2l.config.commands import AttentionConf, EvalConf, ExportConf, PredictConf
from q2l.config.schemas import TrainConf, group_schemas
from q2l.training.rundir import register_resolvers


def _config_dir() -> str:
    """q2l's conf/ folder: inside the installed package, or (a checkout whose link to conf/ was
    not kept, e.g. git on Windows without symlinks) the repository's own."""
    packaged = Path(str(files("q2l") / "conf"))
    if packaged.is_dir():
        return str(packaged.resolve())
    return str(Path(__file__).resolve().parents[3] / "conf")


CONFIG_DIR = _config_dir()


def register_configs() -> None:
    """Put every schema where the YAML files' defaults lists expect it."""
    store = ConfigStore.instance()
    for name, node in [
        ("train_schema", TrainConf),
        ("eval_schema", EvalConf),
        ("predict_schema", PredictConf),
        ("export_schema", ExportConf),
        ("attention_schema", AttentionConf),
    ]:
        store.store(name=name, node=node)
    for group, name, node in group_schemas():
        store.store(group=f"schema/{group}", name=name, node=node)


register_configs()
register_resolvers()
