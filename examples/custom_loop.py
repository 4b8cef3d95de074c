# python examples/custom_loop.py
"""No trainer: a hand-written jitted training loop with jadam's AdamW inside optax.

    optax.chain(clip_by_global_norm, jadam.adamw(schedule))

jadam's optimizers are plain optax GradientTransformations: they chain, take schedules,
and live inside a `lax.scan` epoch like any other. The whole epoch below is one
compiled program over NumPy-shuffled indices, with the train state donated.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

ds = jadam.datasets.load("digits")
x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
batch, epochs = 64, 40
steps_per_epoch = len(ds.x_train) // batch

model = jadam.MLP((128, 10))
params = model.init(jax.random.key(0), x[:1])["params"]

schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=3e-3, warmup_steps=steps_per_epoch,
    decay_steps=epochs * steps_per_epoch, end_value=1e-5,
)  # fmt: skip
tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    jadam.adamw(learning_rate=schedule, weight_decay=1e-4),
)
opt_state = tx.init(params)


def loss_fn(params, xb, yb):
    logits = model.apply({"params": params}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


@functools.partial(jax.jit, donate_argnums=(0, 1))
def train_epoch(params, opt_state, idx):
    def step(carry, rows):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x[rows], y[rows])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), idx)
    return params, opt_state, losses.mean()


@jax.jit
def accuracy(params, xs, ys):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, xs), -1) == ys)


rng = np.random.default_rng(0)
for epoch in range(epochs):
    # NumPy shuffling on the host is ~free; drop the last partial batch.
    idx = rng.permutation(len(ds.x_train))[: steps_per_epoch * batch].reshape(-1, batch)
    params, opt_state, loss = train_epoch(params, opt_state, idx)
    if epoch % 10 == 9:
        print(f"epoch {epoch + 1}: loss {float(loss):.4f}")  # host sync only when logging

acc = float(accuracy(params, ds.x_test, ds.y_test))
print(f"test accuracy {acc:.3f}")
assert acc >= 0.95
