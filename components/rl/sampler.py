"""The rollout's model-facing half: sample G completions per prompt and score them, in this process or in a
process of its own.

`GroupSampler` holds what sampling needs besides the weights (the tokenized prompts, the problems, the
sampling settings and the reward config) and is picklable, so the same code runs in the trainer's process
or in a `SamplerProcess`.

Why a process. The overlapped rollout (`grpo.overlap_rollout`) samples step t+1's groups while step t's
update runs. In a thread of the trainer's process both halves share one GIL, and both spend much of their
time in Python between small ops (the decoding loop, the update's forward): measured on the tiny preset at
one intra-op thread each (2-core AMD EPYC), the rollout took 0.30 s alone and 0.38 s beside the update, the
update 0.39 s alone and 0.43 s beside the rollout. In two processes they took 0.31 s and 0.37 s side by
side: nothing but the GIL was shared. `SamplerProcess` is a spawned worker that holds a copy of the policy
in shared memory (`share_memory()`: the trainer writes the new weights into it in place before each
request, while the worker waits) and answers one request at a time over a pipe. Its answers are the same
bits as sampling in the trainer's process with the same number of threads: the same ops on the same values.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from components.model.compile import COMPILED_METHODS
from components.model.generate import GenerationResult, generate
from components.rl.config import GRPOConfig
from components.rl.rewards import RewardBatch, RewardConfig, compute_rewards
from components.tasks import Problem

SAMPLER_START_S = 300.0  # a sampler process that has not answered its first request by then is hung


def warm_rope(model: torch.nn.Module) -> None:
    """Build the model's cached RoPE tables for every position, outside inference mode.

    `generate` runs under `torch.inference_mode()`; a table first built there is an inference tensor, and
    the next training forward that reads it fails ("Inference tensors cannot be saved for backward").
    Building the full-length table first keeps `generate` from ever rebuilding it. Reported to the model's
    owner; remove once the model builds its tables outside inference mode.
    """
    rope = getattr(model, "_rope", None)
    if rope is not None:
        with torch.inference_mode(False):
            rope(0, model.cfg.max_position_embeddings, model.output_weight().device)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` in eval mode with no gradients: what a sampler samples with, or the KL reference."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


Sample = tuple[list[GenerationResult], list[str], RewardBatch]


@dataclass
class GroupSampler:
    """G completions for each of some prompts of the pool, decoded and scored (see the module doc)."""

    tokenizer: Any
    problems: Sequence[Problem]
    prompt_ids: Sequence[Sequence[int]]
    cfg: GRPOConfig  # group size, temperature, top-p/top-k
    stop_ids: Sequence[int]
    seed: int
    rewards: RewardConfig

    def __call__(self, model: torch.nn.Module, idx: list[int], step: int, round_: int) -> Sample:
        """Prompts `idx` of the pool, sampled after `step` steps in dynamic-sampling round `round_` (the seed
        of the draw depends on both)."""
        warm_rope(model)
        prompts = [self.prompt_ids[i] for i in idx]
        cfg = self.cfg
        results = generate(model, prompts, max_new_tokens=self.rewards.max_completion_len,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                           stop_token_ids=self.stop_ids, num_samples=cfg.group_size,
                           seed=self.seed * 1_000_003 + step * 101 + round_, with_entropy=True)
        texts = [self.tokenizer.decode(r.tokens) for r in results]
        problems = [self.problems[idx[r.prompt_index]] for r in results]
        rewards = compute_rewards(problems, texts, [len(r.tokens) for r in results],
                                  [r.finish_reason == "length" for r in results], self.rewards)
        return results, texts, rewards


def _serve(conn: Connection, model: torch.nn.Module, sampler: GroupSampler, threads: int) -> None:
    """The worker's loop: (idx, step, round) -> ("ok", sample) or ("error", message, traceback); None stops.

    A Ctrl-C in the terminal reaches the whole process group: the worker ignores it and leaves the stopping
    to the trainer (`close`), or ends when the trainer's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the trainer is gone
            return
        if request is None:
            return
        try:
            conn.send(("ok", sampler(model, *request)))
        except Exception as e:  # reported to the trainer, which raises it there
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a spawned process without re-running the parent's ``__main__`` in it.

    `multiprocessing`'s spawn imports the parent's main module (by module name, else by path) in the child
    before unpickling the target; for a user's script without an ``if __name__ == "__main__"`` guard that
    reruns the script there, or fails ("An attempt has been made to start a new process before the current
    process has finished its bootstrapping phase"). The worker needs nothing from ``__main__`` (its target
    and arguments live in moeflow's modules), so the main module's name and path are hidden while the
    process starts."""
    main = sys.modules["__main__"]
    saved = {k: getattr(main, k) for k in ("__spec__", "__file__") if hasattr(main, k)}
    try:
        main.__spec__ = None
        if "__file__" in saved:
            del main.__file__
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


class SamplerProcess:
    """A spawned process that samples with a shared-memory copy of `model` (see the module doc).

    `load_weights(model)` copies the policy's current weights into the copy (only between requests);
    `sample(idx, step, round_)` answers what `sampler(copy, idx, step, round_)` would, waiting at most
    `timeout_s`; `close()` stops the process. Errors in the worker are raised here, with its traceback.
    """

    def __init__(self, model: torch.nn.Module, sampler: GroupSampler, threads: int, timeout_s: float):
        if any(p.device.type != "cpu" for p in model.parameters()):
            raise ValueError("a sampler process shares CPU memory with the trainer; on an accelerator, overlap "
                             "the rollout in a thread (grpo.rollout_worker: thread)")
        self.timeout_s = timeout_s
        self.model = frozen_copy(model)
        for name in COMPILED_METHODS:  # generation is eager; compiled methods do not pickle
            vars(self.model).pop(name, None)
        self.model.share_memory()
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.model, sampler, threads), daemon=True,
                                 name="moeflow-sampler")
        with _main_module_hidden():
            self._proc.start()
        child.close()
        self._started = False

    def load_weights(self, model: torch.nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())

    def sample(self, idx: list[int], step: int, round_: int) -> Sample:
        try:
            self._conn.send((idx, step, round_))
        except (BrokenPipeError, ConnectionError):
            self._proc.join(5)
            raise RuntimeError(f"the sampler process (pid {self._proc.pid}) has exited with code "
                               f"{self._proc.exitcode}") from None
        # the first answer also waits for the worker to start (a fresh interpreter importing torch)
        wait = self.timeout_s if self._started else max(self.timeout_s, SAMPLER_START_S)
        if not self._conn.poll(wait):
            raise RuntimeError(f"the sampler process (pid {self._proc.pid}) did not answer within {wait:.0f} s")
        try:
            status, *payload = self._conn.recv()
        except (EOFError, ConnectionError):  # the worker's end closed: it is gone
            self._proc.join(5)
            raise RuntimeError(f"the sampler process (pid {self._proc.pid}) exited with code "
                               f"{self._proc.exitcode} while sampling") from None
        self._started = True
        if status == "error":
            raise RuntimeError(f"sampling in the sampler process failed: {payload[0]}\n"
                               f"--- the worker's traceback ---\n{payload[1]}")
        return payload[0]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (it finishes a request in flight first, up to `timeout_s`, then is terminated)."""
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout_s)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout_s)
        self._conn.close()
