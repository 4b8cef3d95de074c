"""Blockwise 8-bit moments: 8-bit codes plus one float32 scale per block.

A moment leaf is cut into blocks of `block_size` consecutive elements (in
row-major order); each block stores its largest magnitude as a float32 scale
and each element as an 8-bit code of `x / scale` on a non-linear map:

- the first moment (signed) uses a sign bit and a 7-bit minifloat with
  4 exponent bits and 3 mantissa bits (relative step 1/8, 2**-18 of the
  block's maximum before codes run out);
- the second moment (non-negative) uses all 8 bits for an unsigned minifloat
  with 5 exponent bits and 3 mantissa bits: 32 binades, so small entries in a
  block with a large maximum keep their magnitude to a few percent down to
  2**-34 of it, and a positive entry never rounds to zero (it takes the
  smallest code instead), which would blow up `m / sqrt(v)`.

NaN and infinities stay in the elements that hold them: a block's scale is its
largest *finite* magnitude, so the other entries of the block are unaffected. In
the signed map a NaN or +-inf entry is stored as the reserved code 0x80 (a
negative zero, which is never written otherwise) and reads back as NaN, so that
element's Adam direction stays NaN, as with float32 state. The unsigned map has
no spare code: such an entry is stored as its block's largest value (its element's
first moment carries the NaN).

The codes are encoded and decoded with integer arithmetic on the float32 bit
pattern (no table search), so XLA fuses quantization into the update loop.
Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861,
use a table ("dynamic tree") map to the same end.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jadam import _numerics as nx
from jadam._storage.rounding import mix, random_bits

MIN_BLOCK, MAX_BLOCK = 16, 2**16  # Quantized's block_size range


class QuantizedMoment(NamedTuple):
    """One moment leaf stored in 8 bits (a pytree: jits, checkpoints, shards)."""

    codes: jax.Array  # the parameter's shape, dtype=uint8
    scales: jax.Array  # shape=(ceil(size / block_size),), dtype=float32: per-block scale


@dataclasses.dataclass(frozen=True)
class Minifloat:
    """An 8-bit float format without infinities or NaNs, largest magnitude 2 - 2**-m."""

    exponent_bits: int
    mantissa_bits: int
    signed: bool

    @property
    def emax(self) -> int:
        return 2**self.exponent_bits - 1

    @property
    def top(self) -> float:
        """The largest representable magnitude; a block's absmax maps onto it."""
        return 2.0 - 2.0**-self.mantissa_bits

    @property
    def max_code(self) -> int:
        return 2 ** (self.exponent_bits + self.mantissa_bits) - 1

    @property
    def nan_code(self) -> int | None:
        """The code `quantize` reserves for NaN: 0x80 in the signed map (a negative zero,
        which `encode` never writes); None in the unsigned map, whose 256 codes are all
        values."""
        return 0x80 if self.signed else None

    def encode(self, y: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """Codes (uint32) of float32 `y` with `|y| <= top`, to nearest (or stochastic)."""
        m = self.mantissa_bits
        shift = 23 - m
        mag = jnp.abs(y) if self.signed else jnp.maximum(y, 0)
        bits = jax.lax.bitcast_convert_type(mag, jnp.uint32)
        offset = jnp.uint32((127 - self.emax) << m)
        # Normal range: round the float32 mantissa to m bits (a carry moves into
        # the exponent, which is what rounding up to the next binade means).
        step = noise >> (32 - shift) if noise is not None else jnp.uint32(1 << (shift - 1))
        normal = ((bits + step) >> shift) - offset
        # Subnormal range (exponent field 0): a fixed point of 2**(1 - emax - m).
        sub_unit = 2.0 ** (self.emax - 1 + m)
        if noise is None:
            sub = jnp.round(mag * sub_unit)
        else:
            uniform = (noise >> 8).astype(jnp.float32) * (2.0**-24)
            sub = jnp.floor(mag * sub_unit + uniform)
        small = mag < 2.0 ** (1 - self.emax)
        code = jnp.where(small, sub.astype(jnp.uint32), normal)
        code = jnp.minimum(code, jnp.uint32(self.max_code))
        if self.signed:
            negative = (y < 0) & (code > 0)
            return code | jnp.where(negative, jnp.uint32(1 << 7), jnp.uint32(0))
        # A positive second moment never decodes to 0: that would divide by ~eps.
        return jnp.where((mag > 0) & (code == 0), jnp.uint32(1), code)

    def decode(self, codes: jax.Array) -> jax.Array:
        """float32 values of uint8 `codes`."""
        m = self.mantissa_bits
        c = codes.astype(jnp.uint32)
        mag_code = c & jnp.uint32(0x7F) if self.signed else c
        offset = jnp.uint32((127 - self.emax) << m)
        normal = jax.lax.bitcast_convert_type((mag_code + offset) << (23 - m), jnp.float32)
        sub = mag_code.astype(jnp.float32) * (2.0 ** (1 - self.emax - m))
        mag = jnp.where(mag_code >= (1 << m), normal, sub)
        if self.signed:
            return jnp.where(c >= 128, -mag, mag)
        return mag


_FMAX = float(np.finfo(np.float32).max)

SIGNED_MAP = Minifloat(exponent_bits=4, mantissa_bits=3, signed=True)
UNSIGNED_MAP = Minifloat(exponent_bits=5, mantissa_bits=3, signed=False)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """`x` flattened and zero-padded into rows of `block_size`."""
    flat = x.reshape(-1)
    pad = (-flat.size) % block_size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, block_size)


