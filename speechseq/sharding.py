"""Scale-out: a device mesh with axes ``data``, ``fsdp`` and ``tensor``, and the shardings of params, optimizer
state and batches derived from the weight table's logical axes through a rules table (t5x / MaxText style).

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    state = init_state_sharded(model.config, model.params, optim, seed=0, mesh=mesh)   # born in its shardings
    train_step = make_sharded_train_step(model.config, optim, StepConfig(accum_steps=2), mesh=mesh)
    state, metrics = train_step(state, batch)          # batch rows over data x fsdp

Params and optimizer moments are sharded over ``fsdp`` (FSDP: XLA gathers each weight where it is used) and over
``tensor`` (heads, MLP, vocabulary); the batch is split over ``data`` x ``fsdp``. Nothing here names a model family:
every sharding comes from ``model.weight_rules(cfg)``.

``SpeechSeq2Seq.from_pretrained(path, mesh=mesh)`` (``load_sharded``) and ``from_encoder_decoder_pretrained(...,
mesh=mesh)`` load straight into those shardings. Across processes
(``speechseq train --coordinator ...``): ``initialize_distributed`` joins the run, ``global_batch`` turns each
process's rows into one global batch, ``gather`` brings params whole to every host, ``barrier`` waits for all.
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from speechseq import model as M
from speechseq.checkpoints.table import Axes, flatten, logical_axes, unflatten
from speechseq.config import SpeechSeq2SeqConfig
from speechseq.errors import ConfigError
from speechseq.training import ctc
from speechseq.training.optim import OptimConfig
from speechseq.training.step import Batch, Metrics, StepConfig, TrainState, init_state, make_train_step

if TYPE_CHECKING:
    from speechseq.speech_seq2seq import SpeechSeq2Seq

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical axis -> mesh axes, in priority order (flax's ``logical_to_mesh_axes`` semantics): rules are tried in order,
# and a rule shards a tensor's dimension of that logical name when the dimension is not yet sharded, none of the
# rule's mesh axes shards another dimension of the tensor, and the dimension divides by the axes' total size.
# Several rules per logical axis are fallbacks: a bias [heads] takes ``tensor`` where the mesh has one and ``fsdp``
# otherwise, so on an FSDP-only mesh every tensor with a divisible dimension is split, not only kernels.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("embed_out", "fsdp"),
    ("conv_out", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("heads", "fsdp"),
    ("mlp", "fsdp"),
    ("vocab", "fsdp"),
    ("layers", None),  # the scanned layer axis stays whole: each scan step reads one layer's slice
)


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") from "data=2,fsdp=2,tensor=2" or {"fsdp": 4}; an axis not named
    has size 1 and one axis may be -1 (the devices left). Axis types are Auto (XLA propagates shardings), as
    ``generate`` and the training step need. A one-line ``ConfigError`` for a bad spec."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            if not re.fullmatch(r"\s*-?\d+\s*", value):
                raise ConfigError(f"mesh: expected axis=size entries like 'data=2,fsdp=4', got {part!r:.80}")
            sizes[name.strip()] = int(value)
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh: unknown axis {unknown[0]!r}; axes are {list(MESH_AXES)}")
    shape = [sizes.get(a, 1) for a in MESH_AXES]
    if any(not isinstance(s, int) or isinstance(s, bool) or (s < 1 and s != -1) for s in shape) or shape.count(-1) > 1:
        raise ConfigError(f"mesh: axis sizes must be positive integers, at most one of them -1, got {sizes}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices do not divide by {known} ({sizes})")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(f"mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                          f"{len(devices)} are available")
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_names(target: MeshAxes, mesh: Mesh) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple, without those of size 1 (they split nothing)."""
    names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return tuple(n for n in names if mesh.shape[n] > 1)


