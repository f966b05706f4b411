"""The controller loop: the JustRL recipe (arXiv 2512.16649), one training step at a time.

    for each step:
        prompts     <- the sampler's next prompts_per_step prompts (one seeded pass, resumable)
        responses   <- n samples per prompt from the vLLM engines (token ids in, token ids out)
        rewards     <- the verifier (+ the overlong penalty in the length_penalty ablation)
        advantages  <- GRPO: (r - group mean) / (group std + eps)
        update      <- the learner recomputes old log-probs, then one AdamW step per mini-batch
        sync        <- the new weights go to every engine (HF safetensors, reloaded in place)
        log, validate and checkpoint on schedule

Every learner rank runs `train`; rank 0 is the controller: it alone owns the engines and the reward
workers (`justrl.controller.Controller`), the event file and the checkpoints, and broadcasts each
step's sequences to the other ranks. The same function runs on a laptop (one CPU rank), in an
sbatch allocation and under submitit: only how the ranks and engines are started differs
(justrl.launch).

Where this departs from the authors' veRL setup, on purpose (the math itself is justrl.grpo's):
- Rollout sampling is seeded per prompt from (trainer.seed, step), so a resumed run draws the
  same responses as the uninterrupted one would have (given the same weights).
- The engines serve the weights of the previous step exactly (float32 on CPU; the learner's
  weights cast to rollout.dtype on GPU), reloaded from safetensors files; veRL syncs in memory.
- Responses are scored from their decoded text with special tokens skipped, like veRL's reward
  manager; a verifier that hangs is stopped after reward.timeout_s and scores -1 (counted).
"""
from __future__ import annotations

import logging
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from justrl import checkpoint as ckpt
from justrl.controller import Controller
from justrl.data import PromptSampler, load_training_set, validation_sets
from justrl.cluster.dist_groups import control_group
from justrl.rollout.auth import job_secret
from justrl.rollout.phases import EnginePhases
from justrl.learner import build_learner
from justrl.model.sources import resolve_model_path
from justrl.cluster.placement import EnginePlacement
from justrl.rollout.fleet import AllEnginesLost
from justrl.cluster.run_lock import RunLock, RunLocked
from justrl.run_summary import RunFaults, summary
from justrl.tb import EVENT_FILE_NAME, ScalarLog
from justrl.weight_sync.sync import WeightSync

log = logging.getLogger("justrl")
STEP_LOGGER = "justrl.steps"
step_log = logging.getLogger(STEP_LOGGER)

TRAINER_STATE = "trainer_state.pt"
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class RunDir:
    """Where a run's files go; one directory per run, shared by every rank and restart."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        """Where the event file goes: the run directory itself. TensorBoard names a run by the
        directory that holds its event file, relative to `--logdir`: `justrl-tiny-none` under
        `--logdir outputs/`, `0-length_penalty` under `--logdir <sweep dir>`."""
        return self.root

    @property
    def engine_logs(self) -> Path:
        return self.root / "engines"

    @property
    def weights(self) -> Path:
        return self.root / "weights"


class StopRequested:
    """Set by SIGUSR1, SIGUSR2 or SIGTERM (Slurm's and submitit's pre-emption and time-limit
    warnings): the loop finishes its step, checkpoints and returns; then `forward()` hands the
    signal to the handler that was installed before ours (submitit's, which requeues the job)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing after this step, then stopping", signum)
        self.signal = signum

    def forward(self) -> None:
        previous = self._previous.get(self.signal)
        if callable(previous):
            previous(self.signal, None)


def _broadcast(obj):
    """Rank 0's `obj` on every rank (no-op without torch.distributed). Over the control-plane
    group (gloo, timeout `cluster.dist_timeout_s`): the other ranks wait here through rank 0's
    validation and rollouts, longer than NCCL's watchdog allows (justrl/cluster/dist_groups.py)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=control_group())


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def _warn_config_changes(saved: DictConfig, current: DictConfig) -> None:
    """A resumed run keeps its checkpoint's state; say which settings differ from its start."""
    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out
    old, new = flat(OmegaConf.to_container(saved)), flat(OmegaConf.to_container(current))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        log.warning("resuming with settings that differ from the checkpoint's: %s",
                    ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))


