"""Crash-consistent runs, proven by invariants: a save stopped at each of its stages (injected exception, real
SIGKILL), SIGTERM/SIGUSR1, a full disk, the output-folder lock, evaluation runs that never write checkpoints.

Invariants checked after every fault: ``checkpoint-latest.pth`` loads with ``torch.load(weights_only=True)`` once
the run has saved; no temporary file survives the next start; the identical command resumes at the saved step; the
final weights equal an uninterrupted run's bit for bit. Runs: the tiny MAE at 32 px on 16 demo images, batch 4
(4 steps per epoch, 2 epochs), one intra-op thread (so that the killed subprocess and the in-process rerun compute
alike).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine_pretrain
import main_pretrain
import harness
from ranks import run_ranks
from util import io as uio
from harness.run_control import EXIT_PREEMPTED, LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "config" / "demo.yaml")
LATEST = "checkpoint-latest.pth"


def argv(out: Path, *extra: str) -> list[str]:
    return ["--config", DEMO, "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "4",
            "--epochs", "2", "--warmup_epochs", "1", "--device", "cpu", "--num_workers", "0", "--output_dir", str(out),
            "--skip_knn_eval", "--print_freq", "100", "--data_override", "data.length=16", "--save_every_steps", "2",
            "--checkpoint_interval", "1", *extra]


def run_cli(args: list[str]):
    return harness.run(main_pretrain.main, main_pretrain.get_args_parser(), args)


def _child_run(args: list[str], log: str, env: dict[str, str]) -> None:
    """Body of :func:`forked_run`'s child: the run with ``env``, its output in ``log``; exits with its status."""
    os.environ.update(env)
    uio._writes.clear()
    torch.set_num_threads(1)
    with open(log, "w") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh
        try:
            run_cli(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported by the status and the log
            import traceback

            traceback.print_exc()
            code = 1
        fh.flush()
    os._exit(code)


def forked_run(args: list[str], log: Path, **env: str) -> int:
    """Run ``main_pretrain`` with ``args`` in a child process forked from a fork server that has imported the
    project once (a fresh interpreter, so no autograd threads: forking pytest itself is not safe), with ``env`` set
    and its output in ``log``; returns the exit status (``-9`` when SIGKILLed)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "main_pretrain", "harness"])
    proc = ctx.Process(target=_child_run, args=(args, str(log), env))
    proc.start()
    proc.join(300)
    assert proc.exitcode is not None, "the child run hangs"
    return proc.exitcode


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env.pop(harness.DEBUG_ENV, None)
    env.pop(uio.FAULT_ENV, None)
    env.update(extra)
    return env


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / LATEST, weights_only=True)["model"]


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def resume_point(out: Path) -> tuple[int, int]:
    """(epoch, step) at which the identical command must continue, read from checkpoint-latest.pth."""
    ckpt = torch.load(out / LATEST, weights_only=True)
    if "resume_step" in ckpt:
        return int(ckpt["resume_epoch"]), int(ckpt["resume_step"])
    return int(ckpt["epoch"]) + 1, 0


def rerun_and_check(out: Path, reference: dict, capsys) -> str:
    """Rerun the identical command in-process: it resumes where checkpoint-latest.pth says and ends with the
    reference weights. Returns what it printed."""
    capsys.readouterr()
    loads = (out / LATEST).is_file()
    expected = resume_point(out) if loads else (0, 0)
    run_cli(argv(out))
    printed = capsys.readouterr().out
    if loads:
        assert f"starting at epoch {expected[0]}, step {expected[1]}" in printed, printed
    assert_bitwise_equal(weights(out), reference)
    assert not list(out.glob(f".*{uio.TEMP_SUFFIX}")), "a temporary file survived the rerun"
    assert not (out / harness.VERIFIED).exists() and not (out / LOCK_NAME).exists()
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1], epochs  # each epoch logged once: none twice, none lost
    return printed


pytestmark = pytest.mark.usefixtures("one_thread")


REFERENCE_RUN: list[Path] = []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run's final weights (its folder: ``REFERENCE_RUN[0]``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    run_cli(argv(out))
    torch.set_num_threads(before)
    REFERENCE_RUN[:] = [out]
    return weights(out)


# --------------------------------------------------------------------------------------- the save, stage by stage
ATOMIC_STAGES = ("before_temp", "mid_write", "before_rename", "after_rename")


@pytest.mark.parametrize("stage", [*ATOMIC_STAGES, "link"])
def test_keeper_survives_an_exception_at_every_stage(tmp_path, monkeypatch, stage):
    """An exception at each stage of a save (and of the verified-state bookkeeping): at that instant and after it,
    checkpoint-latest.pth loads and holds the previous or the new state, never anything else; the verified
    fallback survives; the next start leaves no temporary file and a keeper that rolls back to a verified state."""
    keeper = harness.CheckpointKeeper(tmp_path, "main_pretrain")
    latest = tmp_path / LATEST
    labels_seen = []
    keeper.save({"model": {"w": torch.zeros(3)}}, "A")
    keeper.verify()  # a finite loss came from A
    armed = {"on": True}

    def hook(where: str, path: Path) -> None:
        if armed["on"] and where == stage:
            armed["on"] = False
            labels_seen.append(torch.load(latest, weights_only=True)["state_label"])  # loads at this instant
            raise RuntimeError(f"injected at {where}")

    monkeypatch.setattr(uio, "fault_point", hook)
    with pytest.raises(RuntimeError, match="injected"):
        keeper.save({"model": {"w": torch.ones(3)}}, "B", epoch=0,
                    args=type("A", (), {"checkpoint_interval": 1, "epochs": 9})())
    assert labels_seen and labels_seen[0] in ("A", "B")
    now = torch.load(latest, weights_only=True)["state_label"]
    assert now == ("B" if stage == "after_rename" else "A"), now
    # the next start: cleanup, then a keeper that knows which state is verified
    monkeypatch.setattr(uio, "fault_point", lambda where, path: None)
    harness.remove_stale_temp_files(tmp_path)
    assert not list(tmp_path.glob(f".*{uio.TEMP_SUFFIX}"))
    assert torch.load(latest, weights_only=True)["state_label"] == now
    again = harness.CheckpointKeeper(tmp_path, "main_pretrain")
    if again.pending is not None:  # B was never verified: a non-finite loss from it goes back to A
        again.reject()
        assert torch.load(latest, weights_only=True)["state_label"] == "A"


@pytest.mark.parametrize("stage,n,pattern", [("before_temp", 3, ""), ("mid_write", 2, ""), ("before_rename", 3, ""),
                                             ("after_rename", 1, ""), ("after_rename", 2, ""),
                                             ("link", 2, ":.checkpoint-verified.pth")])
def test_sigkill_at_every_stage_then_identical_rerun(tmp_path, reference, capsys, stage, n, pattern):
    """A real SIGKILL (the SCALEMAE_FAULT hook) at each stage of a save, in a child process (forked, to spare the
    start-up; the SIGTERM test below runs `python main_pretrain.py`): checkpoint-latest.pth loads, the identical
    command resumes at the step it holds and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    log = tmp_path / "killed.log"
    status = forked_run(argv(out), log, **{uio.FAULT_ENV: f"{stage}:{n}{pattern}"})
    assert status == -signal.SIGKILL, log.read_text()[-2000:]
    assert torch.load(out / LATEST, weights_only=True)["writer"] == "main_pretrain"
    if stage in ("mid_write", "before_rename"):
        assert list(out.glob(f".{LATEST}.*{uio.TEMP_SUFFIX}")), "the killed save left no temporary file?"
    printed = rerun_and_check(out, reference, capsys)
    # the killed run's lock is stale (same host, dead PID): taken over with one warning, released at the end
    assert sum(line.startswith("WARNING: taking over") and "has ended" in line for line in printed.splitlines()) == 1
    if stage in ("mid_write", "before_rename"):
        assert "removed 1 temporary file(s)" in printed


def test_log_reconciled_with_the_resumed_checkpoint(tmp_path):
    """log.txt after a kill: a partial last line (killed mid-append) and lines of epochs after the resumed one are
    dropped, the resumed epoch's line missing (killed between the save and the append) is added from the line the
    checkpoint carries; a log that already agrees is left byte-identical."""
    from util.metrics import JsonlLogger

    logger = JsonlLogger(tmp_path)
    for epoch in range(3):
        logger.log({"epoch": epoch, "train_loss": 1.0 / (epoch + 1)})
    log = tmp_path / "log.txt"
    agreed = log.read_bytes()
    assert logger.reconcile(2, {"epoch": 2, "train_loss": 9.0}) == [] and log.read_bytes() == agreed
    with open(log, "a") as fh:
        fh.write('{"epoch": 3, "train_lo')
    notes = logger.reconcile(1, {"epoch": 1, "train_loss": 0.5})
    assert notes == ["dropped a partial last line", "dropped the line of epoch 2 (after the resumed epoch 1)"], notes
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}]
    log.write_text('{"epoch": 0, "train_loss": 1.0}\nnot json\n')
    assert logger.reconcile(1, {"epoch": 1, "x": 2}) == ["dropped an unreadable line",
                                                         "added the missing line of epoch 1"]
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1]
    log.unlink()
    assert logger.reconcile(0, {"epoch": 0}) == ["added the missing line of epoch 0"] and log.read_text() == \
        '{"epoch": 0}\n'


