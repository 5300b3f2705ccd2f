"""Fine-tuning: a pure, jitted train step (``step.py``) with transformers Trainer's optimizer (``optim.py``).

    from speechseq import training
    state = training.init_state(model.config, model.params, training.OptimConfig(warmup_steps=500), seed=0)
    train_step = training.make_train_step(model.config, optim, training.StepConfig(accum_steps=4))
    state, metrics = train_step(state, batch)
"""

from speechseq.training.optim import OptimConfig
from speechseq.training.step import StepConfig, TrainState, init_state, make_eval_step, make_train_step

__all__ = ["OptimConfig", "StepConfig", "TrainState", "init_state", "make_eval_step", "make_train_step"]

# the loop around the step (``loop.py``), its config file (``config.py``) and checkpoints (``checkpoint.py``)
from speechseq.training.checkpoint import Checkpoints  # noqa: E402
from speechseq.training.config import TrainConfig, load_config  # noqa: E402
from speechseq.training.loop import evaluate, train  # noqa: E402

__all__ += ["Checkpoints", "TrainConfig", "evaluate", "load_config", "train"]
