"""Training-loop recipe: save every N steps, keep the 3 newest + the best 1, resume after
preemption.

    python examples/train_loop.py --dir /tmp/run --steps 300
    python examples/train_loop.py --dir /tmp/run --steps 300 --preempt-at 170  # dies at 170
    python examples/train_loop.py --dir /tmp/run --steps 300                   # resumes

The "model" is a linear regression trained with SGD in numpy; any framework works the same
way (torch / jax arrays are saved through DLPack or __array__).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import numpy as np

import streamckpt.sync as sc


@dataclass
class Model:
    weights: np.ndarray = field(default_factory=lambda: np.zeros((16, 1), dtype=np.float32))
    bias: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.float32))


@dataclass
class Optimizer:
    velocity_w: np.ndarray = field(default_factory=lambda: np.zeros((16, 1), dtype=np.float32))
    velocity_b: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.float32))
    learning_rate: np.ndarray = field(default_factory=lambda: np.array(0.05, dtype=np.float32))


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic data: the same step always sees the same batch."""
    rng = np.random.default_rng(step)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    true_w = np.arange(16, dtype=np.float32).reshape(16, 1) / 16
    return x, x @ true_w + 0.5


def train_step(model: Model, opt: Optimizer, step: int) -> float:
    x, y = batch(step)
    error = x @ model.weights + model.bias - y
    grad_w = x.T @ error / len(x)
    grad_b = error.mean(axis=0)
    opt.velocity_w[...] = 0.9 * opt.velocity_w + grad_w
    opt.velocity_b[...] = 0.9 * opt.velocity_b + grad_b
    model.weights -= opt.learning_rate * opt.velocity_w
    model.bias -= opt.learning_rate * opt.velocity_b
    return float((error**2).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="checkpoint directory (path or fsspec URL)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--preempt-at", type=int, default=None, help="die abruptly at this step")
    args = parser.parse_args(argv)

    model, opt = Model(), Optimizer()
    step = np.zeros((), dtype=np.int64)  # a 0-d array: restored in place
    ckpt = sc.Checkpoint(model=model, optimizer=opt, step=step)
    manager = sc.CheckpointManager(
        ckpt, args.dir, max_to_keep=3, best_metric="loss", mode="min", keep_best=1
    )
    restored = manager.restore_or_initialize()
    print(f"resumed from {restored} at step {int(step)}" if restored else "starting fresh")

    with ckpt:
        while int(step) < args.steps:
            loss = train_step(model, opt, int(step))
            step += 1
            if args.preempt_at is not None and int(step) == args.preempt_at:
                print(f"preempted at step {int(step)}", flush=True)
                os._exit(137)  # like SIGKILL: no cleanup, no final save
            if int(step) % args.save_every == 0:
                # In the background: returns once the arrays are copied; the write, the state
                # file and the deletion of old checkpoints follow while training goes on.
                handle = manager.save(step=int(step), metrics={"loss": loss}, blocking=False)
                if handle is not None:
                    print(f"step {int(step)} loss {loss:.5f} saving {handle.path}")
    print(f"done at step {int(step)}; kept {[os.path.basename(p) for p in manager.checkpoints]}")
    print(f"final weights[:3] {model.weights[:3, 0].tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
