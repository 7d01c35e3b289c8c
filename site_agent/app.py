"""The site's Flower ClientApp: DP training and evaluation on the site's own data.

The train and evaluate functions are plain Flower Message-API handlers; confidentiality
(attestation, encryption, budget) is added by :class:`site_agent.mod.ConfidentialMod`, which
hands them the decrypted model and a ``cleanroom.train`` record with the DP settings the site
decided. Without the mod (``confidential=False``) the same app trains on plaintext, which is what
the baseline benchmark measures.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cleanroom.errors import ProtocolError
from cleanroom.protocol.flower import arrays_to_numpy, numpy_to_arrays
from cleanroom.site_agent.mod import (
    METRIC_NOISE,
    METRIC_RATE,
    METRIC_STEPS,
    TRAIN_SETTINGS_RECORD,
    ConfidentialMod,
)
from cleanroom.site_agent.runtime import SiteRuntime

log = logging.getLogger(__name__)


def _arrays(msg: Message) -> OrderedDict[str, np.ndarray]:
    """The model parameters of the message, as float32 (the models' dtype), like
    ``load_state_dict`` would cast them; server optimisers may send float64."""
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise ProtocolError(f"expected one ArrayRecord, found {len(records)}")
    return OrderedDict((k, v.astype(np.float32, copy=False) if v.dtype == np.float64 else v)
                       for k, v in arrays_to_numpy(records[0]).items())


def _settings(msg: Message, plain_defaults: dict[str, object] | None,
              runtime: SiteRuntime) -> dict[str, object]:
    record = msg.content.config_records.get(TRAIN_SETTINGS_RECORD)
    if record is not None:
        return dict(record)
    if plain_defaults is None:
        raise ProtocolError(f"train message has no {TRAIN_SETTINGS_RECORD} record")
    # Plaintext baseline: the same per-site, per-round seed the confidential mod would use.
    config = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    return {**plain_defaults,
            "seed": (runtime.config.seed * 1_000_003 + server_round) % (2**31)}


def make_client_app(runtime_for: Callable[[Context], SiteRuntime], *, confidential: bool = True,
                    plain_settings: dict[str, object] | None = None) -> ClientApp:
    """The site ClientApp; ``confidential=False`` is the plaintext baseline (benchmarks only).

    torch and Opacus are imported only by the handlers that train or evaluate, so answering
    the attestation query (a fresh process per message in deployments) stays light."""
    mod = ConfidentialMod(runtime_for) if confidential else None
    app = ClientApp(mods=[mod] if mod else [])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        from cleanroom.site_agent.training import TrainSettings, train_local

        runtime = runtime_for(ctx)
        s = _settings(msg, plain_settings, runtime)
        strategy_config = msg.content.config_records.get("config", ConfigRecord())
        dp = bool(s["dp"])
        settings = TrainSettings(
            local_steps=int(s["local-steps"]), sample_rate=float(s["sample-rate"]),  # type: ignore[arg-type]
            lr=float(s["lr"]), optimizer=str(s["optimizer"]),  # type: ignore[arg-type]
            momentum=float(s["momentum"]), max_grad_norm=float(s["max-grad-norm"]),  # type: ignore[arg-type]
            noise_multiplier=float(s["noise-multiplier"]) if dp else None,  # type: ignore[arg-type]
            proximal_mu=float(strategy_config.get("proximal-mu", 0.0)))  # type: ignore[arg-type]
        result = train_local(str(s["model"]), _arrays(msg), runtime.data, settings,
                             seed=int(s["seed"]),  # type: ignore[arg-type]
                             secure_noise=bool(s.get("secure-noise", False)))
        values: dict[str, float | int] = {
            "num-examples": result.num_examples, METRIC_STEPS: int(result.steps),
            METRIC_NOISE: float(result.noise_multiplier or 0.0),
            METRIC_RATE: float(result.sample_rate)}
        if not dp:  # the raw training loss is not privatised: only without DP
            values["train-loss"] = float(result.train_loss)
        metrics = MetricRecord(values)
        return Message(RecordDict({"arrays": numpy_to_arrays(result.parameters),
                                   "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate_fn(msg: Message, ctx: Context) -> Message:
        from cleanroom.site_agent.training import evaluate

        runtime = runtime_for(ctx)
        config = msg.content.config_records.get("config", ConfigRecord())
        model = str(config.get("model", (plain_settings or {}).get("model", "logreg")))
        data = runtime.data
        loss, accuracy = evaluate(model, _arrays(msg), data.test_x,
                                  data.test_y)
        return Message(RecordDict({"metrics": MetricRecord({
            "num-examples": data.n_test, "loss": float(loss), "accuracy": float(accuracy)})}),
            reply_to=msg)

    if mod is not None:
        mod.install(app)
    return app