def _setup_logging(run: RunDir, rank: int) -> None:
    """Rank 0: everything (INFO) into <run>/train.log; the console gets the same minus the
    per-step lines, which the progress bar shows instead. Other ranks: warnings only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "justrl", False):
            root.removeHandler(handler)
            handler.close()
    if rank != 0:
        root.setLevel(logging.WARNING)
        return
    run.root.mkdir(parents=True, exist_ok=True)
    form = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file = logging.FileHandler(run.root / "train.log")
    to_console = logging.StreamHandler()
    to_console.addFilter(lambda record: record.name != STEP_LOGGER)
    for handler in (to_file, to_console):
        handler.setFormatter(form)
        handler.justrl = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def train(cfg: DictConfig, engine_placements: list[EnginePlacement] | None = None) -> Path:
    """Run (or resume) training as described by `cfg`; returns the run directory.

    `engine_placements`: where each engine runs (justrl.cluster.placement). None: `rollout.engines` CPU
    engines here.
    Call on every learner rank, after torch.distributed is initialised when there are several.
    Rank 0 holds the run directory's lock (justrl.cluster.run_lock) for the whole run; a directory in use
    by a live job raises RunLocked on every rank, before anything is written there.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock = RunLock(Path(cfg.trainer.output_dir).absolute())
    refusal = None
    if rank == 0:
        try:
            lock.acquire()
        except RunLocked as exc:
            refusal = str(exc)
    refusal = _broadcast(refusal)
    if refusal:
        raise RunLocked(refusal)
    try:
        return _train(cfg, engine_placements)
    finally:
        lock.release()


