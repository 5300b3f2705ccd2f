"""Scale-out: a device mesh with axes ``data``, ``fsdp`` and ``tensor``, and the shardings of params, optimizer
state and batches derived from the weight table's logical axes through a rules table (t5x / MaxText style).

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    state = init_state_sharded(model.config, model.params, optim, seed=0, mesh=mesh)   # born in its shardings
    train_step = make_sharded_train_step(model.config, optim, StepConfig(accum_steps=2), mesh=mesh)
    state, metrics = train_step(state, batch)          # batch rows over data x fsdp

Params and optimizer moments are sharded over ``fsdp`` (FSDP: XLA gathers each weight where it is used) and over
``tensor`` (heads, MLP, vocabulary); the batch is split over ``data`` x ``fsdp``. Nothing here names a model family:
every sharding comes from ``model.weight_rules(cfg)``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from speechseq import model as M
from speechseq.checkpoints.table import Axes, flatten, logical_axes, unflatten
from speechseq.config import SpeechSeq2SeqConfig
from speechseq.errors import ConfigError
from speechseq.training.optim import OptimConfig
from speechseq.training.step import Batch, Metrics, StepConfig, TrainState, init_state, make_train_step

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
                    rules: Rules = DEFAULT_RULES) -> TrainState:
    """A ``TrainState`` of shardings for ``init_state(model_cfg, ..., optim, ...)``'s state: params and optimizer
    moments from the weight table, step and key replicated (computed from shapes only; nothing is allocated)."""
    params = unflatten({p: jax.ShapeDtypeStruct(r.shape, np.float32) for r in M.weight_rules(model_cfg)
                        for p in r.paths})
    shape = jax.eval_shape(lambda p: init_state(model_cfg, p, optim, 0), params)
    params_sh = param_shardings(model_cfg, mesh, rules, params=shape.params)
    replicated = NamedSharding(mesh, P())
    return TrainState(replicated, params_sh, tree_shardings(shape.opt_state, params_sh, mesh), replicated)


def init_state_sharded(model_cfg: SpeechSeq2SeqConfig, params: Mapping, optim: OptimConfig, seed: int, mesh: Mesh,
                       rules: Rules = DEFAULT_RULES) -> TrainState:
    """``training.init_state`` run under ``jax.jit`` with ``out_shardings``: the state's float32 params, moments
    and key are written straight into their shards (no device holds a whole copy of the state). ``params`` are
    read where they are: loading a checkpoint per shard is not done yet."""
    shardings = state_shardings(model_cfg, optim, mesh, rules)
    return jax.jit(lambda p: init_state(model_cfg, p, optim, seed), out_shardings=shardings)(params)


def make_sharded_train_step(model_cfg: SpeechSeq2SeqConfig, optim: OptimConfig, step: StepConfig = StepConfig(), *,
                            mesh: Mesh, rules: Rules = DEFAULT_RULES
                            ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """``training.make_train_step`` jitted for ``mesh``: the state in and out in ``state_shardings``, the batch
    rows over ``batch_sharding`` (its size must divide by their devices), metrics replicated. Same contract as
    the unsharded step (the state is donated; pass one from ``init_state_sharded``)."""
    shardings = (state_shardings(model_cfg, optim, mesh, rules), batch_sharding(mesh, rules), NamedSharding(mesh, P()))
    return make_train_step(model_cfg, optim, step, shardings=shardings)
