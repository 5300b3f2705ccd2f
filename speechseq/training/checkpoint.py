"""Training checkpoints: an orbax ``CheckpointManager`` over ``OUTPUT_DIR/checkpoints/STEP/``, each holding

    state/    the ``TrainState`` (params, optimizer state, step, PRNG key) as an orbax pytree
    meta/     JSON: the data loader's state, the loop's running log values, the run's settings

Saves are asynchronous (the arrays are copied to the host, then written by orbax's threads while training goes on).
orbax writes a step into ``STEP.orbax-checkpoint-tmp*`` and renames it when complete, so a kill, a full disk or any
failed save leaves the earlier checkpoints as they were (a later manager removes the temporary folder). The last
``keep_last`` checkpoints are kept, and the best one by the validation metric whatever its age.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax

from speechseq.errors import CheckpointError, first_line

ITEMS = ("state", "meta")


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state: Any) -> Any:
    """The state with a typed PRNG key as its raw ``uint32`` data (what orbax stores)."""
    return state._replace(rng=jax.random.key_data(state.rng)) if _is_typed_key(state.rng) else state


def from_saveable(saved: Any, like: Any) -> Any:
    """Undo ``to_saveable``: wrap the raw key again when ``like`` (a state or its shapes) holds a typed key."""
    typed = jax.dtypes.issubdtype(like.rng.dtype, jax.dtypes.prng_key)
    return saved._replace(rng=jax.random.wrap_key_data(saved.rng)) if typed else saved


class Checkpoints:
    """Save and restore training checkpoints in ``directory``.

    ``best_metric`` names the validation metric passed to ``save`` that picks the best checkpoint (``best_mode``
    "min" or "max"); ``async_save`` False makes every save complete before ``save`` returns."""

    def __init__(self, directory: str | Path, *, keep_last: int = 2, best_metric: str = "wer",
                 best_mode: str = "min", async_save: bool = True):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(keep_last),
            # BestN keeps the last n of the checkpoints sorted ascending by metric (reverse for "min")
            cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.directory}: cannot open the checkpoints folder ({first_line(e)})") from None

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any], metrics: Mapping[str, float] | None = None
             ) -> None:
        """Start saving ``state`` (a ``TrainState``) and ``meta`` (JSON-able) as checkpoint ``step``;
        ``metrics`` (``{best_metric: value}``, from an evaluation at this step) rank it for keeping the best.
        A failure of this save or of the one before it is a ``CheckpointError`` naming what is still intact."""
        import orbax.checkpoint as ocp

        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        args = ocp.args.Composite(state=ocp.args.StandardSave(to_saveable(state)), meta=ocp.args.JsonSave(dict(meta)))
        try:
            with _interrupt_deferred():
                self.manager.save(step, args=args, metrics=None if metrics is None else dict(metrics))
        except Exception as e:  # orbax re-raises a failed asynchronous save here too
            raise self._failed(step, e) from None

    def wait(self) -> None:
        """Block until the saves in flight are complete; a failed one is a ``CheckpointError``."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(None, e) from None

    def _failed(self, step: int | None, err: BaseException) -> CheckpointError:
        self.manager.reload()  # after a failed save orbax's own list of steps may be wrong: read the folder again
        kept = self.steps()
        intact = f"the previous checkpoint (step {kept[-1]}) is intact" if kept else "no earlier checkpoint exists"
        what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
        return CheckpointError(f"{self.directory}: saving {what} failed ({first_line(err)}); {intact}")

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """(state, meta) of checkpoint ``step``; ``like`` is a state (or ``jax.eval_shape`` of one) giving the
        structure, shapes, dtypes and key kind."""
        import orbax.checkpoint as ocp

        target = jax.eval_shape(to_saveable, like)
        # eval_shape drops shardings: give each leaf its array's, so orbax restores straight into the shards (each
        # process reading its own) rather than whole arrays on one device
        target = jax.tree.map(lambda t, x: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=x.sharding)
                              if isinstance(x, jax.Array) else t, target, like)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise CheckpointError(f"{self.directory / str(step)}: cannot restore the checkpoint ({first_line(e)}); "
                                  "was it written by another model or optimizer setting?") from None
        return from_saveable(out.state, like), dict(out.meta)

    def close(self) -> None:
        """Wait for the saves in flight and stop orbax's threads."""
        self.manager.close()


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Ctrl-C waits until the block ends: orbax's ``save`` call, once started, hands a whole checkpoint to its
    threads rather than a temporary folder that only the next run would remove. A handler the process installed
    itself is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt
