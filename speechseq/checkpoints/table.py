"""Weight tables: one declarative list of rules per family that drives init, import and export.

A rule ties Hugging Face tensor names (PyTorch layout) to one or more speechseq parameter paths (JAX layout):

* ``hf``: names, the first is written on export, all are accepted on import. ``{i}`` stands for the layer index
  and marks a stacked parameter whose leading axis is the layer; ``{base}`` is the family's base-model prefix
  (filled in by ``prefixed``).
* ``paths``: parameter paths ("decoder/layers/self_attn/q/kernel"). Several paths mean one fused HF tensor
  (GPT-2 ``c_attn``) split evenly along ``split_axis`` of the JAX layout; no path means a name we know and skip
  (a tied copy).
* ``layout``: "identity", "linear" (torch ``Linear`` [out, in] <-> [in, out]) or "conv" (torch ``Conv1d``
  [out, in, k] <-> [k, in, out]).

``load`` and ``save`` below are the only converters; both read the same table, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from speechseq.errors import CheckpointError

Axes = tuple[str | None, ...]


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    paths: tuple[str, ...]
    shape: tuple[int, ...] = ()  # JAX layout of each path, leading layer axis included when stacked
    axes: Axes = ()  # logical axis names, one per dim of ``shape``
    layout: str = "identity"
    init: str | Callable[[tuple[int, ...]], np.ndarray] = "normal"  # a kind below, or shape -> array
    split_axis: int = -1
    dtype: str | None = None  # the HF tensor's dtype where it is not float32 (BatchNorm's int64 num_batches_tracked)
    buffer: bool = False  # a torch buffer (running statistics, rotary table): no gradient, no weight decay

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf[0]

    @property
    def num_layers(self) -> int:
        return self.shape[0] if self.stacked else 1

    def names(self, i: int = 0) -> list[str]:
        return [n.replace("{i}", str(i)) for n in self.hf]


def rule(hf: str | Sequence[str], path: str | Sequence[str], shape: Sequence[int], axes: Axes, *,
         layout: str = "identity", init: str | Callable = "normal", layers: int | None = None, split_axis: int = -1,
         dtype: str | None = None, buffer: bool = False) -> Rule:
    """Build a rule; ``layers`` prepends the stacked layer axis to ``shape`` and ``axes``."""
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    paths = (path,) if isinstance(path, str) else tuple(path)
    if layers is not None:
        shape, axes = (layers, *shape), ("layers", *axes)
    assert len(shape) == len(axes), (hf, shape, axes)
    return Rule(hf, paths, tuple(shape), tuple(axes), layout, init, split_axis, dtype, buffer)


def dense(hf: str, path: str, din: int, dout: int, axes: Axes = ("embed", "mlp"), *, bias: bool = True,
          layers: int | None = None, torch_linear: bool = True) -> list[Rule]:
    """A torch ``Linear`` (or GPT-2 ``Conv1D`` with ``torch_linear=False``) as kernel [din, dout] (+ bias [dout])."""
    layout = "linear" if torch_linear else "identity"
    out = [rule(f"{hf}.weight", f"{path}/kernel", (din, dout), axes, layout=layout, layers=layers)]
    if bias:
        out.append(rule(f"{hf}.bias", f"{path}/bias", (dout,), axes[1:], init="zeros", layers=layers))
    return out


def norm(hf: str, path: str, dim: int, *, layers: int | None = None, axis: str = "embed") -> list[Rule]:
    """LayerNorm / GroupNorm affine parameters as scale and bias [dim]."""
    return [
        rule(f"{hf}.weight", f"{path}/scale", (dim,), (axis,), init="ones", layers=layers),
        rule(f"{hf}.bias", f"{path}/bias", (dim,), (axis,), init="zeros", layers=layers),
    ]


def prefixed(rules: Iterable[Rule], hf_prefix: str, path_prefix: str, base: str = "") -> list[Rule]:
    """The same rules under a parent module (``encoder.`` / ``encoder/``), with ``{base}`` filled in.

    Names that do not start with ``{base}`` (heads, shared embeddings) sit at the causal-LM root and keep only
    ``hf_prefix``.
    """
    return [
        dataclasses.replace(r, hf=tuple(hf_prefix + n.replace("{base}", base) for n in r.hf),
                            paths=tuple(path_prefix + p for p in r.paths))
        for r in rules
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Layout transforms: torch -> jax and back


def _to_jax(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return x.T
    if layout == "conv":
        return x.transpose(2, 1, 0)
    return x


_to_hf = _to_jax  # both transforms are their own inverse


def _hf_shape(r: Rule) -> tuple[int, ...]:
    """Expected shape of one HF tensor (one layer) for rule ``r``."""
    shape = list(r.shape[1:] if r.stacked else r.shape)
    if len(r.paths) > 1:
        shape[r.split_axis] *= len(r.paths)
    if r.layout == "linear":
        shape = shape[::-1]
    elif r.layout == "conv":
        shape = [shape[2], shape[1], shape[0]]
    return tuple(shape)


@dataclass
class LoadReport:
    """What ``load`` found: like transformers' loading info."""

    missing: list[str]  # HF names the model needs that the checkpoint lacks (freshly initialised)
    unexpected: list[str]  # checkpoint names no rule uses
    missing_paths: list[str]  # the parameter paths behind ``missing``


