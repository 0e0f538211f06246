"""The Slurm job scripts (slurm/*.sh) under a real Slurm: a private two-node cluster on this machine.

The module installs Slurm when it is missing (Debian's slurmctld / slurmd / slurm-client / munge; root and
apt-get needed, else the Slurm cases are skipped with the reason), starts munged, slurmctld and two slurmd
(nodes ``mtnode1`` and ``mtnode2``, both on 127.0.0.1, with their own config, spool directories and free
ports under a temporary directory), and stops exactly those processes at the end.  The tests submit the
project's scripts unchanged; the CPU settings come through the documented overrides (``sbatch`` options and
environment variables): a tiny LaMemo on a copy-task corpus, one gloo process per node.

What is checked:
* every launch style (torchrun with c10d or static rendezvous, one srun task per rank, DeepSpeed's runner with
  its slurm launcher, one DeepSpeed launcher per node without ssh) trains across both nodes with world size 2,
  and gives the same losses as the others;
* a job signalled mid-run (``scancel --batch --signal=USR1``, what ``#SBATCH --signal=B:USR1@300`` does) saves,
  requeues itself and resumes: its losses equal the uninterrupted run's step by step;
* the wall-time guard stops, saves and requeues without a signal;
* a rank that dies ends the whole job with a non-zero status, quickly, leaving no process behind;
* a run on 2 nodes resumes on 1 node (data-parallel size 2 -> 1).
"""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_task, free_port

PY = sys.executable
NODES = ["mtnode1", "mtnode2"]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
STEPS = 24

# a tiny LaMemo on the copy task, fp32 (exact comparisons), one thread per process
TRAIN_ARGS = ("--model.n_layer 2 --model.d_model 32 --model.n_head 2 --model.d_head 16 --model.d_inner 64 "
              "--model.tgt_len 8 --model.mem_len 16 --train.threads 1 --log.interval 1 --log.progress false "
              "--log.tensorboard false --checkpoint.export false --eval.final_splits []")
# resources of a GPU script, overridden for two CPU "nodes" with one task each
CPU_SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0"]


# ------------------------------------------------------------------------------------------------ Slurm
SLURM_CONF = """ClusterName=memtrain-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
ReturnToService=2
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=4
Waittime=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _die_with_parent() -> None:
    """In the daemon, before exec: SIGTERM when this test process dies, even if it never reaches its
    finalizer (killed, or ended by a timeout)."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _have_slurm() -> bool:
    return all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey"))


def _install_slurm() -> None:
    """Install Slurm with apt-get, or skip the module saying why it cannot be done here."""
    if _have_slurm():
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root (apt-get install slurmctld slurmd "
                    "slurm-client munge)")
    if not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and this machine has no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"] + PACKAGES
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:  # stale or missing package lists
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not _have_slurm():
        pytest.skip(f"apt-get could not install {' '.join(PACKAGES)}: {(r.stdout + r.stderr)[-500:]}")


