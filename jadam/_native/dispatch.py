"""The one place that chooses a native kernel, and the calls into it.

The transforms hand each step here with their plain-JAX path; this module decides, from
the backend, the dtypes, the storages, the hyperparameters and whether the kernel is
built for this CPU (`loader`), whether a C++ kernel computes it instead, and wraps the
custom call so that it behaves like the JAX path (`custom_jvp`, `platform_dependent`):

- `adam_leaf`: Adam on one float32 leaf whose moments are both blockwise 8-bit codes
  (`adam_q8.cc`) or both bf16 rounded stochastically (`adam_bf16.cc`);
- `concatenate`: many leaves into one vector (`concat.cc`), for `FlatLayout.ravel`;
- `packed_step`: `packed_adam`'s in-place step (`packed_adam.cc`).

XLA's CPU backend splits an optimizer step into several loops over memory and
vectorizes the integer-heavy 8-bit and rounding code poorly; each kernel does one pass.
Elsewhere (GPU, TPU), or where a kernel does not apply, the JAX path runs, computing the
same values: the stored codes and bf16 moments match it (no FMA contraction, the same
hash), and the directions agree to float32 rounding (the kernels multiply by the bias
corrections' reciprocals).

An eligible step whose kernel cannot be built warns once per kernel (`NativeFallbackWarning`,
naming the problem) and takes the JAX path; under `JADAM_NATIVE=require` it raises
`NativeError` instead; `JADAM_NATIVE=0` takes the JAX path silently.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jadam import _numerics as nx
from jadam._native import loader
from jadam._native.loader import NativeError
from jadam._storage.quantized import SIGNED_MAP, UNSIGNED_MAP, QuantizedMoment
from jadam._storage.rounding import StochasticRounding, mix

ADAM_Q8 = loader.KERNELS["adam_q8"].symbols["AdamQ8Step"]
ADAM_BF16 = loader.KERNELS["adam_bf16"].symbols["AdamBf16Step"]
CONCAT = loader.KERNELS["concat"].symbols["Concat"]
PACKED = loader.KERNELS["packed_adam"].symbols["AdamTreeStep"]
PACKED_Q8 = loader.KERNELS["packed_adam"].symbols["AdamQ8TreeStep"]

# The kernels divide both moments' block maxima by one `top` and hard-code the formats.
assert SIGNED_MAP.top == UNSIGNED_MAP.top
assert (SIGNED_MAP.emax, UNSIGNED_MAP.emax, SIGNED_MAP.mantissa_bits) == (15, 31, 3)

DEFAULT_THREADS = np.int64(0)  # the kernel's own default, read when it runs

_warned: set[str] = set()


class NativeFallbackWarning(RuntimeWarning):
    """An eligible step takes the plain-JAX path because its native kernel cannot be built."""


def available(name: str) -> bool:
    """Whether kernel `name` is built and loaded here (building it on the first call)."""
    return loader.load(name)


def use(name: str) -> bool:
    """`available(name)` for a step that the kernel would run: warns once per kernel when
    it cannot be built (or raises, under `JADAM_NATIVE=require`)."""
    if loader.load(name):
        return True
    reason = loader.errors.get(name)
    if reason is None:  # switched off: JADAM_NATIVE=0, or forced off in this process
        return False
    if loader.mode() == "require":
        raise NativeError(f"JADAM_NATIVE=require, but native kernel {name} cannot run: {reason}")
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"jadam's native kernel {name} is unavailable, so this step runs on the slower "
            f"plain-JAX path (same results): {reason}\n(Set JADAM_NATIVE=0 to silence this, "
            "or JADAM_NATIVE=require to make it an error; `jadam.native_status()` reports "
            "every kernel.)",
            NativeFallbackWarning,
            stacklevel=2,
        )
    return False


def _leaf_eligible(g, hyper) -> bool:
    """What every per-leaf Adam kernel needs: a non-empty float32 gradient, Python-number
    hyperparameters (baked in as constants) and one device (a custom call would gather
    sharded moments)."""
    return (
        g.dtype == np.float32
        and g.size > 0
        and all(isinstance(x, (int, float)) for x in hyper)
        and jax.device_count() == 1
    )


def _adam_kernel(g, mu, nu, key, mu_store, nu_store, hyper) -> str | None:
    """The kernel for this leaf's Adam step, or None (the JAX path)."""
    if not _leaf_eligible(g, hyper):
        return None
    if (
        isinstance(mu, QuantizedMoment)
        and isinstance(nu, QuantizedMoment)
        and not (mu_store.stochastic or nu_store.stochastic)
        and mu_store.block_size == nu_store.block_size
    ):
        return "adam_q8"
    bf16 = jnp.dtype(jnp.bfloat16)
    if (
        all(isinstance(s, StochasticRounding) for s in (mu_store, nu_store))
        and all(jnp.dtype(s.dtype) == bf16 for s in (mu_store, nu_store))
        and key is not None
    ):
        return "adam_bf16"
    return None


