"""The decoder weights in a decode plan's layout, made once per model and kept beside it (``DecodeLayouts``).

``generate`` reads the decoder weights in its plan's layout (``decoding.plan``): for the CPU plan a second copy of
the decoder, made once per params, dtype and plan rather than on every call (the CPU plan's layout depends on the
steps' rows: packed for the kernels up to ``kernels.MAX_ROWS`` rows, out-major above), so a model used with both
few and many rows keeps one of each. The XLA plan reads the params themselves.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax


class DecodeLayouts:
    """Decode-step layouts of one model's decoder weights, remade when the params or the dtype change."""

    def __init__(self) -> None:
        self._key: tuple | None = None  # (dtype, the decoder's leaves): identity of what the layouts were made from
        self._made: dict[Any, Any] = {}  # decode plan -> decoder params in its layout

    def made(self) -> dict[Any, Any]:
        """The layouts kept now: {decode plan: decoder params in its layout}."""
        return dict(self._made)

    def plan(self, generate_args: tuple) -> Any:
        """The decode plan for ``generate_jit(*generate_args)`` (``decoding.plan.choose``)."""
        from speechseq.decoding.generate import group_size, platform_of
        from speechseq.decoding.plan import XlaPlan, choose

        config, params, x, _, gen, _, dtype = generate_args
        if not x.is_fully_addressable:  # rows spread over processes: XLA's program (the CPU kernels run per host)
            return XlaPlan()
        return choose(platform_of(x), x.shape[0] * group_size(gen))

    def get(self, generate_args: tuple, plan: Any) -> Any:
        """``plan``'s layout for ``generate_jit(*generate_args)``: made on first use, kept while ``params``
        (args[1]) and the dtype (args[6]) stay the same.

        On a first use with single-device arrays the layout is made in a worker thread while this one compiles the
        ``generate`` program for the layout's shapes: tracing and most of XLA's passes use one core, so the layout's
        own small compile and run come nearly free (the abstract lowering is the one the call with the made arrays
        finds in ``jit``'s cache). Sharded params make the layout first.
        """
        from speechseq.decoding.generate import generate_jit, group_size

        config, params, x, _, gen, _, dtype = generate_args
        rows = x.shape[0] * group_size(gen)
        leaves = jax.tree.leaves(params["decoder"])
        key = self._key
        if key is None or key[0] != dtype or len(key[1]) != len(leaves) or not all(
                a is b for a, b in zip(key[1], leaves)):
            self._key, self._made = (dtype, leaves), {}
        if plan in self._made:
            return self._made[plan]
        single = all(len(a.sharding.device_set) == 1 for a in jax.tree.leaves(generate_args)
                     if isinstance(a, jax.Array))
        if single and plan.name == "cpu":
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                made = pool.submit(plan.prepare, config, params, dtype, rows)
                shapes = jax.eval_shape(lambda p: plan.prepare(config, p, dtype, rows), params)
                generate_jit.lower(*generate_args, shapes, plan).compile()  # into jit's cache for the call after
                layout = made.result()
        else:
            layout = plan.prepare(config, params, dtype, rows)
        self._made[plan] = layout
        return layout

    def run(self, generate_args: tuple) -> Any:
        """``generate_jit(*generate_args, layout, plan)``: the program of the plan ``plan()`` chooses, with this
        model's kept layout."""
        from speechseq.decoding.generate import generate_jit

        plan = self.plan(generate_args)
        return generate_jit(*generate_args, self.get(generate_args, plan), plan)
