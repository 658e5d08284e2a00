"""The training engine: one loop that yields progress events, and its parts.

``busseg.engine`` is used by ``training/train.py``, by fine-tuning (:mod:`busseg.finetune`,
the annotation session) and by the napari fine-tune widget; nothing here imports Qt. Modelled
on MONAI's ``engines/`` (a small trainer and an evaluator) and ``handlers/`` (checkpoints,
statistics and early stopping attached to the loop):

``config``
    :class:`TrainConfig`, :class:`ProgressEvent`, :class:`FitResult`, :data:`LOG_COLUMNS`,
    :data:`SELECT_METRICS`, :func:`lr_lambda` (warm-up then cosine schedule).
``loop``
    :func:`fit_iter` (the generator of progress events), :func:`fit`, :func:`drain`,
    :func:`iter_batches`.
``trainer``
    :class:`Trainer`: model placement, loss, AdamW, schedule, loader and one optimiser step.
``evaluation``
    :func:`evaluate_dataset`, :func:`box_click_interactions`, :func:`selection_score`.
``hooks``
    What the loop calls at fixed points: :class:`FrozenEncoder`, :class:`WeightAverage`
    (EMA), :class:`BestSelection`, :class:`EarlyStopping`, :class:`RunWriter` (the run
    folder), and the data-parallel helpers :func:`dist_info`, :func:`distributed_model`,
    :func:`make_sampler`, :func:`seed_everything`.
``state``
    The run folder's files: :func:`save_training_state`, :func:`load_training_state`,
    :func:`resume_state`, :func:`save_weights`, :func:`append_log`, :func:`snapshot`.
``curves``
    :func:`write_curves` (``curves.png``), :data:`CURVES_EVERY_S`.
``guidance``
    :func:`with_guidance`, :func:`tight_box_guidance`, :func:`prompt_simulator` and
    :class:`WithClass` (class targets and class-balanced weights).

Every name above is importable from ``busseg.engine`` itself.
"""

from busseg.engine.config import (
    LOG_COLUMNS,
    SELECT_METRICS,
    FitResult,
    ProgressEvent,
    TrainConfig,
    lr_lambda,
)
from busseg.engine.curves import CURVES_EVERY_S, write_curves
from busseg.engine.evaluation import box_click_interactions, evaluate_dataset, selection_score
from busseg.engine.guidance import WithClass, prompt_simulator, tight_box_guidance, with_guidance
from busseg.engine.hooks import (
    BestSelection,
    EarlyStopping,
    FrozenEncoder,
    RunWriter,
    WeightAverage,
    dist_info,
    distributed_model,
    make_sampler,
    seed_everything,
)
from busseg.engine.loop import drain, fit, fit_iter, iter_batches
from busseg.engine.state import (
    append_log,
    load_training_state,
    resume_state,
    save_training_state,
    save_weights,
    snapshot,
)
from busseg.engine.trainer import Trainer

__all__ = [
    "CURVES_EVERY_S",
    "LOG_COLUMNS",
    "SELECT_METRICS",
    "BestSelection",
    "EarlyStopping",
    "FitResult",
    "FrozenEncoder",
    "ProgressEvent",
    "RunWriter",
    "TrainConfig",
    "Trainer",
    "WeightAverage",
    "WithClass",
    "append_log",
    "box_click_interactions",
    "dist_info",
    "distributed_model",
    "drain",
    "evaluate_dataset",
    "fit",
    "fit_iter",
    "iter_batches",
    "load_training_state",
    "lr_lambda",
    "make_sampler",
    "prompt_simulator",
    "resume_state",
    "save_training_state",
    "save_weights",
    "seed_everything",
    "selection_score",
    "snapshot",
    "tight_box_guidance",
    "with_guidance",
    "write_curves",
]
