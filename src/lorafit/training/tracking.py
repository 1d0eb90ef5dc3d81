"""Experiment trackers (``training_config.report_to``), kept on this machine unless told otherwise.

transformers' own callbacks do the reporting (``report_to: tensorboard | mlflow | wandb``, a list,
``all`` or ``none``, as in ``TrainingArguments``); lorafit adds three things around them:

- a named tracker that is not installed is an error before the model loads, with the pip command;
- each tracker writes into the run folder and stays offline unless the environment says otherwise:
  TensorBoard events in ``tensorboard/`` (or ``logging_dir``), MLflow's file store in ``mlruns/``
  (``MLFLOW_TRACKING_URI`` picks another), W&B in offline mode under ``wandb/`` (``WANDB_MODE``,
  ``WANDB_DIR``; ``wandb sync`` uploads later), MLflow's telemetry and W&B's error reports off;
- the resolved lorafit config (``lorafit_run.yaml``) reaches each tracker next to transformers'
  ``TrainingArguments``: TensorBoard text ``lorafit_config``, MLflow params ``lorafit.SECTION.KEY``
  and the artifact ``lorafit_run.yaml``, W&B config ``lorafit``.

Loss, learning rate and lorafit's tokens/s reach them through the logs (``RunFilesCallback``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lorafit.constants import RUN_CONFIG_NAME
from lorafit.errors import LorafitError, did_you_mean

# report_to name -> (module it imports, what pip installs)
CLIENTS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
_SET_HERE: dict[str, str] = {}  # environment variables lorafit set, and to what


def report_targets(report_to: Any) -> list[str]:
    """The tracker names ``report_to`` asks for (``all``: those transformers finds installed)."""
    names = [report_to] if isinstance(report_to, str) else [str(t) for t in report_to or []]
    if names == ["all"]:
        from transformers.integrations import get_available_reporting_integrations

        return get_available_reporting_integrations()
    return [name for name in names if name != "none"]


def check_report_to(report_to: Any) -> list[str]:
    """The tracker names, each known to transformers and installed; else a ``LorafitError``."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    targets = report_targets(report_to)
    for name in targets:
        if name not in INTEGRATION_TO_CALLBACK:
            raise LorafitError(
                f"training_config.report_to: unknown tracker '{name}'; accepted: none, all, "
                + ", ".join(INTEGRATION_TO_CALLBACK)
                + did_you_mean(name, set(INTEGRATION_TO_CALLBACK))
            )
        module, package = CLIENTS.get(name, (name, name))
        if importlib.util.find_spec(module) is None:
            raise LorafitError(
                f"training_config.report_to: {name} is not installed; pip install {package} "
                "(or pip install 'lorafit[track]' for tensorboard, mlflow and wandb), or set report_to: none"
            )
    return targets


def prepare_trackers(report_to: Any, run_dir: Path, logging_dir: str | None = None) -> list[str]:
    """Point the trackers ``report_to`` names at ``run_dir`` and keep them offline, unless the
    environment already says where they go; returns their names. Call before the Trainer is built:
    transformers' callbacks read these variables then."""
    targets = check_report_to(report_to)
    # TensorBoard events go to run_dir/tensorboard unless logging_dir says otherwise.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logging_dir or run_dir / "tensorboard")
    if "mlflow" in targets:
        _default_env("MLFLOW_TRACKING_URI", (run_dir / "mlruns").absolute().as_uri())
        if os.environ["MLFLOW_TRACKING_URI"] == _SET_HERE.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 refuses a folder store unless asked; a database store needs SQLAlchemy,
            # which mlflow-skinny leaves out.
            _default_env("MLFLOW_ALLOW_FILE_STORE", "true")
        _default_env("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        # MLflowCallback only sets the URI when none is set in this process; an earlier run's
        # would win otherwise.
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    if "wandb" in targets:
        _default_env("WANDB_MODE", "offline")
        _default_env("WANDB_DIR", str(run_dir.absolute()))
        _default_env("WANDB_ERROR_REPORTING", "false")
    return targets


def _default_env(name: str, value: str) -> None:
    """Set ``name`` unless the user did (a value lorafit set for an earlier run is replaced)."""
    if name not in os.environ or os.environ[name] == _SET_HERE.get(name):
        os.environ[name] = _SET_HERE[name] = value


def flat_params(config: dict[str, Any], prefix: str = "lorafit") -> dict[str, str]:
    """``{"lorafit.model.name_or_path": "..."}``: one entry per leaf of the nested config."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name))
        else:
            out[name] = str(value)
    return out


class ConfigToTrackers(TrainerCallback):
    """Hands the resolved lorafit config to the trackers that transformers' callbacks started, and
    ends the W&B run with training (transformers leaves it open until the process exits, so a
    second run in the same process, a test's or a notebook's, would log into the first).

    Added after transformers' reporting callbacks, so that their runs exist when it is called."""

    def __init__(self, config: dict[str, Any], config_yaml: str, callbacks: list[TrainerCallback]) -> None:
        self.config, self.config_yaml = config, config_yaml
        self.callbacks = callbacks  # the Trainer's list: TensorBoard's writer is found there

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from transformers.integrations import TensorBoardCallback

        targets = report_targets(args.report_to)
        for callback in self.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                # markdown: TensorBoard's text tab shows the YAML as a code block
                callback.tb_writer.add_text("lorafit_config", f"```yaml\n{self.config_yaml}```")
        if "mlflow" in targets:
            import mlflow
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

            if mlflow.active_run() is not None:
                params = [
                    (k, v) for k, v in flat_params(self.config).items() if len(v) <= MAX_PARAM_VAL_LENGTH
                ]
                for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                    mlflow.log_params(dict(params[i : i + MAX_PARAMS_TAGS_PER_BATCH]))
                mlflow.log_text(self.config_yaml, RUN_CONFIG_NAME)
        if "wandb" in targets:
            import wandb

            if wandb.run is not None:
                wandb.config.update({"lorafit": self.config}, allow_val_change=True)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and "wandb" in report_targets(args.report_to):
            import wandb

            if wandb.run is not None:
                wandb.finish()