# ------------------------------------------------------------------------------------------------ signals
def test_sigterm_saves_mid_epoch_and_exits_75_then_resumes_exactly(tmp_path, reference, capsys):
    """SIGTERM to a running subprocess (as SLURM/torchrun send it): it finishes the step, saves a resumable state,
    prints one line and exits 75; the identical command continues at that step, bit-identical at the end."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "main_pretrain.py", *argv(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.time() + 300
        while not (out / LATEST).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # the first save (epoch 0 after 2 steps) is done: the run is training
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stops) == 1 and "rerun the same command" in stops[0] and "Traceback" not in err, err
    assert resume_point(out) >= (0, 2)  # the step boundary after the signal (the launcher's line says which)
    assert not (out / LOCK_NAME).exists()
    rerun_and_check(out, reference, capsys)


def test_sigusr1_in_process_stops_at_the_next_step(tmp_path, monkeypatch, reference, capsys):
    """SIGUSR1 (SLURM --signal=USR1@90) arriving during epoch 1, step 0: the run saves epoch 1 after 1 step (not a
    --save_every_steps multiple) and exits 75 via harness.run; the rerun resumes there, bit-identical."""
    out = tmp_path / "run"
    real_noise = engine_pretrain.mask_noise

    def noise_then_signal(args, epoch, step, *rest):
        if (epoch, step) == (1, 0):
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_noise(args, epoch, step, *rest)

    monkeypatch.setattr(engine_pretrain, "mask_noise", noise_then_signal)
    with pytest.raises(SystemExit) as exc:
        run_cli(argv(out))
    assert exc.value.code == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert "stopped by SIGUSR1" in err and "epoch 1 after 1 step(s)" in err, err
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(engine_pretrain, "mask_noise", real_noise)
    assert resume_point(out) == (1, 1)
    rerun_and_check(out, reference, capsys)


def test_ctrl_c_message_is_true(tmp_path, monkeypatch, capsys):
    """Ctrl-C stops at once: checkpoint-latest.pth keeps the last complete save, as the one line says."""
    out = tmp_path / "run"
    real_noise = engine_pretrain.mask_noise

    def interrupt(args, epoch, step, *rest):
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt
        return real_noise(args, epoch, step, *rest)

    monkeypatch.setattr(engine_pretrain, "mask_noise", interrupt)
    with pytest.raises(SystemExit) as exc:
        run_cli(argv(out))
    assert exc.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted (Ctrl-C): stopped at once") and "\n" not in err
    assert resume_point(out) == (1, 0) and not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------- full disk
def test_enospc_is_one_line_and_keeps_the_last_good_state(tmp_path, monkeypatch, reference, capsys):
    """OSError(ENOSPC) while writing the third checkpoint: one error line naming the folder and the size needed,
    exit 2, the previous checkpoint-latest.pth byte-identical, no temporary file; the rerun is exact."""
    out = tmp_path / "run"
    count = {"n": 0}
    before = {}

    def full_disk(where: str, path: Path) -> None:
        if where == "mid_write" and path.name == LATEST:
            count["n"] += 1
            if count["n"] == 3:
                before["bytes"] = (out / LATEST).read_bytes()
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uio, "fault_point", full_disk)
    with pytest.raises(SystemExit) as exc:
        run_cli(argv(out))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"cannot write {LATEST} in {out}: no space left on device" in err and "the file needs" in err, err
    assert (out / LATEST).read_bytes() == before["bytes"]
    assert not list(out.glob(f".*{uio.TEMP_SUFFIX}"))
    monkeypatch.setattr(uio, "fault_point", lambda where, path: None)
    rerun_and_check(out, reference, capsys)


def test_enospc_on_a_real_small_tmpfs(tmp_path, capsys):
    """A 40 MiB tmpfs (root only): the second 31 MiB checkpoint cannot be written. Skipped where mounting fails."""
    if os.geteuid() != 0:
        pytest.skip("not root: cannot mount a small tmpfs (the injected-ENOSPC test covers the logic)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs failed here (container without CAP_SYS_ADMIN?)")
    try:
        out = mnt / "run"
        with pytest.raises(SystemExit) as exc:
            run_cli(argv(out))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no space left on device" in err and str(out) in err, err
        assert torch.load(out / LATEST, weights_only=True)["state_label"] == "epoch 0 after 2 step(s)"
        assert not list(out.glob(f".*{uio.TEMP_SUFFIX}"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_vanished_output_folder_is_one_line(tmp_path):
    """The output folder removed (or unmounted) during a write: an OutputWriteError naming it, no traceback."""
    gone = tmp_path / "gone"
    gone.mkdir()

    def write_then_lose_the_folder(fh) -> None:
        fh.write(b"x")
        for p in gone.iterdir():
            p.unlink()
        gone.rmdir()

    with pytest.raises(uio.OutputWriteError, match=f"in {gone}: the folder no longer exists"):
        uio.atomic_write(gone / LATEST, write_then_lose_the_folder)


# ----------------------------------------------------------------------------------------------------- lock
def _lock(out: Path, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "earlier",
                                             "command": "python main_pretrain.py ...", **fields}))


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_second_run_is_refused_before_touching_anything(tmp_path, live_pid, capsys):
    out = tmp_path / "run"
    _lock(out, pid=live_pid)
    (out / ".checkpoint-latest.pth.abc.tmp").write_bytes(b"the live run is writing this")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exc:
        run_cli(argv(out))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"PID {live_pid}" in err and "is used by another run" in err, err
    assert _snapshot(out) == before


def test_lock_of_another_host_is_refused_and_says_how_to_remove_it(tmp_path, capsys):
    out = tmp_path / "run"
    _lock(out, pid=1, host="some-other-node")
    with pytest.raises(SystemExit):
        run_cli(argv(out))
    err = capsys.readouterr().err
    assert "another host" in err and f"delete {out / LOCK_NAME}" in err, err


@pytest.mark.parametrize("launcher", ["main_linprobe", "main_segment"])
def test_probe_and_segment_launchers_take_the_same_lock(tmp_path, live_pid, capsys, launcher):
    """The other launchers share the harness: a training run refuses a locked folder with the same line, and their
    keeper is the same class (the crash-consistency tests above cover it)."""
    import importlib

    module = importlib.import_module(launcher)
    out = tmp_path / "run"
    _lock(out, pid=live_pid)
    before = _snapshot(out)
    extra = ["--config", str(REPO / "config" / "demo.yaml")] if launcher == "main_linprobe" else []
    with pytest.raises(SystemExit) as exc:
        harness.run(module.main, module.get_args_parser(),
                    ["--device", "cpu", "--num_workers", "0", "--allow_random_init", "--output_dir", str(out),
                     *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is used by another run" in err, err
    assert _snapshot(out) == before
    assert "harness.TrainingRun(args, out_dir, WRITER" in (REPO / f"{launcher}.py").read_text()  # its keeper


# ----------------------------------------------------------------------------------------------- evaluation
def test_eval_only_never_writes_checkpoints_even_while_training_holds_the_folder(reference, live_pid, capsys):
    """--eval_only on a training run's folder (locked by a live run, with a save in progress): it evaluates,
    leaves every checkpoint and temporary file byte- and mtime-identical, and takes no lock."""
    out = REFERENCE_RUN[0]
    _lock(out, pid=live_pid)
    (out / ".checkpoint-latest.pth.abc.tmp").write_bytes(b"the live run is writing this")
    before = {k: v for k, v in _snapshot(out).items() if "checkpoint" in k or k == LOCK_NAME}
    result = run_cli(["--eval_only", "--eval_dataset", "demo", "--eval_scale", "32", "--device", "cpu",
                      "--num_workers", "0", "--output_dir", str(out)])
    assert 32 in result["scales"]
    after = {k: v for k, v in _snapshot(out).items() if "checkpoint" in k or k == LOCK_NAME}
    assert after == before
    assert (out / "knn.json").is_file()  # it did write its own report
    for leftover in (out / LOCK_NAME, out / ".checkpoint-latest.pth.abc.tmp"):
        leftover.unlink()


def test_lock_of_an_earlier_start_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch, capsys):
    """A requeued SLURM job (same job ID, next restart count) may land on another node: its earlier start's lock
    is taken over with a warning; another job's lock from another host is still refused."""
    from harness.run_control import LockRefused, OutputLock

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _lock(tmp_path, pid=1, host="node-17", slurm="4242.0")
    lock = OutputLock(tmp_path)
    lock.acquire()
    assert "earlier start of this SLURM job" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    _lock(tmp_path, pid=1, host="node-17", slurm="999.0")
    with pytest.raises(LockRefused, match="another host"):
        OutputLock(tmp_path).acquire()