def _train(cfg: DictConfig, engine_placements: list[EnginePlacement] | None) -> Path:
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # one progress bar on the console: ours
    rank = dist.get_rank() if dist.is_initialized() else 0
    run = RunDir(Path(cfg.trainer.output_dir).absolute())
    _setup_logging(run, rank)
    stop = StopRequested()

    # -- model, data, resume point ----------------------------------------------------------------
    model_path = resolve_model_path(cfg.model, build=rank == 0)
    _barrier()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    resume = ckpt.latest_checkpoint(run.checkpoints)
    start_step = ckpt.checkpoint_step(resume) if resume else 0
    if resume and cfg.trainer.total_steps is not None and start_step >= cfg.trainer.total_steps:
        log.info("%s already holds step %d of trainer.total_steps=%d: nothing to do (raise "
                 "trainer.total_steps to train on)", resume, start_step, cfg.trainer.total_steps)
        if rank == 0:
            _log_summary(run, cfg.trainer.total_steps)
        return run.root
    # Start-up overlap: a fresh run's engines serve the model directory itself, so rank 0 starts
    # them (vLLM's server takes ~35 s on a CPU) while the learner builds and the data loads; a
    # resumed run's engines wait for the learner's export of the checkpoint. Colocated, the
    # engines start after the learner is built, never beside it: vLLM sizes its KV cache from
    # the GPU memory it sees while it profiles (vllm/v1/worker/utils.py request_memory), which
    # the learner rank on the same GPU would be allocating at the same time.
    colocated = cfg.cluster.placement == "colocated"
    controller = engines_starting = None
    placements = engine_placements or [EnginePlacement(None) for _ in range(cfg.rollout.engines)]
    # The engines' secret: created here, at the run's start, read back by a requeued job (justrl.rollout.auth).
    secret = job_secret(run.root) if rank == 0 else None
    if rank == 0 and not resume and not colocated:
        controller = Controller(cfg, tokenizer, Path(model_path), placements, run.engine_logs, run.weights, secret)
        engines_starting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="justrl-start")
        engines_started = engines_starting.submit(controller.start)
    try:
        learner = build_learner(cfg, model_path, resume)
    except BaseException:
        if controller is not None:
            engines_started.exception()  # let the start finish, then take the engines down
            controller.close()
        raise
    if colocated:
        _barrier()  # every rank's learner built (and allocated) before any engine starts on its GPU
    r = cfg.rollout
    # The one owner of weight versions and the engines' copy of them (justrl/weight_sync/sync.py).
    weight_sync = WeightSync(run.weights, learner, tokenizer, r.dtype, transport=r.weight_sync,
                             check=r.weight_check, tolerance=r.weight_check_tol, rank=rank)
    serve_dir = Path(model_path)  # what the engines load first
    if resume:
        learner.load_checkpoint(resume)
        serve_dir = weight_sync.export(start_step)
    total_steps = cfg.trainer.total_steps

    sampler = tb = None
    if rank == 0:
        train_set = load_training_set(cfg.data, tokenizer)
        val_sets = validation_sets(cfg.data, tokenizer)
        sampler = PromptSampler(len(train_set), cfg.data.seed)
        log.info("training data: %s", train_set.summary(cfg.algorithm.prompts_per_step, total_steps))
        if total_steps is None:
            total_steps = train_set.steps_per_pass(cfg.algorithm.prompts_per_step)
        state = {"total_tokens": 0}
        saved = {}
        if resume:
            saved = torch.load(resume / TRAINER_STATE, weights_only=False)
            sampler.load_state_dict(saved["sampler"])
            _set_rng_state(saved["rng"])
            state = saved["state"]
            log.info("resuming from %s (step %d)", resume, start_step)
            _warn_config_changes(OmegaConf.load(resume / RUN_CONFIG), cfg)
        else:
            OmegaConf.save(cfg, run.root / RUN_CONFIG)
        legacy = run.root / "tensorboard" / EVENT_FILE_NAME  # where runs before 2026-11-22 logged
        if legacy.is_file() and not (run.tensorboard / EVENT_FILE_NAME).exists():
            os.replace(legacy, run.tensorboard / EVENT_FILE_NAME)
        tb = ScalarLog(run.tensorboard, resume_step=start_step if resume else None)
        faults = RunFaults.from_state(state.get("faults"))
        if resume:
            faults.resumed(start_step, tb.last_step_before)
            if tb.last_step_before and tb.last_step_before > start_step:
                log.warning("the run had reached step %d; steps %d-%d since the checkpoint are trained again",
                            tb.last_step_before, start_step + 1, tb.last_step_before)
        if controller is None:
            controller = Controller(cfg, tokenizer, serve_dir, placements, run.engine_logs, run.weights, secret)
            controller.start()
        else:
            try:
                engines_started.result()
            except BaseException:
                controller.close()
                raise
            finally:
                engines_starting.shutdown()
        weight_sync.fleet = controller.fleet
    total_steps = _broadcast(total_steps)
    phases = EnginePhases(controller.fleet if rank == 0 else None, colocated, _barrier)

    saved_step = start_step

    def save(step: int) -> None:
        nonlocal saved_step
        saved_step = step
        tmp = _broadcast(ckpt.begin_checkpoint(run.checkpoints, step) if rank == 0 else None)
        learner.save_checkpoint(tmp, tokenizer)  # every rank: the learner's part
        if rank == 0:
            torch.save({"sampler": sampler.state_dict(), "rng": _rng_state(), "state": state,
                        "rollout_ahead": ahead}, tmp / TRAINER_STATE)
            OmegaConf.save(cfg, tmp / RUN_CONFIG)
            path = ckpt.finish_checkpoint(run.checkpoints, step, cfg.trainer.keep_checkpoints)
            log.info("checkpoint %s", path)
        _barrier()

    # -- the loop -----------------------------------------------------------------------------------
    # rollout.max_policy_lag=1 (rank 0): while the learner trains step k, a thread generates and
    # scores step k+1's batch with the weights the engines serve (those of step k-1); the sync of
    # step k waits for it. `ahead` holds that batch until its step; a checkpoint stores it, so a
    # resumed run trains on the same batch (generated by the same older weights) as an
    # uninterrupted one. The idea is veRL's one-step-off-policy and NeMo-RL's async GRPO; the
    # learner recomputes the old log-probs either way, so the clipped ratio is taken against the
    # weights that train, as in those.
    lag = cfg.rollout.max_policy_lag
    ahead = saved.get("rollout_ahead") if rank == 0 and resume else None
    pending = None
    ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="justrl-ahead") if lag and rank == 0 else None
    progress = None
    try:
        if rank == 0:
            if cfg.trainer.val_before_train and start_step == 0 and cfg.trainer.val_every:
                tb.scalars(0, controller.validate(val_sets))
            from tqdm import tqdm
            progress = tqdm(total=total_steps, initial=start_step, desc=cfg.trainer.run_name, unit="step",
                            dynamic_ncols=True)
            idle_mark = (time.perf_counter(), controller.fleet.busy_seconds())
        for step in range(start_step + 1, total_steps + 1):
            t_step = time.perf_counter()
            sequences = metrics = None
            learner_wait = 0.0
            lost = None  # every rollout engine lost during this step's rollout: why
            if rank == 0:
                before = (sampler.state_dict(), _rng_state())
                try:
                    if ahead is not None:  # generated while the previous step trained
                        sequences, metrics = ahead
                        ahead = None
                    else:
                        batch = [train_set.prompt(i) for i in sampler.next_batch(cfg.algorithm.prompts_per_step)]
                        sequences, metrics = controller.rollout(batch, step)
                        learner_wait = time.perf_counter() - t_step
                except AllEnginesLost as exc:
                    lost = str(exc)
                    # back to the end of the previous step, so that its checkpoint redraws this batch
                    sampler.load_state_dict(before[0])
                    _set_rng_state(before[1])
                    state["faults"] = faults.totals(controller.fleet.restarts, controller.fleet.hung,
                                                    len(controller.fleet.lost)).state()
                if lost is None and lag and step < total_steps:
                    batch = [train_set.prompt(i) for i in sampler.next_batch(cfg.algorithm.prompts_per_step)]
                    pending = ahead_pool.submit(controller.rollout, batch, step + 1)
            sequences, lost = _broadcast((sequences, lost))
            if lost is not None:
                # Nothing can generate: keep every finished step (a checkpoint of the previous one,
                # unless it has one), then stop; in a Slurm job, justrl.cluster.slurm requeues it.
                if step - 1 > saved_step:
                    save(step - 1)
                raise AllEnginesLost(lost)

            t0 = time.perf_counter()
            # On-policy (nothing generating meanwhile) the engines rest while the learner trains and
            # writes the new version (justrl.rollout.phases): colocated, they sleep and give the GPU's
            # memory to the learner rank beside them; this machine's CPU engines are frozen so
            # that they take none of its cores (a thawed engine's worker spins on its queue for up
            # to a second: beside it, the learner's probe forward took 0.22 s instead of 3 ms on
            # a 2-core machine). They wake for the new weights, then for the next rollouts.
            phases.rest(generating=pending is not None)

            def before_push() -> None:
                """After the export and before the engines are touched: lag 1 waits (rank 0) for the
                next step's batch (generated with the old weights); on-policy wakes the engines."""
                nonlocal ahead, pending, learner_wait
                if pending is not None:
                    t = time.perf_counter()
                    ahead = pending.result()
                    pending = None
                    learner_wait += time.perf_counter() - t
                phases.wake_for_weights()

            try:
                train_metrics = learner.train_step(sequences)
                t1 = time.perf_counter()
                sync_metrics = weight_sync.sync(step, before_push=before_push, after_push=phases.wake_for_rollouts)
            except BaseException:
                phases.abort()
                raise
            t2 = time.perf_counter()

            if rank == 0:
                step_tokens = sum(len(s) for s in sequences)
                state["total_tokens"] += step_tokens
                metrics.update(train_metrics)
                metrics.update(sync_metrics)
                run_faults = faults.totals(controller.fleet.restarts, controller.fleet.hung,
                                           len(controller.fleet.lost))
                state["faults"] = run_faults.state()  # saved with the next checkpoint
                metrics.update(run_faults.scalars())
                now, busy = time.perf_counter(), controller.fleet.busy_seconds()
                window = now - idle_mark[0]
                busy_share = sum(b - a for a, b in zip(idle_mark[1], busy)) / (len(busy) * window)
                idle_mark = (now, busy)
                metrics.update({
                    "perf/time_train": t1 - t0,
                    "perf/time_sync": t2 - t1,
                    "perf/time_step": t2 - t_step,
                    "perf/tokens_per_second": step_tokens / (t2 - t_step),
                    "perf/total_tokens": float(state["total_tokens"]),
                    # seconds the learner waited for rollouts this step (lag 1: only what the
                    # overlap did not hide), and the share of the step the engines had nothing to do
                    "perf/learner_wait_s": learner_wait,
                    "perf/engine_idle_fraction": min(1.0, max(0.0, 1.0 - busy_share)),
                    # how many steps older than the learner's the generating weights were
                    "rollout/policy_lag": float(step - 1 - metrics["rollout/weights_step"]),
                })
                if cfg.trainer.val_every and (step % cfg.trainer.val_every == 0 or step == total_steps):
                    metrics.update(controller.validate(val_sets))
                tb.scalars(step, metrics)
                step_log.info("step %d/%d %s", step, total_steps, " ".join(
                    f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
                progress.set_postfix(reward=f"{metrics['reward/mean']:+.3f}", acc=f"{metrics['reward/accuracy']:.2f}",
                                     len=f"{metrics['response_length/mean']:.0f}",
                                     ent=f"{metrics['actor/entropy']:.2f}", refresh=False)
                progress.update(1)
            stop_now = _broadcast(stop.signal is not None)
            if step % cfg.trainer.save_every == 0 or step == total_steps or stop_now:
                save(step)
            if stop_now:
                log.warning("stopped at step %d on signal %s; relaunch (or requeue) to resume", step, stop.signal)
                break
    finally:
        if progress is not None:
            progress.close()
        if ahead_pool is not None:
            ahead_pool.shutdown(wait=False, cancel_futures=True)
        weight_sync.close()
        if controller is not None:
            controller.close()
        if tb is not None:
            tb.close()
    if rank == 0:
        _log_summary(run, total_steps, stopped=f"signal {stop.signal}" if stop.signal is not None else None)
    if stop.signal is not None:
        stop.forward()  # under submitit: requeue the job now that the checkpoint is written
    return run.root


def _log_summary(run: RunDir, total_steps: int | None, stopped: str | None = None) -> None:
    """The end-of-run summary, read back from the event file (every start of the run)."""
    from justrl.tb import read_scalars

    if (run.tensorboard / EVENT_FILE_NAME).exists():
        log.info("%s", summary(read_scalars(run.tensorboard / EVENT_FILE_NAME), run.root, total_steps,
                               ckpt.latest_checkpoint(run.checkpoints), stopped))
