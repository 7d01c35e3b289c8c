"""The site's Flower ClientApp: the site's trusted trainer behind the confidential mod.

With the mod (:class:`cleanroom.site_agent.mod.ConfidentialMod`), train and evaluate messages
are answered by the site's protocol (attestation, encryption, budget) and its trusted
trainer. Without it (``confidential=False``) the same trainer serves plaintext messages: the
baseline the benchmarks compare against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cleanroom.errors import ProtocolError
from cleanroom.protocol.flower import (
    ARRAYS_RECORD,
    DP_STEPS,
    METRICS_RECORD,
    SERVER_ROUND,
    TRAIN_LOSS,
    evaluate_metrics,
    numpy_to_arrays,
    records_of,
    single_arrays,
)
from cleanroom.protocol.reports import NUM_EXAMPLES
from cleanroom.protocol.wire import TrainPlan
from cleanroom.site_agent.mod import ConfidentialMod
from cleanroom.site_agent.runtime import SiteRuntime
from cleanroom.site_agent.session import SiteTrainer
from cleanroom.site_agent.settings import RoundSettings, round_seed

log = logging.getLogger(__name__)


def make_client_app(runtime_for: Callable[[Context], SiteRuntime], *, confidential: bool = True,
                    plain_plan: TrainPlan | None = None,
                    plain_settings: RoundSettings | None = None,
                    outer_mods: Sequence[Callable[..., Message]] = (),
                    trainer: SiteTrainer | None = None) -> ClientApp:
    """The site ClientApp; ``confidential=False`` serves plaintext with ``plain_plan`` and
    ``plain_settings`` (the benchmarks' baseline only). ``outer_mods`` wrap everything,
    the confidential mod included (they see only sealed messages). ``trainer``: the site's
    trainer (default: the task trainer; the simulation's fault injection replaces it)."""
    from cleanroom.site_agent.trainers import TaskTrainer

    trainer = trainer if trainer is not None else TaskTrainer()
    mod = ConfidentialMod(runtime_for, trainer) if confidential else None
    app = ClientApp(mods=[*outer_mods, *([mod] if mod else [])])

    def plain() -> tuple[TrainPlan, RoundSettings]:
        if plain_plan is None or plain_settings is None:
            raise ProtocolError("plaintext message to a confidential site (no mod answered it)")
        return plain_plan, plain_settings

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        plan, settings = plain()
        runtime = runtime_for(ctx)
        config = records_of(msg.content, ConfigRecord).get("config", ConfigRecord())
        server_round = int(config.get(SERVER_ROUND, 0))  # type: ignore[arg-type]
        outcome = trainer.train(runtime, plan, single_arrays(msg.content), settings,
                                round_seed(runtime.config.seed, server_round), dict(config))
        values: dict[str, int | float] = {NUM_EXAMPLES: outcome.num_examples,
                                          DP_STEPS: outcome.steps}
        if not settings.dp:
            values[TRAIN_LOSS] = outcome.train_loss
        return Message(RecordDict({ARRAYS_RECORD: numpy_to_arrays(outcome.parameters),
                                   METRICS_RECORD: MetricRecord(values)}), reply_to=msg)  # type: ignore[arg-type]

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        plan, _ = plain()
        report = trainer.evaluate(runtime_for(ctx), plan, single_arrays(msg.content))
        return Message(RecordDict({METRICS_RECORD: evaluate_metrics(report)}), reply_to=msg)

    if mod is not None:
        mod.install(app)
    return app