@pytest.mark.parametrize("latest_exists", [False, True])
def test_good_state_left_by_the_older_version_is_recovered(tmp_path, capsys, latest_exists):
    """The older keeper renamed checkpoint-latest.pth to .checkpoint-latest.pth.verified.tmp before writing the new
    one: start-up cleanup gives it back its name (one line) instead of deleting the only good state; when the new
    latest file was completed, the old one becomes the verified fallback."""
    aside = tmp_path / harness.OLD_ASIDE
    torch.save({"model": {"w": torch.zeros(2)}, "state_label": "good"}, aside)
    if latest_exists:
        torch.save({"model": {"w": torch.ones(2)}, "state_label": "newer"}, tmp_path / LATEST)
    (tmp_path / f".{LATEST}.x1y2.tmp").write_bytes(b"half a checkpoint")
    harness.remove_stale_temp_files(tmp_path)
    printed = capsys.readouterr().out
    label = torch.load(tmp_path / LATEST, weights_only=True)["state_label"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST] + ([harness.VERIFIED] if latest_exists
                                                                           else []))
    if latest_exists:
        assert label == "newer" and "recovered" not in printed
        keeper = harness.CheckpointKeeper(tmp_path, "main_pretrain")
        assert keeper.pending is not None
        keeper.reject()  # the newer state was never verified: a NaN from it goes back to the good one
        assert torch.load(tmp_path / LATEST, weights_only=True)["state_label"] == "good"
    else:
        assert label == "good" and sum(line.startswith("recovered") for line in printed.splitlines()) == 1


