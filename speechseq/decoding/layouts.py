"""The decoder weights in decode-step layout, made once per model and kept beside it (``DecodeLayouts``).

``generate`` reads the decoder weights in their own layout (``generate.prepare_decoder``): a second copy of the
decoder, made once per params and dtype rather than on every call. The layout depends on the steps' rows (the CPU
kernel's packed panels up to ``kernels.MAX_ROWS`` rows, XLA's layout above), so a model used with both few and many
rows keeps one of each.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax


class DecodeLayouts:
    """Decode-step layouts of one model's decoder weights, remade when the params or the dtype change."""

    def __init__(self) -> None:
        self._key: tuple | None = None  # (dtype, the decoder's leaves): identity of what the layouts were made from
        self._made: dict[bool, Any] = {}  # packed for the CPU kernel? -> decoder params in decode layout

    def made(self) -> dict[bool, Any]:
        """The layouts kept now: {packed for the CPU kernel?: decoder params in decode-step layout}."""
        return dict(self._made)

    def get(self, generate_args: tuple) -> Any:
        """The layout for ``generate_jit(*generate_args)``: made on first use, kept while ``params`` (args[1]) and
        the dtype (args[6]) stay the same.

        On a first use with single-device arrays the layout is made in a worker thread while this one compiles the
        ``generate`` program for the layout's shapes: tracing and most of XLA's passes use one core, so the layout's
        own small compile and run come nearly free (the abstract lowering is the one the call with the made arrays
        finds in ``jit``'s cache). Sharded params make the layout first.
        """
        from speechseq import kernels
        from speechseq.decoding.generate import generate_jit, group_size, prepare_decoder

        config, params, x, _, gen, _, dtype = generate_args
        rows = x.shape[0] * group_size(gen)
        packs = rows <= kernels.MAX_ROWS and kernels.available()  # the CPU kernel's layout or XLA's
        leaves = jax.tree.leaves(params["decoder"])
        key = self._key
        if key is None or key[0] != dtype or len(key[1]) != len(leaves) or not all(
                a is b for a, b in zip(key[1], leaves)):
            self._key, self._made = (dtype, leaves), {}
        if packs in self._made:
            return self._made[packs]
        single = all(len(a.sharding.device_set) == 1 for a in jax.tree.leaves(generate_args)
                     if isinstance(a, jax.Array))
        if single:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                made = pool.submit(prepare_decoder, config, params, dtype, rows)
                shapes = jax.eval_shape(lambda p: prepare_decoder(config, p, dtype, rows), params)
                generate_jit.lower(*generate_args, shapes).compile()  # into jit's cache for the call that follows
                layout = made.result()
        else:
            layout = prepare_decoder(config, params, dtype, rows)
        self._made[packs] = layout
        return layout

    def run(self, generate_args: tuple) -> Any:
        """``generate_jit(*generate_args, layout)``: the program with this model's kept layout."""
        from speechseq.decoding.generate import generate_jit

        return generate_jit(*generate_args, self.get(generate_args))
