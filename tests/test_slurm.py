"""The Slurm templates' shell logic, with Slurm's variables set by hand and ``srun`` /
``scontrol`` stubbed by scripts on PATH; one job really trains through the template.

The ``srun`` stub records its arguments and the environment it was given; with
``STUB_EXEC=1`` it runs the command as node 0, its output into the ``--output`` file.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from segcore.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "slurm" / "train.sbatch"
SWEEP = ROOT / "launch" / "slurm" / "sweep.sbatch"

SRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$STUB_DIR/srun.args"
echo "$OMP_NUM_THREADS" > "$STUB_DIR/srun.omp"
out=
while [ $# -gt 0 ]; do
  case $1 in --output=*) out=${1#--output=} ;; -*) ;; *) break ;; esac
  shift
done
[ "${STUB_EXEC:-0}" = 1 ] || exit 0
out=${out//%n/0}
if [ -n "$out" ]; then exec "$@" > "$out" 2>&1; else exec "$@"; fi
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1
"""
FAKE_PYTHON = """#!/bin/bash
exit 0
"""  # answers the template's "import torch" check at once (dry runs only)


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def slurm(tmp_path):
    """Run a template as ``sbatch`` would on one node; returns (proc, srun args, omp)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    _script(stubs / "srun", SRUN)
    _script(stubs / "scontrol", SCONTROL)
    fake_python = _script(tmp_path / "fake-python", FAKE_PYTHON)

    def run(template: Path, *args: str, execute: bool = False, background: bool = False,
            **env_over: str):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SEGBENCH_", "OMP_"))}
        env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", STUB_DIR=str(stubs),
                   SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="node[1]",
                   SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="8",
                   SEGBENCH_PYTHON=sys.executable if execute else str(fake_python),
                   STUB_EXEC="1" if execute else "0")
        env.update(env_over)
        env = {k: v for k, v in env.items() if v is not None}
        (stubs / "srun.args").unlink(missing_ok=True)
        if background:  # the running batch shell, for signals
            return subprocess.Popen(["bash", str(template), *args], env=env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        proc = subprocess.run(["bash", str(template), *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        argv = ((stubs / "srun.args").read_text().split("\0")[:-1]
                if (stubs / "srun.args").exists() else None)
        omp = (stubs / "srun.omp").read_text().strip() if argv is not None else None
        return proc, argv, omp

    return run


def opt(argv: list[str], name: str) -> str:
    """The value of ``name=VALUE`` in argv."""
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


def test_train_template_sizes_a_cpu_only_node_and_passes_the_cpus_to_srun(slurm, tmp_path):
    proc, argv, omp = slurm(TRAIN, "--epochs", "1", SLURM_CPUS_PER_TASK="8")
    assert proc.returncode == 0, proc.stderr
    # srun gets the job's CPUs explicitly (not inherited on Slurm >= 22.05)
    assert opt(argv, "--cpus-per-task") == "8"
    # no GPUs: one worker per node with all 8 cores, never 0 threads
    assert opt(argv, "--nproc-per-node") == "1" and omp == "8"
    # a run id and absolute output paths under the checkout, one log per node
    i = argv.index("--run-id")
    assert argv[i + 1] == "slurm-4242"
    assert argv[argv.index("--out") + 1] == str(ROOT / "runs" / "slurm-4242")
    assert opt(argv, "--output") == str(ROOT / "runs" / "slurm-4242" / "slurm" / "node%n.log")
    assert str(ROOT / "launch" / "train.py") in argv


def test_train_template_one_worker_per_gpu_and_threads_split(slurm):
    _, argv, omp = slurm(TRAIN, SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16")
    assert opt(argv, "--nproc-per-node") == "4" and omp == "4"
    _, argv, omp = slurm(TRAIN, SEGBENCH_NPROC_PER_NODE="4", SLURM_CPUS_PER_TASK="2")
    assert opt(argv, "--nproc-per-node") == "4" and omp == "1"  # oversubscribed: 1, not 0


def test_each_job_gets_its_own_rendezvous_port(slurm):
    ports = set()
    for job in ("4242", "4243"):
        _, argv, _ = slurm(TRAIN, SLURM_JOB_ID=job)
        host, port = opt(argv, "--rdzv-endpoint").split(":")
        assert host == "127.0.0.1" and opt(argv, "--rdzv-id") == job
        ports.add(int(port))
    assert len(ports) == 2 and all(15000 <= p < 30000 for p in ports)
    _, argv, _ = slurm(TRAIN, SEGBENCH_RDZV_PORT="23456")
    assert opt(argv, "--rdzv-endpoint").endswith(":23456")


def test_flags_name_the_run_and_output(slurm):
    _, argv, _ = slurm(TRAIN, "--run-id", "mine", "--out=rel/dir")
    # the template's own --run-id / --out agree with the user's (which come last and win)
    assert argv[argv.index("--run-id") + 1] == "mine"
    assert argv[argv.index("--out") + 1] == str(ROOT / "rel" / "dir")
    assert opt(argv, "--output") == str(ROOT / "rel" / "dir" / "slurm" / "node%n.log")
    assert argv[-3:] == ["--run-id", "mine", "--out=rel/dir"]


@pytest.mark.parametrize("template", [TRAIN, SWEEP], ids=["train", "sweep"])
def test_a_directory_that_is_not_the_checkout_is_refused(slurm, tmp_path, template):
    proc, argv, _ = slurm(template, SLURM_SUBMIT_DIR=str(tmp_path))
    assert proc.returncode == 2 and argv is None
    assert "not a segbench checkout" in proc.stderr and "SEGBENCH_ROOT" in proc.stderr
    proc, argv, _ = slurm(template, SLURM_SUBMIT_DIR=str(tmp_path), SEGBENCH_ROOT=str(ROOT))
    assert proc.returncode == 0 and argv is not None


def test_an_interpreter_without_torch_is_refused_with_the_fix(slurm, tmp_path):
    no_torch = _script(tmp_path / "bare-python", "#!/bin/bash\nexit 1\n")
    proc, argv, _ = slurm(TRAIN, SEGBENCH_PYTHON=str(no_torch))
    assert proc.returncode == 2 and argv is None
    assert "cannot import torch" in proc.stderr and "SEGBENCH_PYTHON" in proc.stderr


def test_sweep_template_passes_nodes_endpoint_id_and_per_node_logs(slurm):
    proc, argv, _ = slurm(SWEEP, "--gpus", "1,2", SLURM_NNODES="2", SLURM_JOB_ID="77")
    assert proc.returncode == 0, proc.stderr
    assert opt(argv, "--nodes") == "2" and opt(argv, "--cpus-per-task") == "8"
    i = argv.index(str(ROOT / "launch" / "sweep.py"))
    sweep = argv[i + 1:]
    assert sweep[sweep.index("--nnodes") + 1] == "2"
    assert sweep[sweep.index("--rdzv-endpoint") + 1] == f"127.0.0.1:{15000 + 77}"
    assert sweep[sweep.index("--sweep-id") + 1] == "slurm-77"
    out = ROOT / "runs" / "sweeps" / "slurm-77"
    assert sweep[sweep.index("--out") + 1] == str(out)
    assert opt(argv, "--output") == str(out / "slurm" / "node%n.log")
    assert sweep[-2:] == ["--gpus", "1,2"]


@pytest.mark.multiproc
def test_train_template_trains_and_writes_a_row_with_its_run_id(slurm, tmp_path):
    out = tmp_path / "run"
    proc, argv, _ = slurm(
        TRAIN, "--image-size", "32", "--widths", "8,16", "--norm", "group",
        "--synthetic-images", "12", "--mode", "throughput", "--warmup-steps", "0",
        "--steps", "2", "--batch-size", "2", "--out", str(out), execute=True,
        SLURM_CPUS_PER_TASK="1", SEGBENCH_RDZV_PORT=str(free_port()),
        SEGBENCH_CACHE=str(tmp_path / "cache"))
    log = out / "slurm" / "node0.log"
    assert proc.returncode == 0, proc.stderr + (log.read_text()[-3000:] if log.exists() else "")
    row = json.loads((out / "result.json").read_text())
    assert row["run_id"] == "slurm-4242" and row["status"] == "ok"
    assert row["world_size"] == 1 and row["engine"] == "ddp"
    assert "done:" in log.read_text()  # the node's output went to its own log


@pytest.mark.multiproc
def test_a_failing_job_says_so_with_each_node_error(slurm, tmp_path):
    out = tmp_path / "bad"
    proc, _, _ = slurm(TRAIN, "--batch-size", "0", "--out", str(out), execute=True,
                       SEGBENCH_RDZV_PORT=str(free_port()))
    assert proc.returncode != 0
    assert "job 4242 failed" in proc.stderr
    assert f"== {out / 'slurm' / 'node0.log'}" in proc.stderr
    assert "batch_size" in proc.stderr  # the node's own error line, shown in the job output


# Slow (11 s): SIGTERM handling runs in CI through the sweep (test_integrity); this adds the template.
@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_before_the_time_limit_reaches_the_workers_and_resume_keeps_the_id(
        slurm, tmp_path):
    """Slurm's early signal (--signal=B:TERM@60) goes to the batch shell, which passes it
    on: the run stops as on Ctrl-C with an `interrupted` row; the resubmitted job resumes
    under the run's own id and keeps the first job's node log."""
    import signal
    import time

    assert "#SBATCH --signal=B:TERM@60" in TRAIN.read_text()
    assert "#SBATCH --signal=B:TERM@60" in SWEEP.read_text()
    out = tmp_path / "run"
    common = ["--image-size", "32", "--widths", "8,16", "--synthetic-images", "24",
              "--batch-size", "2", "--mode", "accuracy", "--out", str(out)]
    env = dict(SLURM_CPUS_PER_TASK="1", SEGBENCH_CACHE=str(tmp_path / "cache"))
    proc = slurm(TRAIN, *common, "--epochs", "200", execute=True, background=True,
                 SEGBENCH_RDZV_PORT=str(free_port()), **env)
    log = out / "slurm" / "node0.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "epoch 2/200" in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGTERM (time limit, scancel or preemption)" in err
    assert "interrupted (SIGTERM)" in log.read_text()
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "interrupted" and row["run_id"] == "slurm-4242"
    first_log = log.read_text()
    proc, _, _ = slurm(TRAIN, *common, "--epochs", "3", "--resume", execute=True,
                       SLURM_JOB_ID="5151", SEGBENCH_RDZV_PORT=str(free_port()), **env)
    assert proc.returncode == 0, proc.stderr + log.read_text()[-2000:]
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "ok" and row["run_id"] == "slurm-4242"  # not slurm-5151
    assert (out / "slurm" / "node0.before-job5151.log").read_text() == first_log