STOP_DDP_SCRIPT = '''
import os, signal, sys, types
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import engine_pretrain
from util.amp import AmpConfig
from harness.run_control import StopRequest


class Stub(torch.nn.Module):  # the engine's model interface; a real model changes nothing about the stop
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, imgs, targets, noise=None, loss_only=True, **kwargs):
        return (imgs.mean(dim=(0, 2, 3)) * self.w).sum() ** 2


dist.init_process_group("gloo")
rank = dist.get_rank()
ddp = torch.nn.parallel.DistributedDataParallel(Stub())
args = types.SimpleNamespace(accum_iter=1, print_freq=3, batch_size=2, mask_ratio=0.75, clip_grad=None, lr=1e-3,
                             min_lr=0.0, warmup_epochs=0, epochs=1, source_size=[32], source_size_scheduler="constant",
                             input_size=32, patch_size=16, seed=0, save_every_steps=0)
batch = (torch.rand(2, 3, 32, 32), torch.ones(2), torch.rand(2, 3, 64, 64), torch.ones(2))
stop = StopRequest().install()
done = []

def step_end(step):
    done.append(step)
    if rank == 1 and step == 1:  # the signal reaches rank 1 only
        os.kill(os.getpid(), signal.SIGUSR1)

engine_pretrain.train_one_epoch(ddp, [batch] * 8, torch.optim.AdamW(ddp.parameters()), torch.device("cpu"), 0,
                                AmpConfig("none", torch.device("cpu")), args, on_step_end=step_end, stop=stop)
print(f"RANK {rank} steps {done} agreed {stop.agreed} requested {stop.requested}", flush=True)
dist.barrier()  # both ranks done before teardown (gloo may abort a rank that tears down while its peer still talks)
dist.destroy_process_group()
'''