def logical_to_spec(axes: Axes, shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """The PartitionSpec of one tensor from its logical axes (one name or None per dimension) and shape. Mesh axes
    of size 1 are dropped from a rule; a dimension no rule can take (not divisible, axis already used, no rule)
    stays replicated."""
    assert len(axes) == len(shape), (axes, shape)
    spec: list[MeshAxes] = [None] * len(axes)
    used: set[str] = set()
    for logical, target in rules:
        names = _mesh_names(target, mesh)
        if not names or used & set(names):
            continue
        size = math.prod(mesh.shape[n] for n in names)
        for i, (a, n) in enumerate(zip(axes, shape)):
            if a == logical and spec[i] is None and n % size == 0:
                spec[i] = names[0] if len(names) == 1 else names
                used |= set(names)
                break
    return P(*spec)


def param_shardings(cfg: SpeechSeq2SeqConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    params: Mapping | None = None) -> dict:
    """A tree like the params of ``cfg`` (the weight table's paths) of ``NamedSharding``s; with ``params`` (arrays
    or ``ShapeDtypeStruct``s) the tree of exactly those leaves, e.g. only the trainable ones."""
    table = M.weight_rules(cfg)
    axes = logical_axes(table)
    shapes = {p: r.shape for r in table for p in r.paths}
    paths = shapes if params is None else {p: tuple(v.shape) for p, v in flatten(params).items()}
    out = {}
    for path, shape in paths.items():
        if path not in axes:  # a leaf the table does not know (a user's extra tensor): replicated
            out[path] = NamedSharding(mesh, P())
        else:
            out[path] = NamedSharding(mesh, logical_to_spec(axes[path], shape, mesh, rules))
    return unflatten(out)


def tree_shardings(tree: Any, params_shardings: Mapping, mesh: Mesh) -> Any:
    """Shardings for a pytree whose subtrees mirror the params (optax's state: AdamW's ``mu`` and ``nu``, masks): a
    leaf whose trailing dict keys name a param path (and has at least its sharded rank) takes that param's sharding, anything else
    (step counts, empty masks) is replicated."""
    flat = flatten(params_shardings)

    def one(path: tuple, leaf: Any) -> NamedSharding:
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        for start in range(len(keys)):
            name = "/".join(keys[start:])
            if name in flat and len(flat[name].spec) <= len(np.shape(leaf)):
                return flat[name]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The sharding of every batch array: the leading (batch) axis over the rules' "batch" mesh axes, the rest
    whole. The batch size must divide by their total size."""
    for logical, target in rules:
        if logical == "batch":
            names = _mesh_names(target, mesh)
            return NamedSharding(mesh, P(names if len(names) > 1 else names[0] if names else None))
    return NamedSharding(mesh, P())


def state_shardings(model_cfg: SpeechSeq2SeqConfig, optim: OptimConfig, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES, ctc_head: bool = False) -> TrainState:
    """A ``TrainState`` of shardings for ``init_state(model_cfg, ..., optim, ...)``'s state: params and optimizer
    moments from the weight table, step and key replicated (computed from shapes only; nothing is allocated).
    ``ctc_head``: the params carry ``training.ctc``'s head (replicated)."""
    shapes = {p: r.shape for r in M.weight_rules(model_cfg) for p in r.paths}
    if ctc_head:
        shapes.update(ctc.head_shapes(model_cfg))
    params = unflatten({p: jax.ShapeDtypeStruct(shape, np.float32) for p, shape in shapes.items()})
    shape = jax.eval_shape(lambda p: init_state(model_cfg, p, optim, 0), params)
    params_sh = param_shardings(model_cfg, mesh, rules, params=shape.params)
    replicated = NamedSharding(mesh, P())
    return TrainState(replicated, params_sh, tree_shardings(shape.opt_state, params_sh, mesh), replicated)


def init_state_sharded(model_cfg: SpeechSeq2SeqConfig, params: Mapping, optim: OptimConfig, seed: int, mesh: Mesh,
                       rules: Rules = DEFAULT_RULES) -> TrainState:
    """``training.init_state`` run under ``jax.jit`` with ``out_shardings``: the state's float32 params, moments
    and key are written straight into their shards (no device holds a whole copy of the state). ``params`` are
    read where they are: loading a checkpoint per shard is not done yet."""
    shardings = state_shardings(model_cfg, optim, mesh, rules, ctc_head=ctc.HEAD in params)
    return jax.jit(lambda p: init_state(model_cfg, p, optim, seed), out_shardings=shardings)(params)


def make_sharded_train_step(model_cfg: SpeechSeq2SeqConfig, optim: OptimConfig, step: StepConfig = StepConfig(), *,
                            mesh: Mesh, rules: Rules = DEFAULT_RULES
                            ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """``training.make_train_step`` jitted for ``mesh``: the state in and out in ``state_shardings``, the batch
    rows over ``batch_sharding`` (its size must divide by their devices), metrics replicated. Same contract as
    the unsharded step (the state is donated; pass one from ``init_state_sharded``)."""
    shardings = (state_shardings(model_cfg, optim, mesh, rules, ctc_head=step.ctc_weight > 0), batch_sharding(mesh, rules), NamedSharding(mesh, P()))
    return make_train_step(model_cfg, optim, step, shardings=shardings)


# -- several processes (jax.distributed) -------------------------------------------------------------------------------


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process run (``jax.distributed.initialize``) before jax starts its backends; True when this
    process is one of several. Arguments not given come from the environment: what JAX detects from a launcher
    (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes; ``JAX_COORDINATOR_ADDRESS``) and ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; nothing at all is a single-process run. Arguments incomplete or refused (the coordinator
    unreachable): one-line ``ConfigError``."""
    env = {name: os.environ.get(name, "").strip() for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    for name, text in env.items():  # the counterparts of JAX_COORDINATOR_ADDRESS, which jax reads itself
        if text and not text.isdigit():
            raise ConfigError(f"{name}: expected a non-negative integer, got {text[:40]!r}")
    if num_processes is None and env["JAX_NUM_PROCESSES"]:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env["JAX_PROCESS_ID"]:
        process_id = int(env["JAX_PROCESS_ID"])
    given = any(v is not None for v in (coordinator, num_processes, process_id))
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except ValueError as e:
        if not given and "coordinator_address should be defined" in str(e):
            return False  # no launcher environment: one process
        raise ConfigError(f"--coordinator/--num-processes/--process-id: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # the coordinator unreachable, a process id taken twice, ...
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not given and ("must be called before" in message or "only be called once" in message):
            return jax.process_count() > 1  # a later run in a process that already uses jax (tests, notebooks)
        raise ConfigError(f"jax.distributed.initialize failed ({message[:200]})") from None
    return jax.process_count() > 1


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a batch (``Loader`` rows ``[p*b, (p+1)*b)`` of process p) as global arrays of
    ``process_count * b`` rows in ``sharding``, each device given its slice straight from the host arrays. The
    processes' rows stay in process order, as the one-process batch, when each process's devices hold its own
    block of the batch axis, as ``make_mesh``'s device order (by process) gives; any other layout is a one-line
    ``ConfigError``."""
    p, count = jax.process_index(), jax.process_count()
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        b = local.shape[0]
        shape = (b * count, *local.shape[1:])

        def rows(index: tuple[slice, ...], local: np.ndarray = local, b: int = b, shape: tuple = shape) -> np.ndarray:
            start, stop, _ = index[0].indices(shape[0])
            if start < p * b or stop > (p + 1) * b:
                raise ConfigError(f"mesh: a device of process {p} holds batch rows [{start}, {stop}), outside this "
                                  f"process's [{p * b}, {(p + 1) * b}); order the mesh's devices by process")
            return local[(slice(start - p * b, stop - p * b), *index[1:])]

        out[key] = jax.make_array_from_callback(shape, sharding, rows)
    return out


def gather(tree: Any) -> Any:
    """Every leaf whole, as numpy arrays on this host (``process_allgather``: a collective, call it in every
    process): a global array's value, or the processes' numpy arrays concatenated on axis 0 in process order. For
    the evaluation and the final model of a sharded run."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# -- loading straight into shards --------------------------------------------------------------------------------------


def load_sharded(name_or_path: str | os.PathLike, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, seed: int = 0,
                 dtype: Any = np.float32) -> "SpeechSeq2Seq":
    """``SpeechSeq2Seq.from_pretrained(name_or_path, mesh=mesh, rules=rules)``: every param born in its sharding."""
    from speechseq.speech_seq2seq import SpeechSeq2Seq

    return SpeechSeq2Seq.from_pretrained(name_or_path, dtype=dtype, seed=seed, mesh=mesh, rules=rules)


def put(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array as a float32 global array in ``sharding``, each of this process's devices given its slice."""
    value = np.asarray(value, np.float32)  # params are float32 (``to_tree``)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def read_shards(r: Any, found: Sequence[str], ckpt: Mapping[str, np.ndarray],
                shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """The params of weight rule ``r`` (``checkpoints.table``) in their ``shardings``, from the checkpoint tensors
    ``found`` for its layers: the tensors are read one at a time (``table.layer_parts``) and each distinct slice this
    process's devices hold is copied into its own float32 host buffer, so the host holds one layer's tensor plus
    its devices' shards, never a whole stacked param."""
    from speechseq.checkpoints import table

    L = r.shape[0] if r.stacked else 1
    slices: list[dict[tuple, np.ndarray]] = []  # per path: slice key -> host buffer
    devices: list[dict[jax.Device, tuple]] = []  # per path: device -> slice key
    for p in r.paths:
        index = shardings[p].addressable_devices_indices_map(r.shape)
        keys = {d: tuple(sl.indices(n) for sl, n in zip(idx, r.shape)) for d, idx in index.items()}
        slices.append({k: np.empty([len(range(*b)) for b in k], np.float32) for k in set(keys.values())})
        devices.append(keys)
    read = 0
    for i, parts in enumerate(table.layer_parts(r, found, ckpt)):
        read += 1
        for part, buffers in zip(parts, slices):
            for key, out in buffers.items():
                if not r.stacked:
                    out[...] = part[tuple(slice(*b) for b in key)]
                elif i in (layers := range(*key[0])):
                    out[layers.index(i)] = part[tuple(slice(*b) for b in key[1:])]
    assert read == L, (r.paths, read, L)
    return {p: jax.make_array_from_single_device_arrays(
                r.shape, shardings[p], [jax.device_put(buffers[key], d) for d, key in keys.items()])
            for p, buffers, keys in zip(r.paths, slices, devices)}
