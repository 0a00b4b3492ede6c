"""Train component: one (system, fold) of the leave-one-session-out study."""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import SERMTL_IMAGE


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def plan_study(params_yaml: str) -> list:
    """The study's (system, fold) items, from the systems and sessions in params.yaml."""
    from sermtl.pipeline_runner import plan_step

    return plan_step(params_yaml)


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def train_system_fold(
    corpus_store: Input[Dataset],
    params_yaml: str,
    system: str,
    fold: int,
    trained_run: Output[Model],
    fold_metrics: Output[Metrics],
) -> None:
    """Train and evaluate with sermtl.training; the run folder holds model, predictions and metrics."""
    from sermtl.pipeline_runner import train_step

    for name, value in train_step(corpus_store.path, params_yaml, system, fold, trained_run.path).items():
        fold_metrics.log_metric(name, value)