def test_ddp_ranks_agree_on_the_stop_step_when_one_rank_is_signalled(tmp_path):
    """Two gloo ranks; SIGUSR1 reaches rank 1 only (after step 1): both stop after the same step, the one whose
    flush (the engine's existing all-reduce, --print_freq 3: step 3) carried the flag."""
    script = tmp_path / "stop_ddp.py"
    script.write_text(STOP_DDP_SCRIPT)
    ranks = run_ranks([str(script), str(REPO)], cwd=tmp_path, env=subprocess_env(), timeout=240)
    outputs = [out for _, out in ranks]
    text = "\n".join(outputs)
    assert all(code == 0 for code, _ in ranks), text
    assert "RANK 0 steps [0, 1, 2, 3] agreed True requested False" in outputs[0], text
    assert "RANK 1 steps [0, 1, 2, 3] agreed True requested True" in outputs[1], text


def test_probe_and_segment_engines_stop_after_the_signalled_step():
    """The linear-probe/finetune and segmentation engines end the epoch after the step in which a stop was asked
    for (their launchers then save that step's resumable state and exit 75, see below)."""
    import engine_finetune
    import engine_segment
    from util.amp import AmpConfig
    from harness.run_control import StopRequest

    cpu = torch.device("cpu")
    amp = AmpConfig("none", cpu)
    args = type("A", (), dict(accum_iter=1, print_freq=100, lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=1,
                              batch_size=2, ignore_index=255, dice_weight=0.0, aux_weight=0.0, clip_grad=None))()

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x, input_res=None, return_aux=False):
            out = self.head(x.mean(dim=(2, 3)))
            if return_aux:  # segmentation: per-pixel logits
                return out[:, :, None, None].expand(-1, -1, *x.shape[2:]), None
            return out

    probe_batch = (torch.rand(2, 3, 8, 8), torch.ones(2), torch.tensor([0, 1]))
    seg_batch = {"image": torch.rand(2, 3, 8, 8), "mask": torch.zeros(2, 8, 8, dtype=torch.long),
                 "res": torch.ones(2)}
    for engine, call in ((engine_finetune, lambda m, data, stop, seen: engine_finetune.train_one_epoch(
            m, torch.nn.CrossEntropyLoss(), data, torch.optim.SGD(m.parameters(), lr=0.1), cpu, 0, amp, args,
            on_finite_loss=lambda: seen.append(1), stop=stop)), (engine_segment, lambda m, data, stop, seen:
            engine_segment.train_one_epoch(m, data, torch.optim.SGD(m.parameters(), lr=0.1), cpu, 0, amp, args,
                                           on_finite_loss=lambda: seen.append(1), stop=stop))):
        stop, seen = StopRequest(), []
        batch = probe_batch if engine is engine_finetune else seg_batch

        def data():
            for i in range(6):
                if i == 2:
                    stop.signal_name = "SIGTERM"  # arrives while step 2 is loaded
                yield batch

        class Sized:
            def __iter__(self):
                return data()

            def __len__(self):
                return 6

        call(Probe(), Sized(), stop, seen)
        assert stop.agreed and len(seen) == 3, (engine.__name__, len(seen))  # steps 0, 1, 2 ran; not 3-5


