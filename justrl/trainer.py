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
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from justrl import checkpoint as ckpt
from justrl.batches import BatchSchedule
from justrl.checkpoint import RunDir, TrainerState, record_run_config, rng_state, set_rng_state
from justrl.cluster.dist_groups import control_group
from justrl.cluster.placement import EnginePlacement
from justrl.cluster.run_lock import RunLock, RunLocked
from justrl.controller import Controller
from justrl.data import PromptSampler, load_training_set, validation_sets
from justrl.learner import build_learner
from justrl.model.sources import resolve_model_path
from justrl.rollout.auth import job_secret
from justrl.rollout.fleet import AllEnginesLost
from justrl.rollout.phases import EnginePhases
from justrl.run_summary import FAULTS_FILE, summary
from justrl.step_log import STEP_LOGGER, StepLog, StepTimer
from justrl.tb import EVENT_FILE_NAME
from justrl.weight_sync.sync import WeightSync, version_dir

log = logging.getLogger("justrl")


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


class _Checkpoints:
    """Saves a step's checkpoint from every rank: the learner's part from each, the trainer's
    (`trainer_state()`, rank 0's) and the config from rank 0 (justrl.checkpoint)."""

    def __init__(self, run: RunDir, cfg, learner, tokenizer, rank: int, saved_step: int, trainer_state):
        self.run, self.cfg, self.learner, self.tokenizer, self.rank = run, cfg, learner, tokenizer, rank
        self.saved_step, self.trainer_state = saved_step, trainer_state

    def save(self, step: int) -> None:
        self.saved_step = step
        tmp = _broadcast(ckpt.begin_checkpoint(self.run.checkpoints, step) if self.rank == 0 else None)
        self.learner.save_checkpoint(tmp, self.tokenizer)
        if self.rank == 0:
            self.trainer_state().save(tmp, self.cfg)
            path = ckpt.finish_checkpoint(self.run.checkpoints, step, self.cfg.trainer.keep_checkpoints)
            log.info("checkpoint %s", path)
        _barrier()


def _in_background(work) -> Future:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="justrl-start")
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)


