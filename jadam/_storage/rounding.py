"""Stochastic rounding: bf16/f16 optimizer state and bf16 parameters without lost updates.

Rounding `x` to a coarse dtype by drawing the upper or the lower neighbour
with probabilities proportional to the distances makes the rounding unbiased:
`E[round(x)] = x`. A bf16 second moment with `b2 = 0.999` then decays like
the float32 one in expectation, where round-to-nearest freezes it (the change
`0.001 * v` is below half a bf16 ulp, 2**-9 relative), and a bf16 parameter
receives small updates in expectation instead of losing all of them.

Randomness is a pure function of `(seed, step, leaf index)`: a run is exactly
reproducible, and no key lives in the optimizer state.

Connolly, Higham & Mary, "Stochastic Rounding and its Probabilistic Backward
Error Analysis", SIAM J. Sci. Comput. 2021.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx

_ROUNDABLE = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive integers


def _lowbias32(x: jax.Array) -> jax.Array:
    """Chris Wellons' `lowbias32` integer hash: every input bit moves every output bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def mix(word: jax.Array, salt: Any) -> jax.Array:
    """A new uint32 random word from `word` and an integer `salt` (seed, stream, ...)."""
    if isinstance(salt, int):
        salted = jnp.uint32((salt * _GOLDEN) & 0xFFFFFFFF)
    else:
        salted = jnp.asarray(salt).astype(jnp.uint32) * jnp.uint32(_GOLDEN)
    return _lowbias32(jnp.asarray(word, jnp.uint32) ^ salted)