@pytest.fixture(scope="module")
def seg_scenes(tmp_path_factory) -> str:
    """The smallest synthetic building scenes (2 training tiles, 1 validation tile of 64 px); their config."""
    from dataloaders.seg_synthetic import make_building_scenes

    return str(make_building_scenes(tmp_path_factory.mktemp("seg"), n_train=2, n_val=1, size=64, count=3)["config"])


def stop_launcher_argv(launcher: str, out: Path, seg_config: str) -> list[str]:
    """A 2-epoch run of 4 optimizer steps per epoch of ``launcher`` (tiny ViT, 32 px, CPU, no workers)."""
    common = ["--model", "vit_tiny_patch16", "--allow_random_init", "--input_size", "32", "--epochs", "2",
              "--device", "cpu", "--num_workers", "0", "--print_freq", "100", "--output_dir", str(out)]
    if launcher == "main_segment":
        return [*common, "--config", seg_config, "--batch_size", "2", "--head_channels", "16", "--aux_channels", "8",
                "--data_override", "data.length=8", "data.size=32"]
    return [*common, "--config", DEMO, "--eval_dataset", "demo", "--eval_scale", "32", "--batch_size", "4",
            "--data_override", "data.length=16", "data.size=64", *(["--finetune"] if launcher == "finetune" else [])]


