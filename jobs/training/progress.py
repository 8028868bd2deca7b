"""Training progress on the driver's console.

The driver blocks in `trainer.fit()` while rank 0 trains in another process, perhaps on another node, whose output Ray
keeps in its log files. So rank 0 posts its figures and its notices (the `jobs` loggers' records: the initial weights'
load report, a resume, an MLflow outage) to a small actor, and a thread of the driver prints what it finds there. Rank
0 posts at the steps where it reads the step metrics back from the device anyway (`--log-every`), at most every
`interval_s`, and at every epoch end: the loop gains no host sync.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from jobs.console import duration

log = logging.getLogger("jobs.train")

# Seconds between two progress lines during an epoch (each epoch end prints one too).
PROGRESS_INTERVAL_S = 5.0


class ProgressBoard:
    """The actor rank 0 posts to and the driver takes from (a Ray actor: `ray.remote(ProgressBoard)`)."""

    def __init__(self):
        self._posts: list[dict] = []

    def post(self, item: dict) -> None:
        self._posts.append(item)

    def take(self) -> list[dict]:
        posts, self._posts = self._posts, []
        return posts


class DriverConsole:
    """In the driver around `fit()`: starts the board and a thread printing its posts every `poll_s`."""

    def __init__(self, poll_s: float = 1.0):
        self.poll_s = poll_s
        self.board = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-progress", daemon=True)

    def __enter__(self) -> DriverConsole:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node, so that it is lost only with the driver (a head node that runs no tasks has room
        # for it: it takes no CPU, as it must beside workers that hold every CPU).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.board = ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressBoard).remote()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        self._print_posts()  # what came in since the last poll
        ray.kill(self.board)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._print_posts()

    def _print_posts(self) -> None:
        import ray

        try:
            posts = ray.get(self.board.take.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as error:  # the console is not worth failing training for
            log.debug("training progress unavailable: %s", error)
            return
        for post in posts:
            if "message" in post:
                logging.getLogger(post["logger"]).log(post["level"], post["message"])
            else:
                log.info(progress_line(post))


def progress_line(post: dict) -> str:
    """One console line of a progress post: `epoch 2/10  step 140/480  loss 0.8123  lr 9.1e-04  88.0 clips/s
    data wait 2%  ETA 3m05s  val top-1 0.712 top-5 0.990 loss 0.642` (the validation of the last finished epoch)."""
    head = f"epoch {post['epoch'] + 1}/{post['epochs']}{' done' if post['epoch_end'] else ''}"
    parts = [head, f"step {post['step']}/{post['total_steps']}"]
    if post.get("loss") is not None:
        parts += [f"loss {post['loss']:.4f}", f"lr {post['lr']:.2e}", f"{post['clips_per_s']:.1f} clips/s"]
    eta = "-" if post["eta_s"] is None else duration(post["eta_s"])
    parts += [f"data wait {post['data_wait_share']:.0%}", f"ETA {eta}"]
    validation = post.get("validation")
    if validation and math.isnan(validation["accuracy"]):  # no validation split (--val-fraction 0): nothing to show
        parts.append("no validation split")
    elif validation:
        parts.append(f"val top-1 {validation['accuracy']:.3f} top-5 {validation['top5_accuracy']:.3f} "
                     f"loss {validation['loss']:.3f}")
    return "  ".join(parts)


class _Forward(logging.Handler):
    """Sends the `jobs` loggers' records of rank 0 to the board; they stay in the worker's log file too."""

    def __init__(self, board):
        super().__init__(logging.INFO)
        self.board = board

    def emit(self, record: logging.LogRecord) -> None:
        self.board.post.remote({"logger": record.name, "level": record.levelno, "message": record.getMessage()})


class RankZeroProgress:
    """Rank 0's side: posts progress and forwards notices. A no-op on the other ranks and without a board."""

    def __init__(self, board, enabled: bool, epochs: int, total_steps: int, world: int,
                 interval_s: float = PROGRESS_INTERVAL_S):
        self.board = board if enabled else None
        self.epochs, self.total_steps, self.world, self.interval_s = epochs, total_steps, world, interval_s
        self._started: tuple[float, int] | None = None  # (time, global step) of the first step of this attempt
        self._last_post = 0.0
        self._validation: dict | None = None
        self._window: list[tuple[int, dict]] = []  # the step metrics last read back
        self._forward = None
        if self.board is not None:
            self._forward = _Forward(self.board)
            logging.getLogger("jobs").addHandler(self._forward)

    def close(self) -> None:
        if self._forward is not None:
            logging.getLogger("jobs").removeHandler(self._forward)

    def steps(self, drained: list[tuple[int, dict]], epoch: int, data_wait_share: float) -> None:
        """After step metrics were read back: posts a line when `interval_s` has passed since the last one."""
        if self.board is None or not drained:
            return
        self._window = drained
        now = time.monotonic()
        if self._started is None:
            # the pace counts from the first window read back: the steps before it include the start-up
            self._started = (now, drained[-1][0])
            return
        if now - self._last_post < self.interval_s:
            return
        self._post(drained, epoch, data_wait_share, epoch_end=False)

    def epoch_end(self, drained: list[tuple[int, dict]], epoch: int, step: int, data_wait_share: float,
                  validation: dict) -> None:
        if self.board is None:
            return
        self._validation = validation
        # a window read back at this very step (the epoch ended on a --log-every step) still describes it
        window = drained or (self._window if self._window and self._window[-1][0] == step else [])
        self._post(window or [(step, {})], epoch, data_wait_share, epoch_end=True)

    def _post(self, drained: list[tuple[int, dict]], epoch: int, data_wait_share: float, epoch_end: bool) -> None:
        now = time.monotonic()
        step, values = drained[-1]
        post = {
            "epoch": epoch, "epochs": self.epochs, "epoch_end": epoch_end, "step": step,
            "total_steps": self.total_steps, "data_wait_share": data_wait_share, "eta_s": self._eta(now, step),
            "validation": self._validation,
        }
        losses = [v["train_loss"] for _, v in drained if "train_loss" in v]
        rates = [v["clips_per_s_per_worker"] for _, v in drained if "clips_per_s_per_worker" in v]
        if losses and rates:
            post.update(loss=sum(losses) / len(losses), lr=values["lr"], clips_per_s=rates[-1] * self.world)
        self.board.post.remote(post)
        self._last_post = now

    def _eta(self, now: float, step: int) -> float | None:
        if step >= self.total_steps:
            return 0.0
        if self._started is None or step <= self._started[1]:
            return None  # no pace yet
        started_at, first_step = self._started
        return (self.total_steps - step) * (now - started_at) / (step - first_step)