class LocalSlurm:
    """munged + slurmctld + one slurmd per node, all children of this process; ``stop()`` ends exactly them."""

    def __init__(self):
        # munged wants its socket directory and every ancestor world-searchable: a directory right under /tmp
        self.dir = Path(tempfile.mkdtemp(prefix="memtrain-slurm-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.procs = []             # (name, Popen)
        self.hosts_line = None      # the line added to /etc/hosts, removed again by stop()
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "etc" / "slurm.conf"))
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":  # a test run inside a Slurm job must not leak that job into ours
                del self.env[k]
        self.master_addr = None     # set when the node names cannot be made to resolve

    def _log(self, name):
        return open(self.dir / "log" / f"{name}.out", "w")

    def _resolve_nodes(self) -> None:
        """``scontrol show hostnames`` gives the node names; the scripts rendezvous on the first one."""
        missing = []
        for n in NODES:
            try:
                socket.gethostbyname(n)
            except OSError:
                missing.append(n)
        if not missing:
            return
        line = "127.0.0.1 " + " ".join(missing) + "  # memtrain test_slurm\n"
        try:
            with open("/etc/hosts", "a") as f:
                f.write(line)
            self.hosts_line = line
        except OSError:
            self.master_addr = "127.0.0.1"

    def start(self, timeout: float = 60.0) -> None:
        d = self.dir
        for sub in ("etc", "state", "log", "munge", *[f"spool/{n}" for n in NODES]):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o755)
        self._resolve_nodes()
        subprocess.run(["mungekey", "--create", f"--keyfile={d}/munge/munge.key"], check=True,
                       capture_output=True, timeout=30)
        os.chmod(d / "munge" / "munge.key", 0o600)
        self.procs.append(("munged", subprocess.Popen(
            ["munged", "-F", f"--key-file={d}/munge/munge.key", f"--socket={d}/munge/munge.sock",
             f"--pid-file={d}/munge/munged.pid", f"--seed-file={d}/munge/munged.seed",
             f"--log-file={d}/log/munged.log"], stdout=self._log("munged"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)))
        t0 = time.time()
        while not (d / "munge" / "munge.sock").exists():
            if self.procs[0][1].poll() is not None or time.time() - t0 > 20:
                raise RuntimeError("munged did not start: " + (d / "log" / "munged.out").read_text())
            time.sleep(0.05)
        ports = [free_port() for _ in range(2 + len(NODES))]
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports[2 + i]} "
                          f"CPUs=8 RealMemory=4000 State=UNKNOWN" for i, n in enumerate(NODES))
        (d / "etc" / "slurm.conf").write_text(SLURM_CONF.format(
            ctld_port=ports[0], slurmd_port=ports[1], munge=d / "munge", d=d, nodes=nodes))
        self.procs.append(("slurmctld", subprocess.Popen(
            ["slurmctld", "-D", "-c"], env=self.env, stdout=self._log("slurmctld"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)))
        for n in NODES:
            self.procs.append((f"slurmd-{n}", subprocess.Popen(
                ["slurmd", "-D", "-N", n], env=self.env, stdout=self._log(f"slurmd-{n}"),
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)))
        t0 = time.time()
        while True:
            r = self.run("sinfo", "-h", "-o", "%T %D")
            if r.stdout.strip() == f"idle {len(NODES)}":
                return
            dead = [name for name, p in self.procs if p.poll() is not None]
            if dead or time.time() - t0 > timeout:
                logs = "".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in (d / "log").glob("*.out"))
                raise RuntimeError(f"Slurm not ready (exited: {dead}): {r.stdout}{r.stderr}\n{logs}")
            time.sleep(0.2)

    def run(self, *cmd, timeout=60):
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def job_processes(self, job_id=None):
        """PIDs of live processes started by a job of this cluster (their environment names our SLURM_CONF),
        or by job ``job_id`` only."""
        needle = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        wanted = (lambda e: e == f"SLURM_JOB_ID={job_id}".encode()) if job_id else \
            (lambda e: e.startswith(b"SLURM_JOB_ID="))
        pids = []
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) == os.getpid():
                continue
            try:
                environ = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
                stat = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            if needle in environ and any(wanted(e) for e in environ) and ") Z " not in stat:
                pids.append(int(p))
        return pids

    def stop(self) -> None:
        for name, p in reversed(self.procs):         # slurmd(s), slurmctld, then munged
            if p.poll() is None:
                p.terminate()
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.hosts_line:
            with open("/etc/hosts") as f:
                lines = f.readlines()
            if self.hosts_line in lines:
                lines.remove(self.hosts_line)
                with open("/etc/hosts.memtrain-tmp", "w") as f:
                    f.writelines(lines)
                shutil.copymode("/etc/hosts", "/etc/hosts.memtrain-tmp")
                try:
                    os.replace("/etc/hosts.memtrain-tmp", "/etc/hosts")
                except OSError:  # a bind-mounted /etc/hosts cannot be replaced: rewrite it in place
                    with open("/etc/hosts", "w") as f:
                        f.writelines(lines)
                    os.unlink("/etc/hosts.memtrain-tmp")
            self.hosts_line = None
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm():
    _install_slurm()
    if os.geteuid() != 0:
        pytest.skip("a private Slurm needs root here (slurmd runs jobs as any user)")
    cluster = LocalSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        leftovers = cluster.job_processes()
        for pid in leftovers:        # never expected: the scripts leave nothing running (asserted below)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        cluster.stop()