def adam_leaf(
    jax_path, g, mu, nu, *extra, count, key, mu_store, nu_store, b1, b2, eps, eps_root,
    amsgrad, nesterov, eps_on_raw_moment,
):  # fmt: skip
    """(direction, mu, nu, ...) of `scale_by_adam` for one leaf.

    `jax_path(g, mu, nu, *extra, count=count, key=key)` is the transform's own update; a
    kernel computes the same where one applies (both moments q8 with one block size and
    round to nearest, or both bf16 rounded stochastically; no AMSGrad or Nesterov;
    Python-number hyperparameters; one device), on the CPU. `eps_on_raw_moment`: Keras'
    epsilon, `eps / sqrt(1 - b2**t)` after the bias correction.
    """
    kernel = None
    if not (amsgrad or nesterov or extra):
        kernel = _adam_kernel(g, mu, nu, key, mu_store, nu_store, (b1, b2, eps, eps_root))
    if kernel is None or not use(kernel):
        return jax_path(g, mu, nu, *extra, count=count, key=key)

    def reference(g, mu, nu, count, key):
        return jax_path(g, mu, nu, count=count, key=key)

    def native(g, mu, nu, count, key):
        bc1 = nx.one_minus_power(b1, count, jnp.float32)
        bc2 = nx.one_minus_power(b2, count, jnp.float32)
        eps_eff = eps / jnp.sqrt(bc2) if eps_on_raw_moment else eps
        scalars = jnp.stack([1 / bc1, 1 / bc2, jnp.float32(eps_eff)]).astype(jnp.float32)
        decays = dict(
            b1=np.float32(b1), omb1=np.float32(1.0 - b1), b2=np.float32(b2),
            omb2=np.float32(1.0 - b2), eps_root=np.float32(eps_root), threads=DEFAULT_THREADS,
        )  # fmt: skip
        if kernel == "adam_q8":
            call = _q8_call(g, mu, nu, scalars, mu_store.block_size, decays)
        else:
            call = _bf16_call(g, mu, nu, key, scalars, mu_store, nu_store, decays)
        fallback = lambda: reference(g, mu, nu, count, key)
        return jax.lax.platform_dependent(cpu=call, default=fallback)

    # A custom call has no derivative: the JAX path's JVP stands in (the two compute the
    # same function), so `jax.grad` through `update` works.
    fn = jax.custom_jvp(native)
    fn.defjvp(lambda primals, tangents: (fn(*primals), jax.jvp(reference, primals, tangents)[1]))
    return fn(g, mu, nu, count, key)


def _q8_call(g, mu, nu, scalars, block_size, decays):
    def call():
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (g, *mu, *nu))
        ffi = jax.ffi.ffi_call(
            ADAM_Q8, shapes, input_output_aliases={i: i for i in range(5)}, vmap_method="sequential"
        )
        d, mc, ms, vc, vs = ffi(
            g, *mu, *nu, scalars, top=np.float32(SIGNED_MAP.top), block=np.int64(block_size),
            **decays,
        )  # fmt: skip
        return d, QuantizedMoment(mc, ms), QuantizedMoment(vc, vs)

    return call