def plan(rules: Sequence[Rule], shapes: Mapping[str, tuple[int, ...]], *, where: str = "checkpoint"
         ) -> tuple[list[list[str] | None], LoadReport]:
    """Match rules to checkpoint names by name and shape only (no tensor data is read).

    Returns, per rule, the checkpoint name of each layer (None where any layer is absent) and the report.
    A shape that disagrees with the table raises a one-line ``CheckpointError`` naming the weight and both shapes.
    """
    used: set[str] = set()
    found_per_rule: list[list[str] | None] = []
    missing: list[str] = []
    missing_paths: list[str] = []
    for r in rules:
        found, absent = [], []
        for i in range(r.num_layers):
            names = r.names(i)
            used.update(n for n in names if n in shapes)
            name = next((n for n in names if n in shapes), None)
            if name is None:
                absent.append(names[0])
            elif r.paths and tuple(shapes[name]) != _hf_shape(r):
                raise CheckpointError(
                    f"{where}: weight '{name}' has shape {tuple(shapes[name])}, the config expects {_hf_shape(r)}")
            found.append(name)
        if not r.paths:
            found_per_rule.append(None)
        elif absent:
            missing.extend(absent)
            missing_paths.extend(r.paths)
            found_per_rule.append(None)
        else:
            found_per_rule.append(found)
    unexpected = sorted(set(shapes) - used)
    return found_per_rule, LoadReport(missing, unexpected, missing_paths)


def load(rules: Sequence[Rule], tensors: Mapping[str, np.ndarray], *, where: str = "checkpoint",
         dtype: np.dtype | None = None, progress: Callable[[Iterable], Iterable] | None = None,
         shapes: Mapping[str, tuple[int, ...]] | None = None,
         place: Callable[[np.ndarray], object] | None = None,
         assemble: Callable[[Rule, Sequence[str], Mapping[str, np.ndarray]], Mapping[str, object]] | None = None,
         ) -> tuple[dict[str, np.ndarray], LoadReport]:
    """Fill parameter paths from HF tensors, one tensor at a time. Returns (flat params, report); the paths of
    missing tensors are absent. ``shapes`` (name -> shape) avoids reading data to plan; ``progress`` wraps the
    iteration over rules (a progress bar); ``dtype`` casts (default: keep the checkpoint's dtype); ``place`` turns
    each finished parameter into what is kept (e.g. ``jax.device_put``), so host copies are freed as it goes.
    ``assemble(rule, names, tensors)`` replaces the stacking of a rule's layers: it returns the rule's params from
    the checkpoint tensors ``names`` of its layers (``sharding.read_shards`` reads them into device shards)."""
    if shapes is None:  # a Checkpoint knows shapes without reading data; a plain dict of arrays is read
        shape_of = getattr(tensors, "shape", None)
        shapes = {k: tuple(shape_of(k)) if callable(shape_of) else np.shape(tensors[k]) for k in tensors}
    found_per_rule, report = plan(rules, shapes, where=where)
    params: dict[str, np.ndarray] = {}
    pairs = list(zip(rules, found_per_rule))
    for r, found in (progress(pairs) if progress else pairs):
        if found is None:
            continue
        if assemble is not None:
            params.update(assemble(r, found, tensors))
            continue
        per_layer: list[list[np.ndarray]] = [[] for _ in r.paths]
        for parts in layer_parts(r, found, tensors):
            for acc, part in zip(per_layer, parts):
                acc.append(part if dtype is None else part.astype(dtype))
        for path, acc in zip(r.paths, per_layer):
            value = np.stack(acc) if r.stacked else np.ascontiguousarray(acc[0])
            params[path] = place(value) if place else value
    return params, report


