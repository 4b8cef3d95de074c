# python examples/digits_serve.py
"""Train on 8x8 digit images, save, then load in a FRESH process and classify images.

The fresh process uses only `jadam.load_exported` (a `jax.export` artifact: serialized
StableHLO plus a JSON sidecar): it needs neither the model's Python code nor the
trainer, and loading it executes nothing from the file.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np

import jadam

SERVE = r"""
import sys
import numpy as np
import jadam

model = jadam.load_exported(sys.argv[1])        # no model code, no pickle
images = np.load(sys.argv[2])                   # (n, 8, 8) raw pixel values 0..16
meta = model.metadata                           # standardization stored at export time
x = (images.reshape(len(images), -1) - np.array(meta["mean"])) / np.array(meta["std"])
probs = model(x.astype(np.float32))
for row in probs:
    print(int(row.argmax()), f"{row.max():.3f}")
"""

ds = jadam.datasets.load("digits")
trainer = jadam.Trainer(jadam.MLP((64, 10)), "adam", loss="sparse_categorical_crossentropy")
trainer.fit(ds.x_train, ds.y_train, epochs=30, validation_data=(ds.x_val, ds.y_val), verbose=0)
acc = trainer.evaluate(ds.x_test, ds.y_test)["accuracy"]
print(f"test accuracy {acc:.3f}")

with tempfile.TemporaryDirectory() as tmp:
    trainer.save(os.path.join(tmp, "checkpoint"))
    path = os.path.join(tmp, "digits.jaxexport")
    trainer.export(path, metadata={"mean": ds.mean.tolist(), "std": ds.std.tolist()})

    raw = (ds.x_test[:8] * ds.std + ds.mean).reshape(-1, 8, 8)  # back to raw images
    np.save(os.path.join(tmp, "images.npy"), raw)
    for img in raw[:2]:  # what the images look like
        print(
            "\n".join("".join(" .:-=+*#%@"[min(int(v) * 10 // 17, 9)] for v in row) for row in img)
        )
        print()
    out = subprocess.run(
        [sys.executable, "-c", SERVE, path, os.path.join(tmp, "images.npy")],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    predicted = [int(v) for v in out[::2]]
    print("fresh process predicts:", predicted)
    print("true labels:           ", ds.y_test[:8].tolist())
    # The same as predict in this process:
    assert predicted == trainer.predict(ds.x_test[:8]).argmax(1).tolist()

    # The checkpoint rebuilds the whole trainer (model config is JSON, arrays checksummed).
    again = jadam.Trainer.load(os.path.join(tmp, "checkpoint"))
    assert np.array_equal(again.predict(ds.x_test), trainer.predict(ds.x_test))

assert acc >= 0.95
