"""Experiment tracking with MLflow: one run per federated run, metrics per round, artifacts.

Default store: a SQLite database in the output folder (no server to start); pass a URI for a
real MLflow server. Only parameters, metrics, digests and the final (aggregated) model are
logged: never a site's update, a data row or a key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "cleanroom-fl"


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'mlflow.db').resolve()}"


class MlflowTracker:
    """Thin wrapper so the rest of the code does not import MLflow (slow) unless tracking."""

    def __init__(self, tracking_uri: str, artifact_dir: Path, experiment: str = EXPERIMENT,
                 run_name: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        import mlflow

        self.mlflow = mlflow
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        existing = mlflow.get_experiment_by_name(experiment)
        if existing is None:
            location = Path(artifact_dir).resolve().as_uri() if "://" not in str(
                artifact_dir) else str(artifact_dir)
            experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = existing.experiment_id
        self.run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
        self.run_id: str = self.run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace(":", "_"): float(v) for k, v in metrics.items()
                 if v is not None and v == v and abs(float(v)) != float("inf")}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=subdir)

    def log_model(self, model: Any, registered_name: str, input_example: Any) -> None:
        """Log the final (aggregated) torch model and register it in the model registry."""
        import mlflow.pytorch

        # MLflow traces the model with torch.export to infer its signature; torch logs a
        # harmless warning about the batch dimension of the one-row example. Keep it quiet.
        export_log = logging.getLogger("torch._export")
        level = export_log.level
        export_log.setLevel(logging.ERROR)
        try:
            mlflow.pytorch.log_model(model, name="model", registered_model_name=registered_name,
                                     input_example=input_example,
                                     pip_requirements=["torch", "cleanroom-fl"])
        finally:
            export_log.setLevel(level)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


class NullTracker:
    """Tracking switched off (benchmarks)."""

    tracking_uri = ""
    run_id = ""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: Path, subdir: str | None = None) -> None: ...

    def log_model(self, model: Any, registered_name: str, input_example: Any) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...