def _bf16_call(g, mu, nu, key, scalars, mu_store, nu_store, decays):
    def call():
        # Each storage mixes its seed and stream into the leaf's word, as
        # `StochasticRounding.write` does.
        words = jnp.stack([mix(mix(key, s.seed), s.stream) for s in (mu_store, nu_store)])
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (g, mu, nu))
        ffi = jax.ffi.ffi_call(
            ADAM_BF16, shapes, input_output_aliases={0: 0, 1: 1, 2: 2}, vmap_method="sequential"
        )
        return ffi(g, mu, nu, scalars, words.astype(jnp.uint32), **decays)

    return call


def concatenate(parts: list[jax.Array]) -> jax.Array:
    """The 1-D concatenation of `parts` (all of one dtype), flattened in row-major order.

    `jnp.concatenate` of thousands of small arrays is slow on XLA's CPU backend, and where
    XLA fuses it into its consumers each of their loops indexes across all the operands
    again; on one CPU device this is one native copy pass instead, materialised once.
    Differentiable (it is linear: the tangent is the concatenation of the tangents).
    """
    parts = [jnp.asarray(p) for p in parts]
    if len(parts) == 1:
        return parts[0].reshape(-1)
    if len({jnp.dtype(p.dtype) for p in parts}) != 1:
        raise TypeError("concatenate takes parts of one dtype")
    # A handful of parts gain nothing from the call, and XLA may fuse their concatenation.
    # Several devices: the custom call has no sharding rule (XLA would gather every part).
    if len(parts) < 16 or jax.device_count() != 1 or not use("concat"):
        return jnp.concatenate([p.reshape(-1) for p in parts])
    return _native_concat(*parts)


@jax.custom_jvp
def _native_concat(*parts: jax.Array) -> jax.Array:
    size = sum(p.size for p in parts)
    out = jax.ShapeDtypeStruct((size,), parts[0].dtype)
    call = jax.ffi.ffi_call(CONCAT, out, vmap_method="sequential")
    native = lambda: call(*parts, threads=DEFAULT_THREADS)
    flat = lambda: jnp.concatenate([p.reshape(-1) for p in parts])
    return jax.lax.platform_dependent(cpu=native, default=flat)


@_native_concat.defjvp
def _native_concat_jvp(primals, tangents):
    return _native_concat(*primals), jnp.concatenate([t.reshape(-1) for t in tangents])


def packed_step(
    params, mu, nu, scalars, decays, grads, *, b1, b2, eps, eps_root, threads, block, jax_path
):
    """(params, mu, nu) after one `packed_adam` step: its kernel on a CPU backend, else
    `jax_path()`. `mu`, `nu`: flat float32 vectors, or `QuantizedMoment`s of them (blocks
    of `block`); `grads`: the gradient leaves; `scalars`: 1 / (1 - b1^t), 1 / (1 - b2^t),
    -learning rate, weight decay; `decays`: one 0/1 flag per leaf; `threads`: 0 for the
    kernel's default."""
    if not (params.size and jax.default_backend() == "cpu" and use("packed_adam")):
        return jax_path()
    hyper = {
        "b1": np.float32(b1),
        "omb1": np.float32(1.0 - b1),
        "b2": np.float32(b2),
        "omb2": np.float32(1.0 - b2),
        "eps": np.float32(eps),
        "eps_root": np.float32(eps_root),
        "threads": np.int64(threads),
    }
    decays, grads = jnp.asarray(decays), [g.reshape(-1) for g in grads]
    if isinstance(mu, QuantizedMoment):
        out = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, *mu, *nu))
        call = jax.ffi.ffi_call(PACKED_Q8, out, input_output_aliases={i: i for i in range(5)})
        p, *codes = call(
            params, *mu, *nu, scalars, decays, *grads, top=np.float32(SIGNED_MAP.top),
            block=np.int64(block), **hyper,
        )  # fmt: skip
        return p, QuantizedMoment(*codes[:2]), QuantizedMoment(*codes[2:])
    out = (jax.ShapeDtypeStruct(params.shape, jnp.float32),) * 3
    call = jax.ffi.ffi_call(PACKED, out, input_output_aliases={0: 0, 1: 1, 2: 2})
    return tuple(call(params, mu, nu, scalars, decays, *grads, **hyper))