def random_bits(word: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint32 bits for rounding: each position hashed with one uint32 `word`.

    `jax.random.bits` (threefry) costs ~40 ns per word on a CPU core, 20x a
    bf16 Adam step, and compiling one threefry per leaf makes a 200-leaf step
    take a minute to compile; an integer hash of (position, word) fuses into
    the update loop. Good enough to decide rounding directions, not meant for
    cryptography or Monte Carlo.
    """
    count = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _lowbias32((count * jnp.uint32(_GOLDEN)) ^ jnp.asarray(word, jnp.uint32))


def leaf_words(seed: int, stream: int, count: jax.Array, n: int) -> jax.Array:
    """`n` uint32 words, one per leaf, for step `count`: one threefry call for all leaves."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), count)
    return jax.random.bits(key, (n,), jnp.uint32)


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """Round float32 `x` to `dtype` (bfloat16 or float16), unbiased, with PRNG `key`."""
    return round_with_word(x, dtype, jax.random.bits(key, (), jnp.uint32))


def round_with_word(x: jax.Array, dtype: Any, word: jax.Array) -> jax.Array:
    """`stochastic_round` driven by a uint32 `word` instead of a PRNG key.

    bfloat16 is float32 with the low 16 bits dropped: adding 16 uniform random
    bits to the magnitude before truncating rounds up with probability equal
    to the discarded fraction. float16 picks between the two neighbours
    explicitly. Infinities and NaNs pass through.
    """
    dtype = jnp.dtype(dtype)
    x = x.astype(jnp.float32)
    if dtype == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        noise = random_bits(word, x.shape) >> 16
        finite = jnp.isfinite(x)
        mask = jnp.uint32(0xFFFF0000)
        rounded = jnp.where(finite, (bits + noise) & mask, bits & mask)
        high = (rounded >> 16).astype(jnp.uint16)
        # Carrying into the exponent of the largest finite bf16 gives inf, as
        # rounding up past the maximum should.
        out = jax.lax.bitcast_convert_type(high, jnp.bfloat16)
        return jnp.where(jnp.isnan(x), jnp.nan, out)
    if dtype == jnp.float16:
        nearest = x.astype(jnp.float16)
        near32 = nearest.astype(jnp.float32)
        toward = jnp.where(near32 > x, -jnp.inf, jnp.inf).astype(jnp.float16)
        other = jnp.nextafter(nearest, toward)
        gap = other.astype(jnp.float32) - near32
        # Probability of taking `other`: the fraction of the gap x has covered.
        prob = jnp.where(gap != 0, (x - near32) / jnp.where(gap != 0, gap, 1), 0)
        uniform = (random_bits(word, x.shape) >> 8).astype(jnp.float32) * (2.0**-24)
        take = uniform < prob
        return jnp.where(take & jnp.isfinite(x), other, nearest)
    raise ValueError(f"stochastic rounding supports bfloat16 and float16, got {dtype}.")


@dataclasses.dataclass(frozen=True)
class StochasticRounding:
    """Store a moment in bfloat16 or float16, rounded stochastically.

    Pass it as `mu_dtype` or `nu_dtype` to any jadam optimizer. The moment is
    updated in float32 and written back with `stochastic_round`; the random
    bits come from `(seed, step, leaf index)`, so two runs with the same seed
    are identical, and the first and second moments draw different bits.

    Example:
      >>> import jadam
      >>> tx = jadam.adam(1e-3, mu_dtype=jadam.StochasticRounding("bfloat16"),
      ...                 nu_dtype=jadam.StochasticRounding("bfloat16", seed=1))
    """

    dtype: Any = "bfloat16"
    seed: int = 0
    stream: int = 0  # set by the optimizer: 0 for the first moment, 1 for the second

    needs_key = True

    def __post_init__(self):
        try:
            dtype = None if self.dtype is None else jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype not in _ROUNDABLE:
            raise ValueError(
                f"StochasticRounding dtype must be 'bfloat16' or 'float16', got {self.dtype!r}."
            )
        object.__setattr__(self, "seed", nx.check_int("StochasticRounding seed", self.seed))

    def init(self, param: jax.Array) -> jax.Array:
        return jnp.zeros(jnp.shape(param), self.dtype)

    def read(self, stored: jax.Array, dtype: Any) -> jax.Array:
        return stored.astype(dtype)

    def write(self, value: jax.Array, stored: jax.Array, key: Any = None) -> jax.Array:
        if key is None:  # no randomness threaded through: round to nearest
            return value.astype(stored.dtype)
        return round_with_word(value, stored.dtype, mix(mix(key, self.seed), self.stream))


class StochasticRoundUpdatesState(NamedTuple):
    """State of `stochastic_round_updates`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, the key's step component


def stochastic_round_updates(seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Make `optax.apply_updates` round low-precision parameters stochastically.

    Put it last in a chain. For each bfloat16 or float16 parameter it replaces
    the update `u` by `r - p`, where `r` is `p + u` (computed in float32)
    rounded stochastically to the parameter's dtype, so that the ordinary
    `p + update` lands on `r` exactly. Updates smaller than half an ulp of `p`,
    which plain bf16 training silently drops, are applied in expectation.
    float32 and wider parameters pass through untouched.

    The bits come from `(seed, step, leaf index)`: runs are reproducible.

    Example:
      >>> import jax.numpy as jnp, optax, jadam
      >>> tx = optax.chain(jadam.adam(1e-3), jadam.stochastic_round_updates(seed=0))
      >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
      >>> optax.apply_updates(params, updates)["w"].dtype
      dtype(bfloat16)
    """
    seed = nx.check_int("seed", seed)

    def init_fn(params):
        del params
        return StochasticRoundUpdatesState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("stochastic_round_updates needs `params` in update().")
        count = nx.safe_increment(state.count)
        treedef = jax.tree.structure(updates, is_leaf=nx.is_none)
        leaves = treedef.flatten_up_to(updates)
        param_leaves = treedef.flatten_up_to(params)
        words = leaf_words(seed, 2, count, max(len(leaves), 1))
        out = []
        for index, (u, p) in enumerate(zip(leaves, param_leaves, strict=True)):
            if u is None or p is None or jnp.dtype(p.dtype) not in _ROUNDABLE:
                out.append(u)
                continue
            target = p.astype(jnp.float32) + u.astype(jnp.float32)
            rounded = round_with_word(target, p.dtype, words[index])
            delta = rounded.astype(jnp.float32) - p.astype(jnp.float32)
            out.append(delta.astype(u.dtype))
        return treedef.unflatten(out), StochasticRoundUpdatesState(count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
