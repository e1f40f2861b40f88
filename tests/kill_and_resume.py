"""The fine-tuning scripts' kill-and-resume harness (examples/finetune.py, finetune_segmentation.py,
finetune_detection.py and finetune_instance_segmentation.py): a script run in a process of its own that stalls where
a test wants a SIGKILL to land (while Trainer writes a checkpoint, or while the output folder is written) and is
killed there, then the same command run again."""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import scale_utils
from conftest import ROOT

RESUME_RTOL = 0  # the same computation in the same order: a resumed run is the uninterrupted one, bit for bit

# examples/<script>.py that prints each optimizer step it takes and, as STALL_IN says, stalls (each process) while
# Trainer writes its second checkpoint (weights and optimizer written; RNG and trainer state not) or while the
# output folder is written (its weights written, the rest not); it touches $STALLED.<rank> when it does
STALLING_SCRIPT = """
import importlib, os, sys, time
sys.path.insert(0, {examples!r})
import scale_utils
from mambavision_tools import hub_folder
from transformers import Trainer

script = importlib.import_module({script!r})


def stall():
    open(f"{{os.environ['STALLED']}}.{{os.environ.get('RANK', 0)}}", "w").close()
    time.sleep(600)


def print_step(self, args, state, control, **kwargs):
    if state.is_world_process_zero:
        print(f"optimizer step {{state.global_step}}", flush=True)


def then_stall(save):
    def save_then_stall(*args, **kwargs):
        save(*args, **kwargs)
        stall()
    return save_then_stall


scale_utils.CompleteCheckpoints.on_step_end = print_step
if os.environ["STALL_IN"] == "checkpoint":
    save_rng_state, saves = Trainer._save_rng_state, []

    def save_rng_state_or_stall(self, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:
            stall()
        save_rng_state(self, output_dir)

    Trainer._save_rng_state = save_rng_state_or_stall
elif os.environ["STALL_IN"] == "output":  # the scripts write their folders through these
    hub_folder.save_model_folder = then_stall(hub_folder.save_model_folder)
    hub_folder.save_head_folder = then_stall(hub_folder.save_head_folder)
sys.exit(script.main())
"""


def kill_when(run, ready, log, timeout=240):
    """SIGKILL ``run`` (a launcher started in a session of its own) and its child processes (torchrun gives each
    rank a session of its own) once ``ready()`` holds: the run stalls where the test wants the kill to land, so it
    lands there for sure. Fails with the run's log if the run ended or ``timeout`` passed first."""
    try:
        deadline = time.monotonic() + timeout
        while not ready() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if run.poll() is None:
            children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
            for process_group in {os.getpgid(pid) for pid in [run.pid, *map(int, children)]} - {os.getpgrp()}:
                os.killpg(process_group, signal.SIGKILL)
        run.wait()
    assert ready(), log.read_text()[-3000:]


def run_script(script, arguments, processes, folder, stall_in=""):
    """examples/<script>.py with ``arguments`` through ``STALLING_SCRIPT`` on 1 process (python) or more
    (torchrun), run to its end or, with ``stall_in``, killed where it stalls; its log and scratch files go into
    ``folder``. Returns its output and the optimizer steps it took."""
    folder.mkdir()
    stalling = folder / f"stalling_{script}.py"
    stalling.write_text(STALLING_SCRIPT.format(examples=str(ROOT / "examples"), script=script))
    log, stalled = folder / "log", folder / "stalled"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STALL_IN": stall_in, "STALLED": str(stalled)}
    command = [sys.executable, stalling, *arguments] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), stalling,
         *arguments]
    with open(log, "w") as log_file:
        run = subprocess.Popen(command, env=env, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    if stall_in:
        kill_when(run, lambda: all(Path(f"{stalled}.{rank}").exists() for rank in range(processes)), log)
    else:
        assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
    output = log.read_text()
    return output, [int(step) for step in re.findall(r"optimizer step (\d+)\n", output)]


def kill_twice_then_finish(script, arguments, output, steps_per_epoch, capsys):
    """examples/<script>.py with ``arguments`` (4 optimizer steps, a checkpoint every 2, the loss logged at each,
    written into ``output``) run three times, the same command each time: killed while writing its second
    checkpoint; then, resumed from the first, killed while writing its output folder; then in this process to its
    end, from the second checkpoint (saved after the last step: no more training). Checks the steps each run takes,
    what it leaves (never a half-written output folder, nor the checkpoints at the end) and what it says."""
    workdir, checkpoints = output.parent, output.parent / f"{output.name}-checkpoints"
    before = set(workdir.iterdir())
    epoch = lambda step: f"epoch {step / steps_per_epoch:.2f}"  # noqa: E731

    _, steps = run_script(script, arguments, 1, workdir / "first", stall_in="checkpoint")
    assert steps == [1, 2, 3, 4] and not output.exists()
    assert (checkpoints / "checkpoint-2" / scale_utils.COMPLETE).is_file()
    assert (checkpoints / "checkpoint-4" / "optimizer.pt").is_file()  # cut short
    assert not (checkpoints / "checkpoint-4" / scale_utils.COMPLETE).exists()

    log, steps = run_script(script, arguments, 1, workdir / "second", stall_in="output")
    assert f"resuming from {checkpoints / 'checkpoint-2'} (step 2, {epoch(2)}); removed checkpoint-4 from " \
           f"{checkpoints} (cut short before complete)\n" in log
    assert steps == [3, 4] and not output.exists()
    staging, = workdir.glob(f".{output.name}.*.partial")
    assert (staging / output.name / "model.safetensors").is_file()  # the kill landed while writing the folder

    capsys.readouterr()
    importlib.import_module(script).main(arguments)  # once more, to the end, in this process
    printed = capsys.readouterr().out
    assert f"resuming from {checkpoints / 'checkpoint-4'} (step 4, {epoch(4)}); training had finished\n" in printed
    assert f"removed {staging.name}, left by an interrupted fine-tuning run" in printed
    assert set(workdir.iterdir()) == before | {workdir / "first", workdir / "second", output}  # checkpoints gone


def assert_resumes_as_if_uninterrupted(script, arguments, folder, name, steps_per_epoch, capsys):
    """examples/<script>.py run uninterrupted in this process into ``folder``/uninterrupted/``name``, then
    ``kill_twice_then_finish`` into ``folder``/resumed/``name`` (``arguments(output)`` gives each command): the same
    training, bit for bit. Returns the resumed run's output folder."""
    uninterrupted = folder / "uninterrupted" / name
    importlib.import_module(script).main(arguments(uninterrupted))
    output = folder / "resumed" / name
    output.parent.mkdir()
    kill_twice_then_finish(script, arguments(output), output, steps_per_epoch, capsys)
    assert_same_training(output, uninterrupted, RESUME_RTOL)
    return output


def logged_losses(folder):
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def assert_same_training(resumed, uninterrupted, rtol):
    """The same output files, the same loss at each of the 4 steps, and the same weights (buffers such as
    BatchNorm's statistics too) at the end, to ``rtol``."""
    assert sorted(path.name for path in resumed.iterdir()) == sorted(path.name for path in uninterrupted.iterdir())
    losses, expected = logged_losses(resumed), logged_losses(uninterrupted)
    assert len(losses) == len(expected) == 4 and expected[0] != expected[-1]
    np.testing.assert_allclose(losses, expected, rtol=rtol)
    weights, expected_weights = load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], expected_weights[name], rtol=rtol, atol=0,
                                   msg=lambda message, name=name: f"{name}: {message}")