@pytest.mark.parametrize("launcher", ["main_linprobe", "finetune", "main_segment"])
def test_probe_and_segment_sigusr1_save_mid_epoch_and_resume_exactly(tmp_path, monkeypatch, capsys, seg_scenes,
                                                                     launcher):
    """SIGUSR1 arriving during epoch 1, step 1 of a linear probe / finetune / segmentation run: it finishes that
    step, saves epoch 1 after 2 steps (resume_epoch/resume_step + RNG) and exits 75 with one line; the identical
    command says it starts at epoch 1, step 2, logs each epoch once and ends with the uninterrupted run's weights,
    bit for bit (the skipped batches are not reloaded and the saved RNG state is restored before the next one)."""
    import importlib

    module = importlib.import_module("main_segment" if launcher == "main_segment" else "main_linprobe")
    engine = importlib.import_module("engine_segment" if launcher == "main_segment" else "engine_finetune")

    def run(out: Path) -> None:
        harness.run(module.main, module.get_args_parser(), stop_launcher_argv(launcher, out, seg_scenes))

    run(tmp_path / "reference")
    reference = weights(tmp_path / "reference")
    real_lr = engine.adjust_learning_rate

    def lr_then_signal(optimizer, fractional_epoch, args):
        if 1 < fractional_epoch < 2 and signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGUSR1)  # epoch 1, step 1 (step 0 is epoch 1.0); once: the stop restores
        return real_lr(optimizer, fractional_epoch, args)

    out = tmp_path / "run"
    monkeypatch.setattr(engine, "adjust_learning_rate", lr_then_signal)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(out)
    assert exc.value.code == EXIT_PREEMPTED
    err = capsys.readouterr().err
    stops = [line for line in err.splitlines() if line.startswith("stopped by SIGUSR1")]
    assert len(stops) == 1 and "epoch 1 after 2 step(s)" in stops[0] and "rerun the same command" in stops[0], err
    assert "Traceback" not in err and not (out / LOCK_NAME).exists()
    assert resume_point(out) == (1, 2)
    assert "rng" in torch.load(out / LATEST, weights_only=True)

    monkeypatch.setattr(engine, "adjust_learning_rate", real_lr)
    run(out)
    assert "starting at epoch 1, step 2" in capsys.readouterr().out
    assert_bitwise_equal(weights(out), reference)
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1], epochs
    assert not (out / harness.VERIFIED).exists() and not list(out.glob(f".*{uio.TEMP_SUFFIX}"))


@pytest.mark.parametrize("code,words", [(errno.EROFS, "the file system is read-only"),
                                        (errno.EACCES, "permission denied")])
def test_read_only_or_unwritable_folder_is_one_line_and_keeps_the_file(tmp_path, monkeypatch, code, words):
    path = uio.atomic_write_text(tmp_path / "config.yaml", "old\n")

    def refuse(where: str, p: Path) -> None:
        if where == "mid_write":
            raise OSError(code, os.strerror(code), str(tmp_path / ".config.yaml.x.tmp"))

    monkeypatch.setattr(uio, "fault_point", refuse)
    with pytest.raises(uio.OutputWriteError, match=f"cannot write config.yaml in {tmp_path}: {words}"):
        uio.atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_evaluation_runs_take_no_lock_and_clean_nothing(tmp_path, live_pid):
    """prepare_output of an evaluation run (what --eval_only / --eval pass) on a folder a live run holds: no
    refusal, the lock and the live run's temporary file untouched; all three launchers pass their eval flag."""
    _lock(tmp_path, pid=live_pid)
    partial = tmp_path / ".checkpoint-latest.pth.abc.tmp"
    partial.write_bytes(b"the live run is writing this")
    before = _snapshot(tmp_path)
    args = main_pretrain.get_args_parser().parse_args(["--output_dir", str(tmp_path)])
    assert harness.prepare_output(args, training=False) == tmp_path
    assert _snapshot(tmp_path) == before
    with pytest.raises(harness.LockRefused):
        harness.prepare_output(args, training=True)
    assert _snapshot(tmp_path) == before
    for launcher, flag in (("main_pretrain", "eval_only"), ("main_linprobe", "eval"), ("main_segment", "eval")):
        assert f"prepare_output(args, training=not args.{flag})" in (REPO / f"{launcher}.py").read_text()