def _train(cfg: DictConfig, engine_placements: list[EnginePlacement] | None) -> Path:
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # one progress bar on the console: ours
    rank = dist.get_rank() if dist.is_initialized() else 0
    run = RunDir(Path(cfg.trainer.output_dir).absolute())
    _setup_logging(run, rank)
    stop = StopRequested()
    t = cfg.trainer

    # -- model and resume point ---------------------------------------------------------------------
    model_path = resolve_model_path(cfg.model, build=rank == 0)
    _barrier()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    resume = ckpt.latest_checkpoint(run.checkpoints)
    start_step = ckpt.checkpoint_step(resume) if resume else 0
    if resume and t.total_steps is not None and start_step >= t.total_steps:
        log.info("%s already holds step %d of trainer.total_steps=%d: nothing to do (raise "
                 "trainer.total_steps to train on)", resume, start_step, t.total_steps)
        if rank == 0:
            _log_summary(run, t.total_steps)
        return run.root

    with ExitStack() as cleanup:  # closed in reverse: the schedule, the step log, the sync, the engines
        # -- the engines (rank 0), the learner, the weight sync ----------------------------------------
        # Start-up overlap: a fresh run's engines serve the model directory itself, so rank 0 starts
        # them (vLLM's server takes ~35 s on a CPU) while the learner builds and the data loads; a
        # resumed run's engines wait for the learner's export of the checkpoint. Colocated, the
        # engines start after the learner is built, never beside it: vLLM sizes its KV cache from
        # the GPU memory it sees while it profiles (vllm/v1/worker/utils.py request_memory), which
        # the learner rank on the same GPU would be allocating at the same time.
        colocated = cfg.cluster.placement == "colocated"
        controller = starting = None
        if rank == 0:
            placements = engine_placements or [EnginePlacement(None) for _ in range(cfg.rollout.engines)]
            serve_dir = version_dir(run.weights, start_step) if resume else Path(model_path)  # what the engines load first
            # The engines' secret: created at the run's start, read back by a requeued job (justrl.rollout.auth).
            controller = Controller(cfg, tokenizer, serve_dir, placements, run.engine_logs, job_secret(run.root))
            cleanup.callback(controller.close)
            if not resume and not colocated:
                starting = _in_background(controller.start)
                cleanup.callback(starting.exception)  # a start under way finishes before the engines close
        learner = build_learner(cfg, model_path, resume)
        if colocated:
            _barrier()  # every rank's learner built (and allocated) before any engine starts on its GPU
        r = cfg.rollout
        # The one owner of weight versions and the engines' copy of them (justrl/weight_sync/sync.py).
        weight_sync = WeightSync(run.weights, learner, tokenizer, r.dtype, fleet=controller and controller.fleet,
                                 transport=r.weight_sync, check=r.weight_check, tolerance=r.weight_check_tol,
                                 rank=rank)
        cleanup.callback(weight_sync.close)
        if resume:
            learner.load_checkpoint(resume)
            weight_sync.resume_from(start_step)
        if controller is not None and starting is None:
            starting = _in_background(controller.start)
            cleanup.callback(starting.exception)

        # -- data, counters and the event file (rank 0) ----------------------------------------------
        total_steps, sampler = t.total_steps, None
        train_set = val_sets = steps = state = None
        if rank == 0:
            train_set, val_sets = load_training_set(cfg.data, tokenizer), validation_sets(cfg.data, tokenizer)
            sampler = PromptSampler(len(train_set), cfg.data.seed)
            log.info("training data: %s", train_set.summary(cfg.algorithm.prompts_per_step, total_steps))
            if total_steps is None:
                total_steps = train_set.steps_per_pass(cfg.algorithm.prompts_per_step)
            state = TrainerState(sampler.state_dict(), rng_state(), {"total_tokens": 0})
            if resume:
                state = TrainerState.load(resume)
                sampler.load_state_dict(state.sampler)
                set_rng_state(state.rng)
                log.info("resuming from %s (step %d)", resume, start_step)
            record_run_config(run, cfg, resume)
            run.adopt_legacy_event_file(EVENT_FILE_NAME)
            steps = StepLog(run.tensorboard, t.run_name, start_step, total_steps, state.counters,
                            resumed=resume is not None, fleet=controller.fleet,
                            faults_path=run.root / FAULTS_FILE)
            cleanup.callback(steps.close)
            starting.result()  # the engines serve
        total_steps = _broadcast(total_steps)
        if rank == 0 and t.val_before_train and start_step == 0 and t.val_every:
            steps.scalars(0, controller.validate(val_sets))

        timer = StepTimer(controller.fleet.busy_seconds if rank == 0 else None)
        schedule = BatchSchedule(EnginePhases(controller and controller.fleet, colocated, _barrier),
                                 r.max_policy_lag, total_steps, cfg.algorithm.prompts_per_step, timer,
                                 controller, sampler, train_set, served_step=lambda: weight_sync.served_step,
                                 ahead=state.rollout_ahead if rank == 0 else None)
        cleanup.callback(schedule.close)
        checkpoints = _Checkpoints(run, cfg, learner, tokenizer, rank, start_step, lambda: TrainerState(
            sampler.state_dict(), rng_state(), state.counters, schedule.ahead))

        # -- the loop -------------------------------------------------------------------------------
        for step in range(start_step + 1, total_steps + 1):
            timer.start()
            sequences, metrics, lost = schedule.next_batch(step) if rank == 0 else (None, None, None)
            sequences, lost = _broadcast((sequences, lost))
            if lost is not None:
                # Nothing can generate: keep every finished step (a checkpoint of the previous one,
                # unless it has one), then stop; in a Slurm job, justrl.cluster.slurm requeues it.
                if rank == 0:
                    steps.count_faults()
                if step - 1 > checkpoints.saved_step:
                    checkpoints.save(step - 1)
                raise AllEnginesLost(lost)
            update_metrics = _update(step, sequences, learner, weight_sync, schedule, timer)
            if rank == 0:
                tokens = sum(len(s) for s in sequences)
                metrics.update(update_metrics)
                metrics.update(timer.metrics(tokens))
                if t.val_every and (step % t.val_every == 0 or step == total_steps):
                    metrics.update(controller.validate(val_sets))
                steps.step(step, tokens, metrics)
            stop_now = _broadcast(stop.signal is not None)
            if step % t.save_every == 0 or step == total_steps or stop_now:
                checkpoints.save(step)
            if stop_now:
                log.warning("stopped at step %d on signal %s; relaunch (or requeue) to resume", step, stop.signal)
                break
    if rank == 0:
        _log_summary(run, total_steps, stopped=f"signal {stop.signal}" if stop.signal is not None else None)
    if stop.signal is not None:
        stop.forward()  # under submitit: requeue the job now that the checkpoint is written
    return run.root


def _update(step: int, sequences, learner, weight_sync: WeightSync, schedule: BatchSchedule, timer: StepTimer) -> dict:
    """The learner's update on the step's batch, then the sync of its weights into the engines,
    with the engines resting meanwhile and woken around the push (justrl.batches); every rank."""
    timer.mark("update")
    schedule.rest()
    try:
        train_metrics = learner.train_step(sequences)
        timer.mark("trained")
        sync_metrics = weight_sync.sync(step, before_push=schedule.before_push, after_push=schedule.after_push)
    except BaseException:
        schedule.abort()
        raise
    timer.mark("synced")
    return {**train_metrics, **sync_metrics}


def _log_summary(run: RunDir, total_steps: int | None, stopped: str | None = None) -> None:
    """The end-of-run summary, read back from the event file (every start of the run)."""
    from justrl.tb import read_scalars

    if (run.tensorboard / EVENT_FILE_NAME).exists():
        log.info("%s", summary(read_scalars(run.tensorboard / EVENT_FILE_NAME), run.root, total_steps,
                               ckpt.latest_checkpoint(run.checkpoints), stopped))
