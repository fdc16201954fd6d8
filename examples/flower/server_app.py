"""The example's ServerApp: FedAdam over hkstore checkpoints, resumed wherever it stopped.

Each round is saved to the checkpoint directory (model archive, FedAdam's moments, the random
states, the metrics); on start, the last completed round is restored and the run continues
from there with the real round numbers, until ``num-server-rounds`` rounds are done in all.
Run it again after it finished and it does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import task
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, Result

import hkstore
from hkstore.integrations.flower import CheckpointedStrategy, resume

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def make_strategy() -> FedAdam:
    """The run's strategy: every client trains and evaluates each round."""
    return FedAdam(fraction_train=1.0, fraction_evaluate=1.0, eta=0.05, eta_l=0.05,
                   beta_1=0.9, beta_2=0.99, tau=1e-3)


def run_server(grid: Grid, *, num_rounds: int, directory: str | Path,
               evaluate_fn: EvaluateFn | None = None) -> Result:
    """Resume the run saved in ``directory`` (or start it) and run it to ``num_rounds``."""
    model = task.make_model()
    checkpointer = hkstore.Checkpointer(directory, keep_last=3,
                                        keep_best=("evaluate.eval_loss", "min", 1))
    with checkpointer:
        strategy = CheckpointedStrategy(make_strategy(), checkpointer, like=model)
        last_round, arrays = resume(checkpointer, strategy, like=model)
        if last_round >= num_rounds:
            return strategy.history()
        return strategy.start(grid, arrays, num_rounds=num_rounds - last_round,
                              train_config=ConfigRecord({"lr": 0.05}), evaluate_fn=evaluate_fn)


def make_app(*, num_rounds: int, directory: str | Path,
             evaluate_fn: EvaluateFn | None = None) -> ServerApp:
    """A ServerApp running :func:`run_server` with these settings."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, num_rounds=num_rounds, directory=directory, evaluate_fn=evaluate_fn)

    return app


#: For ``flwr run``: the settings come from the run config (pyproject.toml).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, num_rounds=int(context.run_config.get("num-server-rounds", 5)),
               directory=str(context.run_config.get("checkpoint-dir", "runs/flower")))
