"""What ``fit`` prints (a tqdm bar or Keras-like lines) and the sizes ``summary`` shows."""

from __future__ import annotations

import sys


def format_logs(logs: dict) -> str:
    return " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """tqdm bar on a terminal (verbose=1); Keras-like lines otherwise; nothing at 0."""

    def __init__(self, verbose: int, epochs: int, first: int):
        self.verbose, self.epochs, self.first = verbose, epochs, first
        self.bar = None
        if verbose == 1 and sys.stdout.isatty() and epochs > 0:
            from tqdm.auto import tqdm  # only on a terminal: tqdm is not needed otherwise

            self.bar = tqdm(total=epochs, unit="epoch", file=sys.stdout, dynamic_ncols=True)

    def chunk(self, fraction: float, logs: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{fraction:4.0%} {format_logs(logs)}", refresh=True)

    def epoch_end(self, epoch: int, logs: dict, seconds: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(format_logs(logs), refresh=False)
            self.bar.update(1)
        elif self.verbose:
            i = epoch - self.first + 1
            print(
                f"Epoch {i}/{self.epochs} - {seconds * 1e3:.0f}ms - {format_logs(logs)}", flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