@pytest.fixture(scope="module")
def data(slurm):
    return copy_task(slurm.dir / "data" / "copy", train_size=4000, eval_size=100)


# ------------------------------------------------------------------------------------------------ jobs
class Job:
    """One ``sbatch --wait`` submission running in the background."""

    def __init__(self, slurm, script, env, sbatch_args, log_dir):
        self.slurm = slurm
        self.log_dir = Path(log_dir)
        self.run_dir = Path(env["RUN_DIR"])
        self.started = time.time()
        self.proc = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", "--output", f"{log_dir}/%x-%j.out", *sbatch_args,
             os.path.join("slurm", script)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.proc.wait(timeout=30)
            raise AssertionError(f"sbatch failed: {self.proc.stderr.read()}")
        self.id = line.split(";")[0]
        self.rc = None

    def wait(self, timeout=600) -> int:
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.slurm.run("scancel", self.id)
            self.proc.wait(timeout=60)
            raise AssertionError(f"job {self.id} still running after {timeout} s:\n{self.log()[-4000:]}")
        return self.rc

    def log(self) -> str:
        logs = list(self.log_dir.glob(f"*-{self.id}.out"))
        return logs[0].read_text() if logs else ""

    def state(self) -> str:
        return self.slurm.run("squeue", "-h", "-j", self.id, "-o", "%T %r").stdout.strip()

    def steps_logged(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        return sum(1 for line in path.read_text().splitlines() if '"kind": "train"' in line)


def submit(slurm, data, tmp, name, script="lamemo_large.sh", sbatch_args=CPU_SBATCH, **env_over):
    env = dict(slurm.env, GPUS_PER_NODE="0", PRESET="lamemo_tiny", DATA_PATH=data,
               DS_CONFIG="ds_configs/zero2_fp32.json", RUN_DIR=str(tmp / name), GLOBAL_BATCH="4",
               TRAIN_ARGS=f"--train-iters {STEPS} " + TRAIN_ARGS, MASTER_PORT=str(free_port()), PYTHON=PY,
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if slurm.master_addr:
        env["MASTER_ADDR"] = slurm.master_addr
    env.update({k: str(v) for k, v in env_over.items()})
    return Job(slurm, script, env, list(sbatch_args), tmp)


def train_losses(run_dir) -> dict:
    """step -> loss from metrics.jsonl (a resumed run appends; the last record of a step wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def latest_meta(run_dir) -> dict:
    tag = (Path(run_dir) / "latest").read_text().strip()
    return json.loads((Path(run_dir) / tag / "memtrain" / "meta.json").read_text())


def assert_two_nodes(log: str, world: int = 2) -> None:
    assert f"2 nodes ({' '.join(NODES)})" in log and f"world size {world}" in log, log[-3000:]
    assert f"run: world {world} (data-parallel {world} x tensor-parallel 1)" in log, log[-3000:]


# ------------------------------------------------------------------------------------------------ tests
STYLES = {  # name -> environment of the job
    "torchrun": {},
    "torchrun-static": {"TORCHRUN_RDZV": "static", "DS_CONFIG": "ds_configs/zero0_fp32.json"},
    "srun": {"LAUNCHER": "srun"},
    "deepspeed": {"LAUNCHER": "deepspeed"},
    "deepspeed-nossh": {"LAUNCHER": "deepspeed-nossh"},
}


@pytest.fixture(scope="module")
def style_runs(slurm, data, tmp_path_factory):
    """Every launch style on 2 nodes, submitted together (the cluster runs them side by side)."""
    tmp = tmp_path_factory.mktemp("styles")
    jobs = {name: submit(slurm, data, tmp, name, **env) for name, env in STYLES.items()}
    for job in jobs.values():
        job.wait()
    return jobs


def test_torchrun_trains_on_two_nodes_with_data_parallelism(style_runs):
    job = style_runs["torchrun"]
    log = job.log()
    assert job.rc == 0, log[-4000:]
    assert_two_nodes(log)
    for rank, node in enumerate(NODES):   # one torchrun per node
        assert f"node {node}: node rank {rank} of 2, torchrun starts 1 processes here" in log, log[-3000:]
    losses = train_losses(job.run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    meta = latest_meta(job.run_dir)
    assert meta["step"] == STEPS and meta["reason"] == "end" and meta["dp_size"] == 2
    assert "requeueing" not in log


@pytest.mark.parametrize("style", [s for s in STYLES if s != "torchrun"])
def test_every_launch_style_gives_the_same_training(style_runs, style):
    job = style_runs[style]
    log = job.log()
    assert job.rc == 0, log[-4000:]
    assert_two_nodes(log)
    losses, reference = train_losses(job.run_dir), train_losses(style_runs["torchrun"].run_dir)
    if "DS_CONFIG" in STYLES[style]:  # ZeRO-0 sums gradients in another order than ZeRO-2: last bits differ
        assert sorted(losses) == sorted(reference)
        assert [losses[s] for s in sorted(losses)] == pytest.approx([reference[s] for s in sorted(reference)],
                                                                    rel=1e-5)
    else:                             # same ranks, same reductions: the same numbers, bit for bit
        assert losses == reference
    assert latest_meta(job.run_dir)["dp_size"] == 2


def test_no_process_outlives_its_job(slurm, style_runs):
    time.sleep(1)
    assert slurm.job_processes() == []


class Scenario:
    """A job plus what the test does to it while it runs (``act`` is called every poll until the job ends)."""

    def __init__(self, job):
        self.job = job
        self.done_at = None

    def act(self) -> None:
        pass


class Signalled(Scenario):
    """After 3 steps: ``scancel --batch --signal=USR1``, what ``#SBATCH --signal=B:USR1@300`` sends before the
    time limit.  The requeued job is then released (see ``release``)."""
    signalled = False
    held_since = None   # when the test first saw the requeued job held (PENDING, reason BeginTime)

    def act(self):
        if not self.signalled and self.job.steps_logged() >= 3:
            r = self.job.slurm.run("scancel", "--batch", "--signal=USR1", self.job.id)
            assert r.returncode == 0, r.stderr
            self.signalled = True
        elif self.signalled:
            self.held_since = release(self.job, self.held_since)


class WallTime(Scenario):
    """The guard stops the run and the job requeues; then the test cancels the requeued job."""
    cancelled = False

    def act(self):
        if not self.cancelled and "requeueing job" in self.job.log():
            self.job.slurm.run("scancel", self.job.id)
            self.cancelled = True


class DyingRank(Scenario):
    """After 2 steps the test kills rank 1 (SIGKILL), wherever it runs."""
    killed_at = None
    victims = ()

    def act(self):
        if self.killed_at is None and self.job.steps_logged() >= 2:
            self.victims = [pid for pid in self.job.slurm.job_processes(self.job.id)
                            if b"RANK=1" in _environ(pid)]
            for pid in self.victims:
                os.kill(pid, signal.SIGKILL)
            self.killed_at = time.time()


def _environ(pid) -> list:
    try:
        return open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return []


RELEASE_AFTER = 1.5  # seconds


def release(job, held_since):
    """Slurm holds a requeued batch job about two minutes (BeginTime: the credential lifetime) before it may start
    again; the test makes it eligible sooner, as an administrator would with the same command, but not in the
    second of the requeue: the requeue revokes the job's credentials on its nodes up to that second (whole
    seconds), so a batch job launched in the same second is refused ("Job N already killed, do not launch batch
    job"; slurmctld: "Killing non-startable batch JobId=N: Job credential revoked") and fails with exit code 1.
    Returns when the hold was first seen (None while the job is not held)."""
    st = job.state()
    if not (st.startswith("PENDING") and "BeginTime" in st):
        return None
    if held_since is None:
        return time.time()
    if time.time() - held_since >= RELEASE_AFTER:   # the requeue happened before the hold was seen
        job.slurm.run("scontrol", "update", f"JobId={job.id}", "StartTime=now")
    return held_since


@pytest.fixture(scope="module")
def scenarios(slurm, data, tmp_path_factory, style_runs):
    """The second wave, submitted together: a signalled job, a job stopped by its wall-time guard, a job whose
    rank dies, and the two-node runs of the first wave resumed on one node (ZeRO-0 and ZeRO-2)."""
    tmp = tmp_path_factory.mktemp("scenarios")
    long = "--train-iters 100000 " + TRAIN_ARGS
    runs = {
        "signal": Signalled(submit(slurm, data, tmp, "signal")),
        # 3 minutes, guard margin 2.8: --exit-duration-in-mins 0.2; Slurm's own signal moved to 10 s before the end
        "walltime": WallTime(submit(slurm, data, tmp, "walltime", EXIT_MARGIN_MINS="2.8", TRAIN_ARGS=long,
                                    sbatch_args=CPU_SBATCH + ["--time=3", "--signal=B:USR1@10"])),
        "dying": DyingRank(submit(slurm, data, tmp, "dying", TRAIN_ARGS=long)),
    }
    for stage, source in ((0, "torchrun-static"), (2, "torchrun")):
        run = tmp / f"resume{stage}"
        shutil.copytree(style_runs[source].run_dir, run)
        runs[f"resume{stage}"] = Scenario(submit(
            slurm, data, tmp, f"resume{stage}", sbatch_args=["--nodes=1"] + CPU_SBATCH[1:],
            DS_CONFIG=f"ds_configs/zero{stage}_fp32.json",
            TRAIN_ARGS=f"--train-iters {STEPS + 4} --data.resume_policy restart_epoch " + TRAIN_ARGS))
    deadline = time.time() + 600
    while any(sc.done_at is None for sc in runs.values()):
        for sc in runs.values():
            if sc.done_at is not None:
                continue
            if sc.job.proc.poll() is not None:
                sc.job.rc = sc.job.proc.returncode
                sc.done_at = time.time()
            elif time.time() > deadline:
                slurm.run("scancel", sc.job.id)
                sc.job.wait(timeout=60)
                sc.done_at = time.time()
            else:
                sc.act()
        time.sleep(0.3)
    return runs


def test_signal_saves_requeues_and_resumes_exactly(scenarios, style_runs):
    job = scenarios["signal"].job
    log = job.log()
    assert job.rc == 0, log[-4000:]
    assert "batch shell received SIGUSR1" in log, log[-4000:]
    m = re.search(r"saved (iter_\d+) at step (\d+) \(signal SIGUSR1\): requeueing job", log)
    assert m, log[-4000:]
    stopped = int(m.group(2))
    assert 3 <= stopped < STEPS
    assert "restart 1:" in log and f"resumed from {job.run_dir}/{m.group(1)} at step {stopped}" in log
    assert latest_meta(job.run_dir)["reason"] == "end"
    # the resumed run continues exactly: memory, data position, RNG and optimizer as if never stopped
    assert train_losses(job.run_dir) == train_losses(style_runs["torchrun"].run_dir)


def test_wall_time_guard_saves_and_requeues_before_the_limit(scenarios):
    sc = scenarios["walltime"]
    log = sc.job.log()
    assert sc.cancelled, log[-4000:]
    m = re.search(r"-> --exit-duration-in-mins ([0-9.]+)", log)
    assert m and 0.05 < float(m.group(1)) <= 0.2, log[-3000:]
    meta = latest_meta(sc.job.run_dir)
    assert meta["reason"].startswith("exit duration") and 1 <= meta["step"] < 100000
    assert f"saved {meta['tag']} at step {meta['step']} (exit duration" in log
    assert "received SIGUSR1" not in log and "DUE TO TIME LIMIT" not in log


def test_a_dying_rank_ends_the_job_with_an_error_and_leaves_nothing_behind(scenarios, slurm):
    sc = scenarios["dying"]
    log = sc.job.log()
    assert sc.victims, "rank 1 was not found among the job's processes"
    assert sc.job.rc != 0, log[-4000:]
    assert sc.done_at - sc.killed_at < 90, "the job took too long to end after a rank died"
    assert "training failed with exit status" in log and "requeueing" not in log
    time.sleep(1)
    assert slurm.job_processes(sc.job.id) == []


@pytest.mark.parametrize("stage", [0, 2])
def test_two_node_run_resumes_on_one_node(scenarios, stage):
    """Data-parallel size 2 -> 1 (the same global batch of 4 rows): the weights and optimizer state are resharded
    (ZeRO-2 partitions them per data-parallel rank), the stream restarts the epoch in the new layout and the memory
    starts afresh (data.resume_policy restart_epoch)."""
    job = scenarios[f"resume{stage}"].job
    log = job.log()
    assert job.rc == 0, log[-4000:]
    assert "1 nodes (mtnode1)" in log and "world size 1" in log
    assert f"at step {STEPS}" in log and "layout changed" in log
    assert "data-parallel size 2 (this run: 1)" in log and "resharded from" in log
    assert "reset: memory states (the stream layout changed)" in log
    losses = train_losses(job.run_dir)
    assert sorted(losses) == list(range(1, STEPS + 5))
    meta = latest_meta(job.run_dir)
    assert meta["dp_size"] == 1 and meta["step"] == STEPS + 4


def test_a_global_batch_that_does_not_divide_stops_the_job_at_once(slurm, data, tmp_path):
    job = submit(slurm, data, tmp_path, "batch", GLOBAL_BATCH="5")
    assert job.wait(timeout=120) == 2
    log = job.log()
    assert "GLOBAL_BATCH=5 is not a multiple of the data-parallel size 2 (2 nodes x 1 processes / TP 1)" in log
    assert "command:" not in log


# ------------------------------------------------------------------------------------------------ no Slurm
def _bash(script, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(env)
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("text,seconds", [("1-02:03:04", 93784), ("02:03:04", 7384), ("59:58", 3598),
                                          ("45", 45), ("2-03", 183600), ("UNLIMITED", ""), ("NOT_SET", "")])
def test_time_left_parsing(text, seconds):
    r = _bash(f'source slurm/common.sh; _ms_seconds "{text}"')
    assert r.returncode == 0 and r.stdout.strip() == str(seconds)


@pytest.mark.parametrize("reason,requeue", [
    ("signal SIGUSR1", True), ("signal SIGTERM", True), ("exit duration 0.2 min reached", True),
    # a step saves once, with every reason that met there
    ("interval + signal SIGUSR1", True), ("interval + exit duration 0.2 min reached", True),
    ("end + signal SIGUSR1", True), ("end + exit duration 0.2 min reached", True),
    ("end", False), ("interval", False), ("exit interval 100", False), ("interval + exit interval 100", False),
    ("", False)])
def test_requeue_follows_the_reasons_of_the_save(reason, requeue):
    r = _bash(f'source slurm/common.sh; if _ms_wants_requeue "{reason}"; then echo yes; else echo no; fi')
    assert r.returncode == 0 and r.stdout.strip() == ("yes" if requeue else "no"), r.stderr


def test_the_scripts_read_the_checkpoint_the_trainer_resumes_from(tmp_path):
    """The newest complete checkpoint, whatever ``latest`` names (a run stopped between a checkpoint's meta.json
    and ``latest``), never an incomplete one (no meta.json: a save cut short)."""
    for step, reason in ((10, "interval"), (12, "interval + signal SIGUSR1"), (14, None)):
        d = tmp_path / f"iter_{step:07d}" / "memtrain"
        d.mkdir(parents=True)
        if reason:
            (d / "meta.json").write_text(json.dumps({"step": step, "reason": reason}))
    (tmp_path / "latest").write_text("iter_0000010")
    r = _bash("source slurm/common.sh; _ms_latest", RUN_DIR=str(tmp_path), PYTHON=PY)
    assert r.returncode == 0 and r.stdout.split("\t")[:3] == ["iter_0000012", "interval + signal SIGUSR1", "12"], \
        r.stdout + r.stderr
    r = _bash("source slurm/common.sh; _ms_latest", RUN_DIR=str(tmp_path / "none"), PYTHON=PY)
    assert r.returncode == 0 and r.stdout == ""


def test_outside_slurm_the_scripts_refuse_with_a_clear_message():
    r = _bash("bash slurm/lamemo_large.sh")
    assert r.returncode == 2 and "not inside a Slurm job: submit with sbatch" in r.stderr


@pytest.mark.parametrize("var,value,message", [
    ("LAUNCHER", "mpirun", "LAUNCHER=mpirun: expected torchrun, srun, deepspeed or deepspeed-nossh"),
    ("TORCHRUN_RDZV", "etcd", "TORCHRUN_RDZV=etcd: expected c10d or static"),
    ("DS_CONFIG", "ds_configs/nope.json", "DS_CONFIG=ds_configs/nope.json: no such file"),
    ("GPUS_PER_NODE", "eight", "GPUS_PER_NODE=eight: expected a number"),
    ("GLOBAL_BATCH", "1k", "GLOBAL_BATCH=1k: expected a number >= 1"),
    ("EXIT_MARGIN_MINS", "5m", "EXIT_MARGIN_MINS=5m: expected minutes"),
    ("TP", "0", "TP=0: expected a number >= 1"),
])
def test_bad_settings_stop_before_anything_runs(var, value, message):
    r = _bash("bash slurm/xl_large.sh", SLURM_JOB_ID="1", **{var: value})
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_lamemo_large_preset_is_xl_large_with_lamemo_memory():
    """The LaMemo large preset keeps Transformer-XL large's shape and optimization; only the memory mechanism,
    the data order (roll) and the evaluation protocol (LaMemo's: the training lengths) differ."""
    from pretrain.config_base import to_dict
    from pretrain.engine.run_config import parse_args
    lamemo, _ = parse_args(["--config", "lamemo_wt103_large"])
    xl, _ = parse_args(["--config", "xl_wt103_large"])
    a, b = to_dict(lamemo), to_dict(xl)
    assert a["model"]["attn_type"] == 3 and b["model"]["attn_type"] == 0
    a["model"]["attn_type"] = 0
    assert a["model"] == b["model"]
    assert (a["model"]["n_layer"], a["model"]["d_model"], a["model"]["n_head"], a["model"]["d_head"],
            a["model"]["d_inner"], a["model"]["tgt_len"], a["model"]["mem_len"], a["model"]["div_val"],
            a["model"]["dropout"], a["model"]["dropatt"]) == (18, 1024, 16, 64, 4096, 384, 384, 4, 0.2, 0.2)
    assert a["optim"] == b["optim"] and a["train"] == b["train"] and a["checkpoint"] == b["checkpoint"]
    assert a["data"]["roll"] and a["eval"]["protocol"] == "train"