def _unblock(rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return rows.reshape(-1)[: math.prod(shape)].reshape(shape)


def quantize(
    x: jax.Array, fmt: Minifloat, block_size: int, word: jax.Array | None = None
) -> QuantizedMoment:
    """Blockwise 8-bit codes of float32 `x` (stochastic rounding given a uint32 `word`)."""
    rows = _blocks(x.astype(jnp.float32), block_size)
    finite = jnp.isfinite(rows)
    # The largest finite magnitude: a NaN or infinity must not spoil its whole block.
    absmax = jnp.max(jnp.where(finite, jnp.abs(rows), 0), axis=1)
    scales = absmax / fmt.top
    # Capped where a subnormal scale's reciprocal would overflow (where subnormals are not
    # flushed to zero): a finite entry then never scales to inf, or to NaN (inf * 0).
    inverse = jnp.minimum(1 / jnp.where(scales > 0, scales, 1), _FMAX)
    inverse = jnp.where(scales > 0, inverse, 0)
    noise = None if word is None else random_bits(word, rows.shape)
    codes = fmt.encode(rows * inverse[:, None], noise)
    if fmt.nan_code is not None:  # NaN and +-inf: NaN (else the largest code, as encode does)
        codes = jnp.where(finite, codes, jnp.uint32(fmt.nan_code))
    return QuantizedMoment(_unblock(codes.astype(jnp.uint8), x.shape), scales)


def dequantize(q: QuantizedMoment, fmt: Minifloat, block_size: int) -> jax.Array:
    """float32 values of a `QuantizedMoment`."""
    codes = _blocks(q.codes, block_size)
    rows = fmt.decode(codes) * q.scales[:, None]
    if fmt.nan_code is not None:
        rows = jnp.where(codes == fmt.nan_code, jnp.nan, rows)
    return _unblock(rows, q.codes.shape)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """Store a moment in 8 bits per entry, blockwise (about 1.02 bytes per parameter).

    Pass `"q8"` (this with its defaults) or `Quantized(...)` as `mu_dtype` and/or
    `nu_dtype` to any jadam optimizer. Each stored leaf is a `QuantizedMoment`
    (uint8 codes in the parameter's shape, one float32 scale per block); leaves
    with fewer than `min_size` entries stay float32, where 8 bits save little.

    The map follows the moment: signed 4-exponent/3-mantissa codes for the first
    moment, unsigned 5-exponent/3-mantissa codes for the second (see the module
    docstring). `stochastic=True` rounds the codes stochastically (unbiased,
    seeded by `(seed, step, leaf index)`), at the price of drawing random bits
    every step; the default rounds to nearest, as bitsandbytes does.

    Args:
      block_size: entries sharing one float32 scale (256: 1/64 byte of scale each),
        an int in [16, 65536]; powers of two are not required.
      min_size: leaves smaller than this stay float32 (4096 = 16 blocks), an int >= 0.
      stochastic: round codes stochastically instead of to nearest (a bool).
      seed: seed of the stochastic rounding (an int).

    Raises `ValueError` naming the argument for anything else.

    Example:
      >>> import jadam
      >>> tx = jadam.adam(1e-3, mu_dtype="q8", nu_dtype="q8")
      >>> tx = jadam.adamw(1e-3, mu_dtype=jadam.Quantized(block_size=128), nu_dtype="q8")
    """

    block_size: int = 256
    min_size: int = 4096
    stochastic: bool = False
    seed: int = 0
    signed: bool = True  # set by the optimizer: True for mu_dtype, False for nu_dtype
    stream: int = 0  # set by the optimizer: the random stream of this moment

    def __post_init__(self):
        # Bounded: a leaf is padded to whole blocks, so a huge block would make a
        # 10-entry leaf allocate the whole block (gigabytes at 2**31).
        block = nx.check_int("block_size", self.block_size, MIN_BLOCK, MAX_BLOCK)
        object.__setattr__(self, "block_size", block)
        object.__setattr__(self, "min_size", nx.check_int("min_size", self.min_size, 0))
        object.__setattr__(self, "stochastic", nx.check_flag("stochastic", self.stochastic))
        object.__setattr__(self, "seed", nx.check_int("seed", self.seed))

    @property
    def needs_key(self) -> bool:
        return self.stochastic

    @property
    def format(self) -> Minifloat:
        return SIGNED_MAP if self.signed else UNSIGNED_MAP

    def quantizes(self, param: Any) -> bool:
        return math.prod(np.shape(param)) >= max(self.min_size, 1)

    def init(self, param: jax.Array) -> Any:
        if not self.quantizes(param):
            return jnp.zeros(jnp.shape(param), jnp.float32)
        blocks = -(-math.prod(param.shape) // self.block_size)
        return QuantizedMoment(jnp.zeros(param.shape, jnp.uint8), jnp.zeros((blocks,), jnp.float32))

    def read(self, stored: Any, dtype: Any) -> jax.Array:
        if not isinstance(stored, QuantizedMoment):
            return stored.astype(dtype)
        return dequantize(stored, self.format, self.block_size).astype(dtype)

    def write(self, value: jax.Array, stored: Any, key: Any = None) -> Any:
        if not isinstance(stored, QuantizedMoment):
            return value.astype(stored.dtype)
        word = None
        if key is not None and self.stochastic:
            word = mix(mix(key, self.seed), self.stream)
        return quantize(value, self.format, self.block_size, word)