def layer_parts(r: Rule, found: Sequence[str], tensors: Mapping[str, np.ndarray]) -> Iterator[list[np.ndarray]]:
    """For each layer of rule ``r`` (one for an unstacked rule), in order: its value for each of ``r.paths`` in
    JAX layout (one layer's slice of a stacked param), read from the checkpoint tensor ``plan`` found for it. Only
    one layer's tensor is read at a time."""
    for name in found:
        x = _to_jax(np.asarray(tensors[name]), r.layout)
        yield np.split(x, len(r.paths), axis=r.split_axis) if len(r.paths) > 1 else [x]


def save(rules: Sequence[Rule], params: Mapping[str, np.ndarray], consume: bool = False) -> dict[str, np.ndarray]:
    """HF tensors (PyTorch names and layouts) from flat params; the inverse of ``load``.

    ``consume=True`` pops each parameter from ``params`` (a dict) once converted, so peak memory stays near 1x.
    """
    out: dict[str, np.ndarray] = {}
    for r in rules:
        if not r.paths:
            continue
        arrays = [np.asarray(params.pop(p) if consume else params[p]) for p in r.paths]
        for i in range(r.num_layers):
            parts = [a[i] if r.stacked else a for a in arrays]
            x = np.concatenate(parts, axis=r.split_axis) if len(parts) > 1 else parts[0]
            x = _to_hf(x, r.layout)
            x = np.ascontiguousarray(x if r.dtype is None else x.astype(r.dtype)).reshape(x.shape)  # 0-d stays 0-d
            out[r.names(i)[0]] = x
    return out


def shapes(rules: Sequence[Rule]) -> dict[str, tuple[int, ...]]:
    return {p: r.shape for r in rules for p in r.paths}


def logical_axes(rules: Sequence[Rule]) -> dict[str, Axes]:
    """Logical axis names of every parameter path, for sharding rules."""
    return {p: r.axes for r in rules for p in r.paths}


# ----------------------------------------------------------------------------------------------------------------------
# Flat "a/b/c" dicts <-> nested pytrees


def unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _sinusoidal_positions(shape: tuple[int, ...]) -> np.ndarray:
    """Marian's and Pegasus' fixed position table [rows, dim] (their ``create_weight``, in float64 then float32):
    sin of the even-indexed angles in the first half, cos of the odd-indexed ones in the second."""
    rows, dim = shape
    j = np.arange(dim)
    angles = np.arange(rows)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    return np.concatenate([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=1).astype(np.float32)


def init_params(rules: Sequence[Rule], seed: int, std: float = 0.02,
                only: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Random float32 params for every path (or only the paths in ``only``), as transformers initialises them."""
    return dict(iter_params(rules, seed, std, only))


def iter_params(rules: Sequence[Rule], seed: int, std: float = 0.02,
                only: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``init_params``' (path, value) pairs one at a time, the same values: a caller that places each one (on
    devices, in its shards) never holds the whole model on the host."""
    rng = np.random.default_rng(seed)
    wanted = None if only is None else set(only)
    norms = {p[: -len("weight_g")] + "weight_v" for r in rules for p in r.paths if r.init == "weight_g"}
    directions: dict[str, np.ndarray] = {}  # the weight_v tensors a weight_g is computed from
    inits: dict[str, Callable[[tuple[int, ...]], np.ndarray]] = {
        "zeros": lambda s: np.zeros(s, np.float32),
        "ones": lambda s: np.ones(s, np.float32),
        "normal": lambda s: rng.normal(0.0, std, s).astype(np.float32),
        # kaiming-normal over fan-in = k * in_channels; layout [..., k, in, out]
        "conv": lambda s: rng.normal(0.0, np.sqrt(2.0 / (s[-3] * s[-2])), s).astype(np.float32),
        "sinusoidal": _sinusoidal_positions,
    }
    for r in rules:
        for p in r.paths:
            if wanted is not None and p not in wanted:
                continue
            if r.init == "weight_g":  # weight-norm magnitude: the norm of the matching direction tensor
                continue
            value = r.init(r.shape) if callable(r.init) else inits[r.init](r.shape)
            if p in norms:
                directions[p] = value
            yield p, value
    for r in rules:  # weight_g after its weight_v exists
        for p in r.paths:
            if r.init == "weight_g" and (wanted is None or p in wanted):
                v = directions.get(p[: -len("weight_g")] + "weight_v")
                yield p, (np.sqrt((v**2).sum(axis=(-2, -1), keepdims=True)) if v is not None
                          else np.ones(r.shape, np.float32)).astype(np.float32)
